r"""Predictions of a trained model, on full clips or through a public view (masked inference).

A MaskDP model is trained on two kinds of input: full clips (the private term) and public
views (the public term, where the sensitive region is replaced). At deployment it can be
run either way:

- **full clips** (the default, and how every accuracy in benchmarks/RESULTS.md is measured
  unless a row says otherwise): the model sees everything the camera saw;
- **masked inference** (``mask=`` given): the model sees the clip's public view, the view it
  was trained on, with the sensitive region replaced exactly as in training.

Masked inference is appropriate when masks exist at deployment (the same detector or
tracker as in training) and the label does not depend on the sensitive region: it removes
the gap between full clips and the public views the model learnt most from. It is not
appropriate when the sensitive region carries part of the label (the ``footage-context``
task: masking removes that part), or when deployment masks come from another detector
(their errors are a new distribution shift). Either way, the training data's guarantee is
that of the trained weights, unchanged: masked inference protects the *deployment* clip's
sensitive region from the model, not the training data.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from maskdp.mechanism.views import ViewArg, as_view

__all__ = ["accuracy", "predict"]


def predict(
    model: nn.Module, inputs: Tensor, mask: Tensor | None = None, *, view: ViewArg = None
) -> Tensor:
    """Logits of ``model`` (in eval mode, without gradients) on clips (N, C, T, H, W), or on
    their public view through ``view`` (default: :func:`~maskdp.mechanism.views.as_view`) when ``mask`` is given."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if mask is None:
                return model(inputs)
            return as_view(view).public(inputs, mask)(model)
    finally:
        model.train(was_training)


def accuracy(
    model: nn.Module,
    dataset: Dataset,
    *,
    masked: bool = False,
    view: ViewArg = None,
    batch_size: int = 128,
) -> float:
    """Top-1 accuracy over a dataset of ``(clip, mask, label)`` items: on full clips, or with
    ``masked`` through ``view`` (masked inference)."""
    device = next(model.parameters()).device
    public_view = as_view(view) if masked else None
    correct, total = 0, len(dataset)  # type: ignore[arg-type]
    for start in range(0, total, batch_size):
        x, m, y = default_collate(
            [dataset[i] for i in range(start, min(start + batch_size, total))]
        )
        x, m, y = x.to(device), m.to(device), y.to(device)
        logits = predict(model, x, m if masked else None, view=public_view)
        correct += int((logits.argmax(1) == y).sum())
    return correct / max(1, total)
