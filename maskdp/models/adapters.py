"""Third-party video classifiers as MaskDP models: clips ``(N, C, T, H, W)`` in, logits out.

MaskDP's clips, masks and views are channel-first ``(N, C, T, H, W)`` (torchvision's video
models' layout). Hugging Face video classifiers (``VideoMAEForVideoClassification``,
``VivitForVideoClassification``, ``TimesformerForVideoClassification``,
``VJEPA2ForVideoClassification``, ...) take frames first, ``(N, T, C, H, W)``, under a
keyword (``pixel_values`` or ``pixel_values_videos``) and return an output object whose
``.logits`` is the classifier's output; :func:`from_huggingface` wraps one so that the
engines, the optimizer and ``maskdp train`` see a plain ``clips -> logits`` module.

pytorchvideo's models (``create_x3d``, ``create_slowfast``, ``create_resnet``, ...) take
``(N, C, T, H, W)`` already, but come with BatchNorm, an optional softmax on the head, a
``Swish`` activation written as an ``autograd.Function`` without ``setup_context`` (which
``torch.func`` cannot differentiate per sample) and, for SlowFast, two pathways at two frame
rates; :func:`from_pytorchvideo` fixes all four in one call.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from maskdp.checks import check_count
from maskdp.errors import InvalidInputError

__all__ = ["HuggingFaceVideo", "PyTorchVideo", "from_huggingface", "from_pytorchvideo"]

#: The keywords Hugging Face video classifiers take their frames under, in order of preference.
FRAME_KEYWORDS = ("pixel_values", "pixel_values_videos")


def _check_clips(clips: Tensor) -> None:
    if clips.dim() != 5:
        raise InvalidInputError(f"clips must be (N, C, T, H, W), got shape {tuple(clips.shape)}")


class HuggingFaceVideo(nn.Module):
    """``clips (N, C, T, H, W) -> logits``: a Hugging Face video classifier, frames first
    inside. The wrapped model is :attr:`model` (its parameters keep their names under
    ``model.``)."""

    def __init__(self, model: nn.Module, keyword: str) -> None:
        super().__init__()
        self.model = model
        self.keyword = keyword

    def forward(self, clips: Tensor) -> Tensor:
        _check_clips(clips)
        output = self.model(**{self.keyword: clips.transpose(1, 2)})
        logits = getattr(output, "logits", None)
        if not isinstance(logits, Tensor):
            raise InvalidInputError(
                f"{type(self.model).__name__} returned no .logits: pass a video "
                "*ForVideoClassification model, not a base model"
            )
        return logits


def from_huggingface(model: nn.Module) -> HuggingFaceVideo:
    """Wrap a Hugging Face video classifier for MaskDP (module docstring).

    Raises :class:`~maskdp.errors.InvalidInputError` when ``model`` is not an ``nn.Module``
    or its ``forward`` takes none of :data:`FRAME_KEYWORDS`. Dropout in the model (config
    ``hidden_dropout_prob``, ``attention_probs_dropout_prob``) is allowed, but attention
    dropout keeps the ghost engine off its attention layers (docs/models.md).
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    parameters = inspect.signature(model.forward).parameters
    keyword = next((k for k in FRAME_KEYWORDS if k in parameters), None)
    if keyword is None:
        raise InvalidInputError(
            f"{type(model).__name__}.forward takes none of {list(FRAME_KEYWORDS)}: not a "
            "Hugging Face video classifier"
        )
    return HuggingFaceVideo(model, keyword)


class PyTorchVideo(nn.Module):
    """``clips (N, C, T, H, W) -> logits``: a pytorchvideo model made MaskDP-ready by
    :func:`from_pytorchvideo`. :attr:`model` is the prepared copy (its parameters keep their
    names under ``model.``), :attr:`changes` one line per change, :attr:`alpha` SlowFast's
    frame-rate ratio (``None`` for a single-pathway model)."""

    def __init__(self, model: nn.Module, changes: tuple[str, ...], alpha: int | None) -> None:
        super().__init__()
        self.model = model
        self.changes = changes
        self.alpha = alpha

    def forward(self, clips: Tensor) -> Tensor:
        _check_clips(clips)
        if self.alpha is None:
            return self.model(clips)
        return self.model(slowfast_pathways(clips, self.alpha))


def slowfast_pathways(clips: Tensor, alpha: int) -> list[Tensor]:
    """``[slow, fast]``: the fast pathway is the clip, the slow one ``T // alpha`` frames
    evenly spaced over it (pytorchvideo's ``PackPathway``: ``linspace(0, T - 1, T // alpha)``)."""
    frames = clips.shape[2]
    if frames < alpha:
        raise InvalidInputError(
            f"SlowFast with alpha {alpha} needs at least {alpha} frames, the clip has {frames}"
        )
    index = torch.linspace(0, frames - 1, frames // alpha, device=clips.device).long()
    return [clips.index_select(2, index), clips]


def from_pytorchvideo(model: nn.Module, *, alpha: int | None = None) -> PyTorchVideo:
    """Make a pytorchvideo model MaskDP-ready (module docstring); the model is left untouched.

    - :func:`maskdp.models.prepare`: BatchNorm becomes GroupNorm, in-place activations
      out-of-place (a structural fix: pretrained BatchNorm statistics are not converted);
    - every ``Swish`` becomes ``nn.SiLU`` (the same function, :math:`x \\sigma(x)`, that
      every engine can differentiate per sample);
    - a head's ``Softmax`` or ``Sigmoid`` activation is removed: the model returns logits,
      which the cross-entropy loss expects;
    - a multi-pathway model (SlowFast) gets its pathways from one clip: ``alpha`` is the
      ratio of the fast pathway's frame rate to the slow one's (4 in pytorchvideo's
      SlowFast recipes), required for such a model and refused for any other.
    """
    from maskdp.models.preparation import prepare

    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    pathways = _pathway_count(model)
    if pathways > 1 and alpha is None:
        raise InvalidInputError(
            f"{type(model).__name__} has {pathways} pathways (SlowFast): pass alpha, the fast "
            "pathway's frame-rate ratio to the slow one's (e.g. alpha=4)"
        )
    if pathways == 1 and alpha is not None:
        raise InvalidInputError(
            f"alpha is for multi-pathway models (SlowFast); {type(model).__name__} has one pathway"
        )
    if alpha is not None:
        check_count("alpha", alpha, 1)
    report = prepare(model)
    changes = list(report.changes)
    for name, module in list(report.model.named_modules()):
        if type(module).__name__ == "Swish" and type(module).__module__.startswith("pytorchvideo"):
            report.model.set_submodule(name, nn.SiLU())
            changes.append(f"{name}: Swish -> SiLU")
        activation = getattr(module, "activation", None)
        if type(module).__name__.endswith("Head") and isinstance(
            activation, (nn.Softmax, nn.Sigmoid)
        ):
            module.activation = None
            changes.append(f"{name}: {type(activation).__name__} head activation removed")
    return PyTorchVideo(report.model, tuple(changes), alpha)


def _pathway_count(model: nn.Module) -> int:
    """The number of pathways of the first multi-pathway block (pytorchvideo's
    ``MultiPathWayWithFuse``), 1 if there is none."""
    for module in model.modules():
        if type(module).__name__ == "MultiPathWayWithFuse":
            return len(module.multipathway_blocks)
    return 1
