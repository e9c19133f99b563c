r"""Public views: what the model sees of a record once its sensitive content is removed.

A public view :math:`\pi(r)` must be a function of the non-sensitive content, the mask, the
label and randomness independent of the data (DESIGN.md section 2). Every view here returns
a :class:`ModelInput` (the input tensor plus per-sample keyword tensors for the model), for
two passes:

- ``public(inputs, mask)``: the public pass, :math:`h_i = \nabla \ell(f(\pi(r_i)), y_i)`;
- ``full(inputs, mask)``: the full pass, :math:`g_i = \nabla \ell(f(x_i), y_i)`, with the
  same keyword tensors as the public pass so both can be stacked into one call.

A record whose sensitive content is *absent* (the ``erase`` neighbour) is seen exactly as
its public view (:func:`with_absent`), so its private term :math:`\Delta_i = g_i - h_i` is
exactly zero.

Views:

- :class:`PixelView`: the base of the views below but ``DropView``.
- :class:`FillView`: sensitive pixels replaced by a constant fixed before training (a number
  or one per channel; never a statistic of the data). Works with every model.
- :class:`RandomFillView`: sensitive pixels replaced by noise drawn from the view's own
  generator, independent of the data.
- :class:`InpaintView`: sensitive pixels filled from the clip's own public pixels only (the
  mean of the frame's public pixels, or the same pixel in the nearest frame where it is
  public), with a constant where a frame has no public pixel.
- :class:`DropView`: for token models implementing the token-drop protocol
  (``model(x, drop_tokens=bool[N, tokens])``): sensitive tokens are removed right after the
  tubelet embedding, so the public pass runs on fewer tokens.
- :class:`CallableView`: a user function ``(inputs, mask) -> public inputs``, checked
  against the public-view contract on its first batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from maskdp.errors import InvalidInputError, ViewContractError
from maskdp.mechanism.masks import check_pixel_mask, pixel_to_token_mask
from maskdp.mechanism.randomness import in_private_scope


@dataclass(frozen=True)
class ModelInput:
    """One batch as the model is called on it: ``model(inputs, **kwargs)``.

    Every tensor in ``kwargs`` is batch-first, so a sub-batch is a row selection.
    """

    inputs: Tensor
    kwargs: Mapping[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def select(self, index: Tensor | slice | int) -> ModelInput:
        """The sub-batch at ``index`` (an int keeps a batch dimension of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return ModelInput(self.inputs[index], {k: v[index] for k, v in self.kwargs.items()})

    def __call__(self, model: nn.Module) -> Tensor:
        return model(self.inputs, **self.kwargs)


@runtime_checkable
class PublicView(Protocol):
    """The public-view protocol (see module docstring)."""

    def public(self, inputs: Tensor, mask: Tensor) -> ModelInput: ...

    def full(self, inputs: Tensor, mask: Tensor) -> ModelInput: ...


def _per_sample(present: Tensor, like: Tensor) -> Tensor:
    return present.view(-1, *([1] * (like.dim() - 1)))


def with_absent(full: ModelInput, public: ModelInput, present: Tensor | None) -> ModelInput:
    """The full pass of a batch in which records with ``present[i] = False`` are erased.

    An erased record has no sensitive content: the model sees exactly its public view.
    """
    if present is None:
        return full
    if present.dtype != torch.bool or tuple(present.shape) != (len(full),):
        raise InvalidInputError(
            f"present must be a bool tensor of shape ({len(full)},), got "
            f"{present.dtype} {tuple(present.shape)}"
        )
    if set(full.kwargs) != set(public.kwargs):
        raise ViewContractError("full and public passes must take the same keyword tensors")
    inputs = torch.where(_per_sample(present, full.inputs), full.inputs, public.inputs)
    kwargs = {
        k: torch.where(_per_sample(present, v), v, public.kwargs[k]) for k, v in full.kwargs.items()
    }
    return ModelInput(inputs, kwargs)


class PixelView:
    """Base of the views that replace sensitive pixels and keep every token: a subclass
    defines ``replacement(inputs)``, the values put where the mask is ``True`` (or
    ``fill(inputs, mask)``, where the values may also depend on the public mask)."""

    def replacement(self, inputs: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def fill(self, inputs: Tensor, mask: Tensor) -> Tensor:
        """The values put where ``mask`` is ``True``: :meth:`replacement` by default."""
        return self.replacement(inputs)

    def public(self, inputs: Tensor, mask: Tensor) -> ModelInput:
        check_pixel_mask(mask, inputs)
        return ModelInput(torch.where(mask[:, None], self.fill(inputs, mask), inputs))

    def full(self, inputs: Tensor, mask: Tensor) -> ModelInput:
        check_pixel_mask(mask, inputs)
        return ModelInput(inputs)


class FillView(PixelView):
    """Replace sensitive pixels by a constant fixed before training.

    ``value`` is one number or one number per channel. Being a constant, the public view is
    a function of the public pixels and the mask only.
    """

    def __init__(self, value: float | Sequence[float] = 0.0) -> None:
        values = [value] if isinstance(value, (int, float)) else list(value)
        if not values or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in values
        ):
            raise InvalidInputError(
                f"FillView value must be a finite number or a sequence of finite numbers "
                f"(one per channel), got {value!r}; a fill must be fixed before training, "
                "never a statistic of the data"
            )
        self.value = tuple(float(v) for v in values)

    def replacement(self, inputs: Tensor) -> Tensor:
        channels = inputs.shape[1]
        if len(self.value) not in (1, channels):
            raise InvalidInputError(
                f"FillView has {len(self.value)} channel values but inputs have {channels} channels"
            )
        fill = torch.tensor(self.value, dtype=inputs.dtype, device=inputs.device)
        return fill.view(1, -1, 1, 1, 1).expand_as(inputs)

    def __repr__(self) -> str:
        value = self.value[0] if len(self.value) == 1 else list(self.value)
        return f"FillView({value!r})"


class RandomFillView(PixelView):
    """Replace sensitive pixels by uniform noise in ``[low, high)`` from the view's own generator.

    The noise is drawn from a generator seeded at construction and never from the data, so
    the public view is a function of public content and data-independent randomness. On
    the private side of a step (:func:`maskdp.mechanism.randomness.private_scope`) it draws from the
    scope's secret stream instead, so that its own generator, which serves the public batch,
    never advances by an amount that depends on the private batch.
    """

    def __init__(self, low: float = 0.0, high: float = 1.0, *, seed: int = 0) -> None:
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise InvalidInputError(
                f"RandomFillView needs finite low < high, got low={low!r}, high={high!r}"
            )
        self.low, self.high, self.seed = float(low), float(high), int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)

    def replacement(self, inputs: Tensor) -> Tensor:
        generator = None if in_private_scope() else self._generator
        noise = torch.rand(inputs.shape, generator=generator, dtype=torch.float32)
        noise = noise.to(device=inputs.device, dtype=inputs.dtype)
        return self.low + (self.high - self.low) * noise

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self._generator.set_state(state["generator"])

    def __repr__(self) -> str:
        return f"RandomFillView(low={self.low}, high={self.high}, seed={self.seed})"


class InpaintView(PixelView):
    r"""Fill sensitive pixels from the clip's own public pixels (and the mask) only.

    ``method="mean"``: every sensitive pixel of frame :math:`t` and channel :math:`c` gets
    the mean of the public pixels of that (sample, channel, frame),
    :math:`\sum_{p \notin m_t} x_{c,t,p} / |\{p \notin m_t\}|`, or ``fallback`` when the
    frame has no public pixel.

    ``method="temporal"``: every sensitive pixel gets the value of the same pixel in the
    nearest frame where it is public (earlier frame first on ties); pixels sensitive in
    every frame get the ``"mean"`` fill.

    Privacy: sensitive values are never arithmetic operands. Every statistic is a sum over
    ``torch.where(public, x, 0)`` and every copy a ``torch.where`` that selects a public
    value, so the view is a function of public content and the mask, bit for bit (the
    leak test perturbs sensitive pixels and compares with ``torch.equal``). Caveat on this
    repository's synthetic ``avatar`` scenario: the only public pixels are the avatar's, so
    inpainting paints the background in the avatar's colour and hides it; measure before
    choosing a view.
    """

    METHODS = ("mean", "temporal")

    def __init__(self, method: str = "mean", *, fallback: float = 0.5) -> None:
        if method not in self.METHODS:
            raise InvalidInputError(
                f"InpaintView method must be one of {list(self.METHODS)}, got {method!r}"
            )
        if (
            isinstance(fallback, bool)
            or not isinstance(fallback, (int, float))
            or not math.isfinite(fallback)
        ):
            raise InvalidInputError(
                f"InpaintView fallback must be a finite number fixed before training, "
                f"got {fallback!r}"
            )
        self.method = method
        self.fallback = float(fallback)

    def public(self, inputs: Tensor, mask: Tensor) -> ModelInput:
        check_pixel_mask(mask, inputs)
        public = ~mask[:, None].expand_as(inputs)
        # The only read of ``inputs``: sensitive values are replaced by zeros, never used.
        safe = torch.where(public, inputs, inputs.new_zeros(()))
        fill = self._frame_mean(safe, public)
        if self.method == "temporal":
            fill = self._nearest_public_frame(safe, public, fill)
        return ModelInput(torch.where(public, safe, fill))

    def _frame_mean(self, safe: Tensor, public: Tensor) -> Tensor:
        """Per (sample, channel, frame) mean of public pixels, ``fallback`` where none."""
        total = safe.sum(dim=(3, 4), keepdim=True)
        count = public.sum(dim=(3, 4), keepdim=True)
        mean = total / count.clamp_min(1).to(safe.dtype)
        fallback = torch.full_like(mean, self.fallback)
        return torch.where(count > 0, mean, fallback).expand_as(safe)

    def _nearest_public_frame(self, safe: Tensor, public: Tensor, fill: Tensor) -> Tensor:
        """Copy each pixel from the nearest frame where it is public (earlier first)."""
        frames = safe.shape[2]
        out = fill.clone()
        found = torch.zeros_like(public)
        for offset in range(1, frames):
            for shift in (offset, -offset):  # source frame t - shift: earlier first
                source, source_public = _shift_frames(safe, shift), _shift_frames(public, shift)
                take = source_public & ~found
                out = torch.where(take, source, out)
                found = found | take
        return out

    def __repr__(self) -> str:
        return f"InpaintView(method={self.method!r}, fallback={self.fallback})"


def _shift_frames(tensor: Tensor, shift: int) -> Tensor:
    """``out[:, :, t] = tensor[:, :, t - shift]`` where that frame exists, else zeros/False."""
    out = torch.zeros_like(tensor)
    frames = tensor.shape[2]
    if shift > 0:
        out[:, :, shift:] = tensor[:, :, : frames - shift]
    else:
        out[:, :, : frames + shift] = tensor[:, :, -shift:]
    return out


class DropView:
    """Remove sensitive tokens before the first attention block (token models only).

    The model implements the token-drop protocol: ``model(x, drop_tokens=drop)`` with
    ``drop`` a bool tensor (N, tokens) in the model's token order (time, height, width), and
    drops those tokens right after its tubelet embedding (before any layer that mixes
    tokens). Sensitive pixels are also filled with ``fill`` so that a model that ignored the
    protocol would still never see sensitive content.
    """

    def __init__(self, tubelet_size: int | Sequence[int], *, fill: float = 0.0) -> None:
        self.tubelet_size = tubelet_size
        self._fill = FillView(fill)

    @classmethod
    def for_model(cls, model: nn.Module, *, fill: float = 0.0) -> DropView:
        """A DropView with the tubelet size of a model implementing the protocol."""
        if not getattr(model, "supports_token_drop", False):
            raise InvalidInputError(
                f"{type(model).__name__} does not implement the token-drop protocol "
                "(attribute supports_token_drop = True and forward(x, drop_tokens=...)); "
                "use FillView instead"
            )
        return cls(model.tubelet_size, fill=fill)

    def token_mask(self, mask: Tensor) -> Tensor:
        return pixel_to_token_mask(mask, self.tubelet_size, flatten=True)

    def public(self, inputs: Tensor, mask: Tensor) -> ModelInput:
        filled = self._fill.public(inputs, mask).inputs
        return ModelInput(filled, {"drop_tokens": self.token_mask(mask)})

    def full(self, inputs: Tensor, mask: Tensor) -> ModelInput:
        check_pixel_mask(mask, inputs)
        keep_all = torch.zeros_like(self.token_mask(mask))
        return ModelInput(inputs, {"drop_tokens": keep_all})

    def __repr__(self) -> str:
        return f"DropView(tubelet_size={self.tubelet_size!r}, fill={self._fill.value[0]})"


class CallableView(PixelView):
    """Wrap a user function ``fn(inputs, mask) -> public inputs`` (same shape as inputs).

    The function never sees sensitive content: it is called on the clip with its sensitive
    pixels set to zero (``torch.where(mask, 0, inputs)``), so its output is a function of
    public content and the mask by construction, whatever the function does (NaN or inf in
    a sensitive pixel cannot reach it). On its first batch it is also checked to keep the
    input's shape and to be deterministic on that input (:class:`ViewContractError`).
    """

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        if not callable(fn):
            raise InvalidInputError(f"a custom view must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.checked = False

    def _apply(self, inputs: Tensor, mask: Tensor) -> Tensor:
        public_only = torch.where(mask[:, None], torch.zeros((), dtype=inputs.dtype), inputs)
        out = self.fn(public_only, mask)
        if not isinstance(out, Tensor) or out.shape != inputs.shape:
            raise ViewContractError(
                f"custom view must return a tensor of the input's shape {tuple(inputs.shape)}, "
                f"got {getattr(out, 'shape', type(out).__name__)}"
            )
        return out

    def check_contract(self, inputs: Tensor, mask: Tensor) -> None:
        """Perturb only sensitive pixels and require a bit-identical public view (it holds by
        construction; the check catches a function that is not deterministic)."""
        reference = self._apply(inputs, mask)
        gen = torch.Generator().manual_seed(1234)
        sensitive = mask[:, None].expand_as(inputs)
        for scale in (1.0, 1e3):
            noise = torch.randn(inputs.shape, generator=gen).to(inputs) * scale
            perturbed = torch.where(sensitive, inputs + noise, inputs)
            if not torch.equal(self._apply(perturbed, mask), reference):
                raise ViewContractError(
                    "custom view output changed when only sensitive pixels changed: it reads "
                    "sensitive content, which would break the privacy guarantee"
                )
        self.checked = True

    def public(self, inputs: Tensor, mask: Tensor) -> ModelInput:
        check_pixel_mask(mask, inputs)
        if not self.checked and mask.any():
            self.check_contract(inputs, mask)
        return ModelInput(self._apply(inputs, mask))

    def __repr__(self) -> str:
        return f"CallableView({getattr(self.fn, '__name__', repr(self.fn))})"


#: What a ``view=`` argument accepts: a view, a callable ``(x, m) -> x'``, or None (default).
ViewArg = PublicView | Callable[[Tensor, Tensor], Tensor] | None


def as_view(view: ViewArg) -> PublicView:
    """Resolve ``None`` to the default view and wrap plain callables in :class:`CallableView`.

    The default is :class:`~maskdp.mechanism.texture_view.TextureFillView` (``seed=0``): a
    moving texture with the spectrum of natural images, for clips in [0, 1]. On the
    real-footage tasks it matched or beat ``CoverageView`` and every other view, three seeds
    (benchmarks/RESULTS.md, "Utility on real footage").
    """
    if view is None:
        from maskdp.mechanism.texture_view import TextureFillView  # it builds on this module

        return TextureFillView()
    if isinstance(view, PublicView):
        return view
    if callable(view):
        return CallableView(view)
    raise InvalidInputError(
        "view must be a PublicView (FillView, TextureFillView, CoverageView, DropView, ...) "
        f"or a callable (inputs, mask) -> public inputs, got {type(view).__name__}"
    )
