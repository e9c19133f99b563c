"""Third-party video classifiers as MaskDP models: clips ``(N, C, T, H, W)`` in, logits out.

MaskDP's clips, masks and views are channel-first ``(N, C, T, H, W)`` (torchvision's video
models' layout). Hugging Face video classifiers (``VideoMAEForVideoClassification``,
``VivitForVideoClassification``, ``TimesformerForVideoClassification``,
``VJEPA2ForVideoClassification``, ...) take frames first, ``(N, T, C, H, W)``, under a
keyword (``pixel_values`` or ``pixel_values_videos``) and return an output object whose
``.logits`` is the classifier's output; :func:`from_huggingface` wraps one so that the
engines, the optimizer and ``maskdp train`` see a plain ``clips -> logits`` module.
"""

from __future__ import annotations

import inspect

from torch import Tensor, nn

from maskdp.errors import InvalidInputError

__all__ = ["HuggingFaceVideo", "from_huggingface"]

#: The keywords Hugging Face video classifiers take their frames under, in order of preference.
FRAME_KEYWORDS = ("pixel_values", "pixel_values_videos")


class HuggingFaceVideo(nn.Module):
    """``clips (N, C, T, H, W) -> logits``: a Hugging Face video classifier, frames first
    inside. The wrapped model is :attr:`model` (its parameters keep their names under
    ``model.``)."""

    def __init__(self, model: nn.Module, keyword: str) -> None:
        super().__init__()
        self.model = model
        self.keyword = keyword

    def forward(self, clips: Tensor) -> Tensor:
        if clips.dim() != 5:
            raise InvalidInputError(
                f"clips must be (N, C, T, H, W), got shape {tuple(clips.shape)}"
            )
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
