r"""Engine contract: what every engine computes, and the registry that resolves ``"auto"``.

For the private batch, with full pass :math:`g_i = \nabla \ell(f(x_i), y_i)` and public pass
:math:`h_i = \nabla \ell(f(\pi(r_i)), y_i)` of each record, an engine returns a
:class:`ClippedSum` (DESIGN.md section 3):

- ``private`` = :math:`\sum_i c_i \Delta_i` with :math:`\Delta_i = g_i - h_i` and
  :math:`c_i = \min(1, C / \lVert\Delta_i\rVert)`, summed in float32 or wider,
- ``norms`` = :math:`\lVert\Delta_i\rVert` over all trainable parameters (float64),
- ``clip_factors`` = :math:`c_i` (float64); :math:`c_i = 0` when the norm is not finite,
  and such a record's row is zeroed before the sum, so it contributes exactly zero.

The sum of the :math:`h_i` over the private batch is **never** returned: it would reveal
which records were sampled. The public term of a step comes from an independent public
batch (:mod:`maskdp.mechanism.gradient`). With ``protect_labels`` there is no public pass:
:math:`\Delta_i = g_i` (plain DP-SGD).

**Shared randomness.** A model that draws random numbers in its forward (dropout,
stochastic depth) must see the same draws in the full and the public pass of a record, or
an erased record would have :math:`\Delta_i \ne 0`. Engines snapshot torch's generator
before the full pass and restore it before the public pass (:class:`RngSnapshot`), and use
a stacked ``2B`` schedule (whose halves would draw differently) only when the batch says
the model draws nothing (``MaskedBatch.random = False``, set by the model probe of
:mod:`maskdp.engines.validate`). Engines are deterministic given the generator and add no noise;
they never touch ``param.grad`` nor the user's module names or state_dict keys.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from maskdp.errors import InvalidInputError, UnsupportedModelError
from maskdp.mechanism.views import ModelInput

PerSampleLoss = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class MaskedBatch:
    """The two passes of one private batch. ``public`` is None when labels are protected.

    ``random``: whether the model may draw random numbers in its forward (then the two
    passes must run separately, each after the same :class:`RngSnapshot`).
    """

    full: ModelInput
    public: ModelInput | None
    targets: Tensor
    random: bool = True

    def __len__(self) -> int:
        return len(self.full)

    @property
    def protect_labels(self) -> bool:
        return self.public is None


@dataclass(frozen=True)
class ClippedSum:
    r"""What an engine returns for a private batch (sums over the batch, no noise).

    ``private`` maps parameter names (as in ``model.named_parameters()``, trainable ones
    only) to :math:`\sum_i c_i \Delta_i`, in the parameter's dtype promoted to float32.
    """

    private: dict[str, Tensor]
    norms: Tensor
    clip_factors: Tensor


class RngSnapshot:
    """torch's generator state (CPU, and ``device``'s CUDA generator), to replay draws."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.device = device if device.type == "cuda" else None
        self.cuda = None if self.device is None else torch.cuda.get_rng_state(self.device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)

    def unchanged(self) -> bool:
        """Whether the generators are still in the snapshot's state (nothing was drawn)."""
        if not torch.equal(torch.get_rng_state(), self.cpu):
            return False
        return self.device is None or torch.equal(torch.cuda.get_rng_state(self.device), self.cuda)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype clipped sums and noise are computed in: ``dtype`` promoted to float32."""
    return torch.promote_types(dtype, torch.float32)


def per_sample_loss(loss_fn: nn.Module | PerSampleLoss) -> PerSampleLoss:
    """A loss returning one value per sample.

    A module with a ``reduction`` attribute (``nn.CrossEntropyLoss`` and friends) is copied
    with ``reduction="none"``: the mechanism sums per-sample losses and divides by the
    expected batch size, whatever reduction the user chose. Any other callable must already
    return a tensor of shape (N,).
    """
    if isinstance(loss_fn, nn.Module) and hasattr(loss_fn, "reduction"):
        per_sample = copy.copy(loss_fn)
        per_sample.reduction = "none"
        return per_sample
    if callable(loss_fn):
        return _checked(loss_fn)
    raise InvalidInputError(f"loss_fn must be callable, got {type(loss_fn).__name__}")


def _checked(loss_fn: PerSampleLoss) -> PerSampleLoss:
    def loss(outputs: Tensor, targets: Tensor) -> Tensor:
        value = loss_fn(outputs, targets)
        if not isinstance(value, Tensor) or value.shape != (outputs.shape[0],):
            raise InvalidInputError(
                "loss_fn must return one loss per sample, shape "
                f"({outputs.shape[0]},), got {getattr(value, 'shape', type(value).__name__)}; "
                "pass an nn.Module loss with a `reduction` attribute or a per-sample callable"
            )
        return value

    return loss


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters by name, as ``model.named_parameters()`` lists them."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def clip_factors(norms: Tensor, max_grad_norm: float) -> Tensor:
    r""":math:`c_i = \min(1, C / \lVert\Delta_i\rVert)` in float64; 1 for a zero norm, 0 for a
    norm that is not finite (the record then contributes nothing)."""
    norms = norms.double()
    factors = (max_grad_norm / norms.clamp_min(1e-300)).clamp(max=1.0)
    return torch.where(torch.isfinite(norms), factors, torch.zeros_like(factors))


def clipped_rows(rows: Tensor, factors: Tensor) -> Tensor:
    r""":math:`c_i` times each row (batch first), in :func:`accumulation_dtype`; rows with
    :math:`c_i = 0` (non-finite) become exact zeros instead of ``0 * inf = nan``."""
    rows = rows.to(accumulation_dtype(rows.dtype))
    scale = factors.to(rows.dtype).view(-1, *([1] * (rows.dim() - 1)))
    return torch.where(
        scale > 0, rows * scale, torch.zeros((), dtype=rows.dtype, device=rows.device)
    )


def empty_result(model: nn.Module, device: torch.device | None = None) -> ClippedSum:
    """Zeros for an empty batch (noise is still added by the optimizer)."""
    params = trainable_parameters(model)
    dev = device or next(iter(params.values())).device
    return ClippedSum(
        private={
            n: torch.zeros_like(p, dtype=accumulation_dtype(p.dtype)) for n, p in params.items()
        },
        norms=torch.zeros(0, dtype=torch.float64, device=dev),
        clip_factors=torch.zeros(0, dtype=torch.float64, device=dev),
    )


class Engine(ABC):
    """Computes a :class:`ClippedSum` for one model.

    An engine is built once per model (it may register hooks, which :meth:`close` removes)
    and is called once per batch.
    """

    name: ClassVar[str]
    #: Preference order for ``"auto"``: lower is tried first.
    priority: ClassVar[int] = 100
    #: Whether :math:`\lVert c_i \Delta_i \rVert \le C` still holds (up to fp32 rounding)
    #: when ``compute`` runs under ``torch.autocast``: norms and the clipped sum must be
    #: reduced in fp32 or better. ``MaskDPOptimizer(autocast=...)`` refuses other engines.
    autocast_safe: ClassVar[bool] = False

    def __init__(self, model: nn.Module, loss_fn: nn.Module | PerSampleLoss) -> None:
        self.check_support(model)
        self.model = model
        self.loss_fn = per_sample_loss(loss_fn)

    @classmethod  # noqa: B027 - an optional hook: accepting every model is a valid default
    def check_support(cls, model: nn.Module) -> None:
        """Raise :class:`UnsupportedModelError` naming the module this engine cannot handle."""

    @abstractmethod
    def compute(self, batch: MaskedBatch, *, max_grad_norm: float) -> ClippedSum:
        """Clipped private sum, norms and clip factors of ``batch``."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release hooks or buffers held on the model."""


ENGINES: dict[str, type[Engine]] = {}


def register_engine(cls: type[Engine]) -> type[Engine]:
    """Class decorator adding an engine to :data:`ENGINES` under ``cls.name``."""
    ENGINES[cls.name] = cls
    return cls


def _load_builtin_engines() -> None:
    # Importing the modules registers the engines; hooks imports opacus lazily itself.
    from maskdp.engines import hooks, reference, vmap  # noqa: F401
    from maskdp.engines.ghost import engine  # noqa: F401


def check_engine_name(name: Any) -> str:
    """``name`` if it is ``"auto"`` or a registered engine; else a one-line error."""
    if not isinstance(name, str):
        raise InvalidInputError(f"engine must be a string, got {type(name).__name__}")
    if name not in engine_names():
        raise InvalidInputError(
            f"unknown engine {name!r}; choose one of {', '.join(engine_names())}"
        )
    return name


def engine_names() -> list[str]:
    _load_builtin_engines()
    return ["auto", *sorted(ENGINES)]


def resolve_engine(name: str, model: nn.Module) -> type[Engine]:
    """The engine class for ``name``; ``"auto"`` picks the preferred engine that supports it.

    The one place where an engine name is interpreted. ``"auto"`` decides here from
    ``check_support`` alone; :func:`build_engine` also falls back at the first call.
    """
    return _candidates(name, model)[0]


def _candidates(name: str, model: nn.Module, autocast: bool = False) -> list[type[Engine]]:
    """``[ENGINES[name]]`` after its check, or for ``"auto"`` every engine that supports the
    model, preferred first (``reference`` never; with ``autocast``, autocast-safe ones)."""
    if check_engine_name(name) != "auto":
        ENGINES[name].check_support(model)
        return [ENGINES[name]]
    found, reasons = [], []
    for cls in sorted(ENGINES.values(), key=lambda c: c.priority):
        if cls.name == "reference":
            continue
        if autocast and not cls.autocast_safe:
            reasons.append(f"{cls.name}: not autocast-safe")
            continue
        try:
            cls.check_support(model)
        except UnsupportedModelError as err:
            reasons.append(f"{cls.name}: {err}")
            continue
        found.append(cls)
    if not found:
        raise UnsupportedModelError("no engine supports this model: " + "; ".join(reasons))
    return found


def build_engine(
    name: str, model: nn.Module, loss_fn: nn.Module | PerSampleLoss, *, autocast: bool = False
) -> Engine:
    """The engine ``name`` built for ``model``; ``"auto"`` gives an :class:`AutoEngine`."""
    candidates = _candidates(name, model, autocast)
    if name != "auto":
        return candidates[0](model, loss_fn)
    return AutoEngine(model, loss_fn, candidates)


class AutoEngine(Engine):
    """``engine="auto"``: the first engine, in preference order, that accepts the model
    (``check_support``) *and* computes a probe of its first non-empty batch.

    Some refusals can only show on a batch (a per-frame CNN that folds time into the batch,
    an in-place residual under Opacus hooks, a module the ghost engine cannot replay, per-
    sample gradients that do not add up to the batched one). The choice is made on
    :func:`probe_batch`, the first batch's structure with every value replaced by draws
    of a fixed generator, so the engine that trains (and ``metrics.json`` names) is a
    function of the model and the batch's shapes alone, never of a sensitive value or
    label. The choice is then kept: a refusal on a real batch is raised, never a switch.
    :attr:`reasons` says why each preferred engine was passed over.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module | PerSampleLoss,
        candidates: list[type[Engine]],
    ) -> None:
        self.model, self._loss_arg = model, loss_fn
        self._candidates = list(candidates)
        self.reasons: list[str] = []
        self.engine: Engine = self._candidates.pop(0)(model, loss_fn)
        self.loss_fn = self.engine.loss_fn
        self._settled = False

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.engine.name

    @property
    def autocast_safe(self) -> bool:  # type: ignore[override]
        return self.engine.autocast_safe

    def compute(self, batch: MaskedBatch, *, max_grad_norm: float) -> ClippedSum:
        if not self._settled and len(batch) > 0:
            self._settle(probe_batch(batch), max_grad_norm)
        return self.engine.compute(batch, max_grad_norm=max_grad_norm)

    def _settle(self, probe: MaskedBatch, max_grad_norm: float) -> None:
        """Keep the first candidate that computes ``probe`` (torch's generator restored)."""
        while True:
            snapshot = RngSnapshot(probe.targets.device)
            try:
                self.engine.compute(probe, max_grad_norm=max_grad_norm)
            except UnsupportedModelError as err:
                if not self._candidates:
                    raise
                self.reasons.append(f"{self.engine.name}: {err}")
                self.engine.close()
                self.engine = self._candidates.pop(0)(self.model, self._loss_arg)
                self.loss_fn = self.engine.loss_fn
                continue
            finally:
                snapshot.restore()
            self._settled = True
            return

    def close(self) -> None:
        self.engine.close()

    def __repr__(self) -> str:
        why = f"; passed over {'; '.join(self.reasons)}" if self.reasons else ""
        return f"AutoEngine(chose {self.engine.name!r}{why})"


#: Rows of :func:`probe_batch`: a fixed number, as a Poisson batch's size is not public.
PROBE_ROWS = 2


def probe_batch(batch: MaskedBatch, seed: int = 0) -> MaskedBatch:
    """``batch``'s structure without its values: :data:`PROBE_ROWS` rows (the first ones,
    repeated if fewer); the clips and every floating keyword tensor replaced by standard
    normal draws of a generator seeded with ``seed`` (zeros for a clip tensor that is not
    floating), targets by zeros (a valid class index); integer and boolean keyword tensors
    (token indices and masks: functions of the public masks) are kept."""
    index = torch.arange(PROBE_ROWS, device=batch.targets.device) % len(batch)
    generator = torch.Generator().manual_seed(seed)

    def blank(tensor: Tensor, *, clip: bool = False) -> Tensor:
        rows = tensor[index.to(tensor.device)]
        if not rows.is_floating_point():
            return torch.zeros_like(rows) if clip else rows
        draws = torch.randn(rows.shape, generator=generator, dtype=torch.float64)
        return draws.to(dtype=rows.dtype, device=rows.device)

    def blank_input(sample: ModelInput) -> ModelInput:
        kwargs = {k: blank(v) for k, v in sample.kwargs.items()}
        return ModelInput(blank(sample.inputs, clip=True), kwargs)

    public = None if batch.public is None else blank_input(batch.public)
    targets = torch.zeros_like(batch.targets[index])
    return MaskedBatch(blank_input(batch.full), public, targets, batch.random)
