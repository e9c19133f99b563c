r"""``MaskDPOptimizer``: MaskDP-SGD as a drop-in wrapper around any torch optimizer.

One step (DESIGN.md section 3), each phase a method as in Opacus
``optimizers/optimizer.py``:

1. :meth:`~MaskDPOptimizer.backward` (clip and accumulate): the engine returns
   :math:`\sum_i h_i + \sum_i c_i \Delta_i` for a batch; several calls before a step add up.
2. :meth:`~MaskDPOptimizer.add_noise`: :math:`+\,N(0, \sigma^2 C^2 I)` on every released
   parameter, on every step (an empty batch included).
   With ``private_weight`` or ``shrinkage`` the noise goes on the private sum alone and
   the step uses :math:`\sum_i h_i + w\,s(Z)` of the noisy private sum :math:`Z`
   (post-processing, :mod:`maskdp.postprocess`).
3. :meth:`~MaskDPOptimizer.scale`: divide by the expected batch size :math:`B = qN`.
4. :meth:`~MaskDPOptimizer.account`: one Poisson-subsampled Gaussian step
   :math:`(q, \sigma)` in the ledger.
5. the inner optimizer's ``step``.

Usage::

    optimizer = maskdp.MaskDPOptimizer(torch.optim.AdamW(model.parameters()), model=model,
        loss_fn=loss_fn, noise_multiplier=1.0, max_grad_norm=1.0,
        expected_batch_size=64, sample_rate=64 / len(dataset), view=maskdp.FillView(0.0))
    for x, m, y in loader:          # a Poisson loader (maskdp.data.poisson)
        optimizer.zero_grad()
        loss = optimizer.backward(x, m, y)
        optimizer.step()

The guarantee is that of the subsampled Gaussian mechanism with sensitivity :math:`C` under
the ``erase`` relation, and holds only if the batches come from Poisson sampling at rate
``sample_rate`` (:func:`maskdp.privacy.make_private` replaces the loader's sampler).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from accounting.errors import AccountingError
from accounting.ledger import ACCOUNTANTS, PrivacyLedger
from maskdp import noise, postprocess, precision
from maskdp.distributed import DistributedContext, unwrap_ddp
from maskdp.engines.base import Engine, MaskedGradient, PerSampleLoss, resolve_engine
from maskdp.errors import InvalidInputError, PrivacyBudgetExceeded, UnsupportedModelError
from maskdp.functional import check_max_grad_norm, make_batch
from maskdp.validate import validate_model
from maskdp.views import PublicView, as_view

FORMAT = "maskdp-optimizer"
FORMAT_VERSION = 1
_MAX_GUARDED_STEPS = 2**31


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_noise_multiplier(value: float) -> float:
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise InvalidInputError(
            f"noise_multiplier must be a finite number >= 0 (0 only for testing), got {value!r}"
        )
    return float(value)


def check_sample_rate(value: float) -> float:
    if not _is_number(value) or not (0.0 < value <= 1.0):
        raise InvalidInputError(
            f"sample_rate must be a number in (0, 1] (expected batch size / dataset size), "
            f"got {value!r}"
        )
    return float(value)


def check_expected_batch_size(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(
            f"expected_batch_size must be an int >= 1 (sample_rate * dataset size), got {value!r}"
        )
    return value


def check_delta(value: float, name: str = "delta") -> float:
    if not _is_number(value) or not (0.0 < value < 1.0):
        raise InvalidInputError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def check_target_epsilon(value: float) -> float:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise InvalidInputError(f"target_epsilon must be a finite number > 0, got {value!r}")
    return float(value)


def _add(total: dict[str, Tensor] | None, more: dict[str, Tensor]) -> dict[str, Tensor]:
    return more if total is None else {n: total[n] + more[n] for n in more}


def _sum_norm(tensors: Iterable[Tensor]) -> Tensor:
    norms = [torch.linalg.vector_norm(t.detach().double()) for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


class MaskDPOptimizer(Optimizer):
    r"""Wrap ``optimizer`` so that each step is a MaskDP-SGD step.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over trainable parameters of ``model``.
        model: the model (never modified or wrapped; engines hook it). Refused if it holds a
            layer that mixes samples (BatchNorm): :func:`maskdp.validate.validate_model`.
        loss_fn: a loss module (its ``reduction`` is ignored: per-sample losses are summed
            and divided by ``expected_batch_size``) or a per-sample callable.
        noise_multiplier: :math:`\sigma \ge 0`. ``0`` is for tests only: no privacy,
            :meth:`epsilon` reports ``math.inf`` once such a step was taken, and the step
            is not written to the ledger (a Gaussian event needs :math:`\sigma > 0`).
        max_grad_norm: the clipping norm :math:`C` of :math:`\Delta_i = g_i - h_i`. It is
            taken over *all* trainable parameters of ``model``; set ``requires_grad=False``
            on parameters you do not train.
        expected_batch_size: :math:`B = qN`, the divisor of every step (fixed, never the
            realised batch size).
        sample_rate: the Poisson sampling rate :math:`q \in (0, 1]`.
        view: the public view (default ``FillView(0.5)``, see :func:`maskdp.views.as_view`)
            or a callable.
        engine: ``"auto"`` or an engine name (:func:`maskdp.engines.base.engine_names`).
        protect_labels: plain DP-SGD on :math:`g_i` (no public term): protects labels too.
        target_epsilon: with ``target_delta``, :meth:`step` raises
            :class:`~maskdp.errors.PrivacyBudgetExceeded` *before* a step that would make
            epsilon exceed it, changing nothing. The number of steps the target allows is
            found once by bisection (O(log steps) accountant queries, on the first step
            and after :meth:`load_state_dict`), then counted down.
        target_delta: the delta of the budget and the default of :meth:`epsilon`.
        accountant: ``"rdp"`` (default) or ``"prv"`` (tighter, slower; its upper bound).
        noise_generator: a ``torch.Generator`` for the noise (``None``: torch's global
            generator). Its state is saved by :meth:`state_dict`.
        autocast: ``torch.bfloat16`` or ``torch.float16`` runs each engine call under
            ``torch.autocast`` (low-precision forward passes); clipped sums, noise and the
            division stay in the parameters' dtype (:mod:`maskdp.precision`).
        private_weight: :math:`w \ge 0`: the step uses :math:`\sum_i h_i + w Z` with
            :math:`Z = \sum_i c_i \Delta_i + N(0, \sigma^2 C^2 I)` the noisy private sum
            (noise added *before* weighting; :math:`w < 1` trades the private term's bias
            for less noise). Post-processing of the released :math:`(\sum_i h_i, Z)`, so
            free in privacy (:mod:`maskdp.postprocess`). Default 1: plain MaskDP-SGD.
        shrinkage: ``None`` or ``"james-stein"``: per parameter tensor, replace :math:`Z`
            by its positive-part James-Stein shrinkage toward zero, computed from :math:`Z`,
            :math:`\sigma`, :math:`C` and the dimension only (post-processing too).

    Distributed data parallel: pass ``model=DistributedDataParallel(model)``. Engines then
    run on ``model.module``; each rank's clipped sum is all-reduced, rank 0 alone adds the
    noise, and every rank divides by ``expected_batch_size`` (the *global* one) and accounts
    one step (:mod:`maskdp.distributed`).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        model: nn.Module,
        loss_fn: nn.Module | PerSampleLoss,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        sample_rate: float,
        view: PublicView | Callable[[Tensor, Tensor], Tensor] | None = None,
        engine: str = "auto",
        protect_labels: bool = False,
        target_epsilon: float | None = None,
        target_delta: float | None = None,
        accountant: str = "rdp",
        noise_generator: torch.Generator | None = None,
        autocast: torch.dtype | None = None,
        private_weight: float = 1.0,
        shrinkage: str | None = None,
    ) -> None:
        # Validate everything before building anything (an invalid wrapper never exists).
        model, self._dist = unwrap_ddp(model)
        self._autocast = precision.check_autocast(autocast)
        if not isinstance(optimizer, Optimizer) or isinstance(optimizer, MaskDPOptimizer):
            raise InvalidInputError(
                f"optimizer must be a torch.optim.Optimizer (not already wrapped), got "
                f"{type(optimizer).__name__}"
            )
        validate_model(model)
        self._sigma = check_noise_multiplier(noise_multiplier)
        self._clip = check_max_grad_norm(max_grad_norm)
        self._batch_size = check_expected_batch_size(expected_batch_size)
        self._sample_rate = check_sample_rate(sample_rate)
        self._view = as_view(view)
        self._private_weight = postprocess.check_private_weight(private_weight)
        self._shrinkage = postprocess.check_shrinkage(shrinkage)
        if not isinstance(protect_labels, bool):
            raise InvalidInputError(f"protect_labels must be a bool, got {protect_labels!r}")
        self._protect_labels = protect_labels
        if target_epsilon is not None and target_delta is None:
            raise InvalidInputError(
                "target_epsilon needs target_delta: pass target_delta= (e.g. 1 / dataset size)"
            )
        self._target_delta = (
            None if target_delta is None else check_delta(target_delta, "target_delta")
        )
        self._target_epsilon = (
            None if target_epsilon is None else check_target_epsilon(target_epsilon)
        )
        if self._target_epsilon is not None and self._sigma == 0:
            raise InvalidInputError(
                "target_epsilon needs noise_multiplier > 0: without noise epsilon is infinite"
            )
        if accountant not in ACCOUNTANTS:
            raise InvalidInputError(
                f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}"
            )
        self._accountant = accountant
        if noise_generator is not None and not isinstance(noise_generator, torch.Generator):
            raise InvalidInputError(
                f"noise_generator must be a torch.Generator or None, got "
                f"{type(noise_generator).__name__}"
            )
        self._generator = noise_generator
        self._model = model
        self._names = {id(p): name for name, p in model.named_parameters()}
        self._check_params(p for group in optimizer.param_groups for p in group["params"])
        if not isinstance(engine, str):
            raise InvalidInputError(f"engine must be a string, got {type(engine).__name__}")
        engine_cls = resolve_engine(engine, model)
        if self._autocast is not None and not engine_cls.autocast_safe:
            raise UnsupportedModelError(
                f"engine {engine_cls.name!r} does not keep the clipping bound under autocast "
                "(it reduces in low precision); pass engine='hooks', 'vmap' or 'reference'"
            )
        if self._dist is not None:  # a collective: every rank builds its optimizer here
            self._dist.check_same(
                {
                    "noise_multiplier": self._sigma,
                    "max_grad_norm": self._clip,
                    "expected_batch_size": self._batch_size,
                    "sample_rate": self._sample_rate,
                }
            )
        self._engine: Engine = engine_cls(model, loss_fn)

        self._inner = optimizer
        self._ledger = PrivacyLedger()
        self._steps = 0
        self._noiseless_steps = 0
        self._clipped_sum: dict[str, Tensor] | None = None
        # With private_weight != 1 or shrinkage the parts are kept apart: _clipped_sum then
        # holds the public sum and _private_sum the clipped private sum (see _accumulate).
        self._private_sum: dict[str, Tensor] | None = None
        self._budget_left: int | None = None  # steps the target still allows (cached)
        self.last_norms: Tensor | None = None
        self.last_clip_factors: Tensor | None = None
        self.last_public: Tensor | None = None
        self.last_private: Tensor | None = None

    # ------------------------------------------------------------------ configuration

    @property
    def original_optimizer(self) -> Optimizer:
        """The wrapped optimizer."""
        return self._inner

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def distributed(self) -> DistributedContext | None:
        """Rank and world of a ``DistributedDataParallel`` model, None for one process."""
        return self._dist

    @property
    def autocast(self) -> torch.dtype | None:
        return self._autocast

    @property
    def view(self) -> PublicView:
        return self._view

    @property
    def private_weight(self) -> float:
        return self._private_weight

    @property
    def shrinkage(self) -> str | None:
        return self._shrinkage

    @property
    def _post_processed(self) -> bool:
        """Whether the public and noisy private sums are released separately."""
        return self._private_weight != 1.0 or self._shrinkage is not None

    @property
    def noise_multiplier(self) -> float:
        return self._sigma

    @property
    def max_grad_norm(self) -> float:
        return self._clip

    @property
    def expected_batch_size(self) -> int:
        return self._batch_size

    @property
    def sample_rate(self) -> float:
        return self._sample_rate

    @property
    def protect_labels(self) -> bool:
        return self._protect_labels

    @property
    def target_epsilon(self) -> float | None:
        return self._target_epsilon

    @property
    def target_delta(self) -> float | None:
        return self._target_delta

    @property
    def accountant(self) -> str:
        return self._accountant

    @property
    def steps(self) -> int:
        """Steps taken (noisy and noiseless)."""
        return self._steps

    @property
    def ledger(self) -> PrivacyLedger:
        """A copy of the privacy ledger (steps with ``noise_multiplier > 0`` only)."""
        return self._ledger.copy()

    # torch.optim.Optimizer interface, delegated (LR schedulers read and write these).
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self._inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._inner.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self._inner.state

    @state.setter
    def state(self, value: Any) -> None:
        self._inner.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self._inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._inner.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer; its parameters must be trainable in ``model``."""
        params = param_group.get("params") if isinstance(param_group, Mapping) else None
        params = [params] if isinstance(params, Tensor) else list(params or [])
        self._check_params(params)
        self._inner.add_param_group(param_group)

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found normally: delegate to the inner optimizer.
        inner = self.__dict__.get("_inner")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"MaskDPOptimizer({type(self._inner).__name__}, noise_multiplier={self._sigma}, "
            f"max_grad_norm={self._clip}, expected_batch_size={self._batch_size}, "
            f"sample_rate={self._sample_rate}, view={self._view!r}, "
            f"engine={self._engine.name!r}, protect_labels={self._protect_labels}, "
            f"private_weight={self._private_weight}, shrinkage={self._shrinkage!r})"
        )

    def _check_params(self, params: Iterable[Tensor]) -> None:
        for p in params:
            name = self._names.get(id(p))
            if name is None or not p.requires_grad:
                raise InvalidInputError(
                    "the optimizer holds a parameter that is not a trainable parameter of "
                    f"model{'' if name is None else f' ({name}, requires_grad=False)'}; build "
                    "it from model.parameters() after freezing what you do not train"
                )

    def _released(self) -> list[tuple[str, Tensor]]:
        """(name, parameter) of every parameter the inner optimizer updates, in its order."""
        return [(self._names[id(p)], p) for g in self._inner.param_groups for p in g["params"]]

    # ------------------------------------------------------------------ the phases

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the accumulated clipped sum and clear the inner optimizer's gradients."""
        self._clipped_sum = self._private_sum = None
        self._inner.zero_grad(set_to_none=set_to_none)

    def backward(
        self, inputs: Tensor, mask: Tensor, targets: Tensor, *, present: Tensor | None = None
    ) -> Tensor:
        r"""Clip and accumulate one batch; return its mean per-sample full-view loss (detached).

        Adds :math:`\sum_i h_i + \sum_i c_i \Delta_i` of the batch to the sum accumulated
        since the last :meth:`zero_grad` or :meth:`step`. Several calls before one step
        split one Poisson batch into chunks (virtual batches): all chunks between two steps
        must together be ONE Poisson sample at ``sample_rate``, otherwise the accounting is
        wrong. ``present`` (bool, N) erases records (their :math:`\Delta_i = 0`; for tests
        and audits).

        The returned loss and :attr:`last_norms`, :attr:`last_clip_factors`,
        :attr:`last_public`, :attr:`last_private` (of the last call) are computed from
        sensitive content without noise: they are **not private**; logging or acting on them
        is outside the guarantee (debugging only).
        """
        batch = make_batch(
            self._view, inputs, mask, targets, protect_labels=self._protect_labels, present=present
        )
        with precision.autocast(self._autocast, inputs.device):
            result = self._engine.compute(batch, max_grad_norm=self._clip)
        self._accumulate(result)
        return result.loss.detach()

    def _accumulate(self, result: MaskedGradient) -> None:
        names = [name for name, _ in self._released()]
        missing = [n for n in names if n not in result.private]
        if missing:
            raise InvalidInputError(
                f"parameters {missing} are in the optimizer but the engine gave no gradient "
                "for them (requires_grad turned off after building the optimizer?)"
            )
        dtypes = {name: p.dtype for name, p in self._released()}  # fp32 even under autocast
        if self._post_processed:  # keep the parts apart: _clipped_sum holds the public sum
            total = {n: result.public[n].to(dtypes[n]) for n in names}
            private = {n: result.private[n].to(dtypes[n]) for n in names}
            self._private_sum = _add(self._private_sum, private)
        else:
            total = {
                n: result.public[n].to(dtypes[n]) + result.private[n].to(dtypes[n]) for n in names
            }
        self._clipped_sum = _add(self._clipped_sum, total)
        self.last_norms = result.norms.detach()
        self.last_clip_factors = result.clip_factors.detach()
        self.last_public = _sum_norm(result.public.values())
        self.last_private = _sum_norm(result.private.values())

    def _clipped(self) -> dict[str, Tensor]:
        """The accumulated clipped sum, zeros when no batch was seen (an empty batch).

        With post-processing (``private_weight`` or ``shrinkage``) it is the public sum.
        """
        return self._as_released(self._clipped_sum)

    def _as_released(self, sums: dict[str, Tensor] | None) -> dict[str, Tensor]:
        """``sums`` in the released parameters' order, zeros for an empty batch."""
        released = self._released()
        if sums is None:
            return {name: torch.zeros_like(p) for name, p in released}
        return {name: sums[name] for name, _ in released}

    def add_noise(self) -> None:
        r"""``p.grad`` = clipped sum :math:`+\,N(0, \sigma^2 C^2 I)`, always (see :mod:`maskdp.noise`).

        Distributed: rank 0 alone adds the noise, then the ranks' sums are all-reduced, so
        the noise enters the global sum exactly once (:mod:`maskdp.distributed`).
        """
        main = self._dist is None or self._dist.is_main
        if self._post_processed:
            self._add_noise_then_post_process(main)
            return
        noisy = noise.add_noise(
            self._clipped(),
            noise_multiplier=self._sigma if main else 0.0,
            max_grad_norm=self._clip,
            generator=self._generator,
        )
        if self._dist is not None:
            noisy = self._dist.all_reduce_sum(noisy)
        for name, p in self._released():
            p.grad = noisy[name].to(p.dtype)

    def _add_noise_then_post_process(self, main: bool) -> None:
        r"""``p.grad`` = :math:`\sum_i h_i + w\, s(Z)`, :math:`Z` = private sum + noise.

        The noise is added to the private sum first (same draws as the default path), and
        only the released :math:`Z` and the public sum enter :func:`maskdp.postprocess.combine`.
        """
        public = self._clipped()
        noisy = noise.add_noise(
            self._as_released(self._private_sum),
            noise_multiplier=self._sigma if main else 0.0,
            max_grad_norm=self._clip,
            generator=self._generator,
        )
        if self._dist is not None:
            public = self._dist.all_reduce_sum(public)
            noisy = self._dist.all_reduce_sum(noisy)
        released = postprocess.combine(
            public,
            noisy,
            private_weight=self._private_weight,
            shrinkage=self._shrinkage,
            noise_std=self._sigma * self._clip,
        )
        for name, p in self._released():
            p.grad = released[name].to(p.dtype)

    def scale(self) -> None:
        """``p.grad`` /= the expected batch size (never the realised one)."""
        grads = {name: p.grad for name, p in self._released()}
        scaled = noise.scale(grads, expected_batch_size=self._batch_size)
        for name, p in self._released():
            p.grad = scaled[name]

    def account(self) -> None:
        """Record one step at (q, sigma); a noiseless step makes :meth:`epsilon` infinite."""
        if self._sigma > 0:
            self._ledger.record(self._sample_rate, self._sigma, 1)
        else:
            self._noiseless_steps += 1
        self._steps += 1
        if self._budget_left is not None:
            self._budget_left -= 1

    def _epsilon_after(self, more_steps: int) -> float:
        """Epsilon of the ledger plus ``more_steps`` steps at (q, sigma)."""
        trial = self._ledger.copy()
        trial.record(self._sample_rate, self._sigma, more_steps)
        return trial.epsilon(self._target_delta, accountant=self._accountant)

    def _steps_within_budget(self) -> int:
        """The largest m with epsilon(ledger + m steps) <= target (capped at 2**31).

        Exponential search then bisection, so a run queries the accountant O(log m) times
        instead of once per step. The returned m is checked directly (its epsilon is at most
        the target) and m + 1 is checked to exceed it, assuming epsilon non-decreasing in the
        number of steps (true of both accountants' guarantees).
        """
        target = self._target_epsilon
        if self._epsilon_after(1) > target:
            return 0
        low, high = 1, 2
        while high <= _MAX_GUARDED_STEPS and self._epsilon_after(high) <= target:
            low, high = high, 2 * high
        if high > _MAX_GUARDED_STEPS:
            return low
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if self._epsilon_after(mid) <= target else (low, mid)
        return low

    def check_budget(self) -> None:
        """Raise :class:`PrivacyBudgetExceeded` if one more step would pass the target."""
        if self._target_epsilon is None:
            return
        if self._budget_left is None:
            self._budget_left = self._steps_within_budget()
        if self._budget_left == 0:
            eps = self._epsilon_after(1)
            raise PrivacyBudgetExceeded(
                f"step {self._steps + 1} would spend epsilon {eps:.6g} > target_epsilon "
                f"{self._target_epsilon:g} at delta {self._target_delta:g} ({self._accountant}); "
                "stop training or raise the target"
            )

    def pre_step(self) -> None:
        """Budget check, noise, scale and account; leaves noisy means in ``p.grad``."""
        self.check_budget()
        self.add_noise()
        self.scale()
        self.account()
        self._clipped_sum = self._private_sum = None

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One MaskDP-SGD step (see module docstring); a step with no batch is an empty batch.

        ``closure``, if given, runs first (with gradients enabled) and should call
        :meth:`backward`; its value is returned. The accumulated sum is consumed: the next
        step releases only batches seen after this one.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.pre_step()
        self._inner.step()
        return loss

    # ------------------------------------------------------------------ privacy spent

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at ``delta`` (default ``target_delta``), with ``accountant``.

        An upper bound (RDP bound, or PRV's upper bound). ``0.0`` before the first step;
        ``math.inf`` once a step without noise (``noise_multiplier = 0``) was taken.
        """
        if delta is None:
            if self._target_delta is None:
                raise InvalidInputError(
                    "epsilon needs a delta: call epsilon(delta) or set target_delta"
                )
            delta = self._target_delta
        delta = check_delta(delta)
        if self._noiseless_steps:
            return math.inf
        if self._ledger.steps == 0:
            return 0.0
        return self._ledger.epsilon(delta, accountant=self._accountant)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Inner optimizer state, ledger (JSON-compatible dict), step counts, generator state."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "optimizer": self._inner.state_dict(),
            "ledger": self._ledger.to_dict(),
            "steps": self._steps,
            "noiseless_steps": self._noiseless_steps,
            "noise_generator": None if self._generator is None else self._generator.get_state(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; everything is validated before anything changes.

        A saved generator state needs a ``noise_generator`` here (same device). The
        accumulated clipped sum is cleared.
        """
        if not isinstance(state_dict, Mapping) or state_dict.get("format") != FORMAT:
            raise InvalidInputError(
                "state_dict is not a MaskDPOptimizer state (missing format "
                f"{FORMAT!r}); for a plain optimizer state use original_optimizer.load_state_dict"
            )
        if state_dict.get("version") != FORMAT_VERSION:
            raise InvalidInputError(
                f"state_dict version must be {FORMAT_VERSION}, got {state_dict.get('version')!r}"
            )
        missing = {"optimizer", "ledger", "steps", "noiseless_steps", "noise_generator"} - set(
            state_dict
        )
        if missing:
            raise InvalidInputError(f"state_dict lacks {sorted(missing)}")
        try:
            ledger = PrivacyLedger.from_dict(state_dict["ledger"])
        except (AccountingError, ValueError, TypeError) as err:
            raise InvalidInputError(f"state_dict ledger is invalid: {err}") from None
        steps, noiseless = state_dict["steps"], state_dict["noiseless_steps"]
        for name, value in (("steps", steps), ("noiseless_steps", noiseless)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInputError(f"state_dict {name} must be an int >= 0, got {value!r}")
        if steps != ledger.steps + noiseless:
            raise InvalidInputError(
                f"state_dict steps ({steps}) != ledger steps ({ledger.steps}) + noiseless "
                f"steps ({noiseless}): the checkpoint is inconsistent"
            )
        gen_state = state_dict["noise_generator"]
        if gen_state is not None:
            if self._generator is None:
                raise InvalidInputError(
                    "state_dict holds a noise generator state; pass noise_generator= to restore it"
                )
            try:
                torch.Generator(device=self._generator.device).set_state(gen_state)
            except (RuntimeError, TypeError) as err:
                raise InvalidInputError(
                    f"state_dict noise_generator state is invalid: {err}"
                ) from None
        inner = state_dict["optimizer"]
        if not isinstance(inner, Mapping) or len(inner.get("param_groups", ())) != len(
            self._inner.param_groups
        ):
            raise InvalidInputError(
                "state_dict optimizer state does not match the wrapped optimizer's param groups"
            )
        try:
            self._inner.load_state_dict(inner)  # torch checks group sizes before changing state
        except (ValueError, KeyError, TypeError) as err:
            raise InvalidInputError(f"state_dict optimizer state is invalid: {err}") from None
        self._ledger = ledger
        self._steps = steps
        self._noiseless_steps = noiseless
        self._budget_left = None
        if gen_state is not None:
            self._generator.set_state(gen_state)
        self._clipped_sum = self._private_sum = None

    def close(self) -> None:
        """Release the engine's hooks on the model."""
        self._engine.close()
