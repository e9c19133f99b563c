r"""``MaskDPOptimizer``: MaskDP-SGD as a drop-in wrapper around any torch optimizer.

One step (DESIGN.md section 3), each phase a method as in Opacus
``optimizers/optimizer.py``:

1. :meth:`~MaskDPOptimizer.backward` (clip and accumulate): for the private Poisson batch
   :math:`P` the engine returns :math:`\sum_{i \in P} c_i \Delta_i`; for the public batch
   :math:`U`, drawn independently of :math:`P`, :math:`\sum_{j \in U} h_j`. Several calls
   before a step add up (virtual batches).
2. :meth:`~MaskDPOptimizer.add_noise`: :math:`Z = \sum_P c_i \Delta_i + N(0, \sigma^2 C^2 I)`
   on every step (an empty batch included), drawn from secret randomness
   (:mod:`maskdp.mechanism.randomness`) in float32 or wider.
3. :meth:`~MaskDPOptimizer.scale`: ``p.grad`` :math:`= \frac{1}{B_{pub}} \sum_U h_j +
   \frac{w}{B} s(Z)`, with the *expected* batch sizes :math:`B = qN` and :math:`B_{pub}`
   (:mod:`maskdp.mechanism.postprocess`; :math:`w = 1`, :math:`s(Z) = Z` by default).
4. :meth:`~MaskDPOptimizer.account`: one Poisson-subsampled Gaussian step
   :math:`(q, \sigma)` in the ledger.
5. the inner optimizer's ``step``.

Usage (``make_private`` builds the optimizer and a loader that yields both batches)::

    model, optimizer, loader = maskdp.make_private(model, torch.optim.AdamW(model.parameters()),
        DataLoader(dataset, batch_size=64), noise_multiplier=1.0, max_grad_norm=1.0,
        loss_fn=torch.nn.CrossEntropyLoss(), view=maskdp.FillView(0.0))
    for private, public in loader:
        optimizer.backward(*private, public=public)
        optimizer.step()

The guarantee is that of the subsampled Gaussian mechanism with sensitivity :math:`C` under
the ``erase`` relation, and holds only if the private batches come from Poisson sampling at
rate ``sample_rate`` with secret randomness, and the public batches are drawn independently
of them (docs/privacy.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from maskdp.accounting.errors import AccountingError
from maskdp.accounting.ledger import ACCOUNTANTS, PrivacyLedger
from maskdp.checks import (
    check_batch_size,
    check_delta,
    check_max_grad_norm,
    check_noise_multiplier,
    check_sample_rate,
    check_target_epsilon,
)
from maskdp.engines.base import Engine, PerSampleLoss, accumulation_dtype, resolve_engine
from maskdp.engines.probe import ModelGuard
from maskdp.engines.validate import validate_model
from maskdp.errors import InvalidInputError, PrivacyBudgetExceeded, UnsupportedModelError
from maskdp.mechanism import noise, postprocess
from maskdp.mechanism.gradient import Records, check_public_batch, make_batch, public_gradient
from maskdp.mechanism.randomness import Randomness, check_randomness, is_replayable, private_scope
from maskdp.mechanism.views import PublicView, as_view
from maskdp.training import precision
from maskdp.training.budget import epsilon_after, steps_within_budget
from maskdp.training.distributed import DistributedContext, unwrap_ddp

FORMAT = "maskdp-optimizer"
FORMAT_VERSION = 2
Sums = dict[str, Tensor]


def _same_storage(a: Tensor, b: Tensor) -> bool:
    """Whether two non-empty tensors are views of the same memory (the same batch)."""
    return (
        a.numel() > 0
        and b.numel() > 0
        and a.untyped_storage().data_ptr() == (b.untyped_storage().data_ptr())
    )


def _add(total: Sums | None, more: Sums) -> Sums:
    return more if total is None else {n: total[n] + more[n] for n in more}


class MaskDPOptimizer(Optimizer):
    r"""Wrap ``optimizer`` so that each step is a MaskDP-SGD step.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over trainable parameters of ``model``.
        model: the model (never modified or wrapped; engines hook it). Refused if it holds a
            layer that mixes samples (BatchNorm): :func:`maskdp.engines.validate.validate_model`.
        loss_fn: a loss module (its ``reduction`` is ignored: per-sample losses are summed
            and divided by ``expected_batch_size``) or a per-sample callable.
        noise_multiplier: :math:`\sigma \ge 0`. ``0`` is for tests only: no privacy,
            :meth:`epsilon` reports ``math.inf`` once such a step was taken, and the step
            is not written to the ledger (a Gaussian event needs :math:`\sigma > 0`).
        max_grad_norm: the clipping norm :math:`C` of :math:`\Delta_i = g_i - h_i`. It is
            taken over *all* trainable parameters of ``model``; set ``requires_grad=False``
            on parameters you do not train.
        expected_batch_size: :math:`B = qN`, the divisor of the private term (fixed, never
            the realised batch size).
        sample_rate: the Poisson sampling rate :math:`q \in (0, 1]` of the private batch.
        expected_public_batch_size: :math:`B_{pub}`, the divisor of the public term
            (default ``expected_batch_size``).
        view: the public view (default ``FillView(0.5)``, see :func:`maskdp.mechanism.views.as_view`)
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
        randomness: where the noise comes from: ``None`` (default) draws it from the OS
            entropy pool, secret and stateless (:mod:`maskdp.mechanism.randomness`). Only tests pass
            :class:`~maskdp.mechanism.randomness.InsecureSeededRandomness` (replayable: no privacy).
        autocast: ``torch.bfloat16`` or ``torch.float16`` runs each engine call under
            ``torch.autocast`` (low-precision forward passes); clipped sums, noise and the
            divisions stay in float32 or wider (:mod:`maskdp.training.precision`).
        private_weight: :math:`w \ge 0`: the step uses
            :math:`\frac{1}{B_{pub}}\sum_U h_j + \frac{w}{B} Z` with
            :math:`Z = \sum_P c_i \Delta_i + N(0, \sigma^2 C^2 I)` the noisy private sum
            (noise added *before* weighting; :math:`w < 1` trades the private term's bias
            for less noise). Post-processing of the released :math:`(\sum_U h_j, Z)`, so
            free in privacy (:mod:`maskdp.mechanism.postprocess`). Default 1: plain MaskDP-SGD.
        shrinkage: ``None`` or ``"james-stein"``: per parameter tensor, replace :math:`Z`
            by its positive-part James-Stein shrinkage toward zero, computed from :math:`Z`,
            :math:`\sigma`, :math:`C` and the dimension only (post-processing too).

    Distributed data parallel: pass ``model=DistributedDataParallel(model)``. Engines then
    run on ``model.module``; each rank's sums are all-reduced, rank 0 alone adds the noise,
    and every rank divides by the *global* expected batch sizes and accounts one step
    (:mod:`maskdp.training.distributed`). Each rank must feed its shard of the global batches
    (:func:`maskdp.training.private.make_private` does).
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
        expected_public_batch_size: int | None = None,
        view: PublicView | Callable[[Tensor, Tensor], Tensor] | None = None,
        engine: str = "auto",
        protect_labels: bool = False,
        target_epsilon: float | None = None,
        target_delta: float | None = None,
        accountant: str = "rdp",
        randomness: Randomness | None = None,
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
        self._batch_size = check_batch_size(expected_batch_size)
        self._public_batch_size = (
            self._batch_size
            if expected_public_batch_size is None
            else check_batch_size(expected_public_batch_size, "expected_public_batch_size")
        )
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
        self._randomness = check_randomness(randomness)
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
                    "expected_public_batch_size": self._public_batch_size,
                    "sample_rate": self._sample_rate,
                    # A difference below would pair different all-reduces across ranks.
                    "protect_labels": float(self._protect_labels),
                    "private_weight": self._private_weight,
                    "shrinkage": float(self._shrinkage is not None),
                    "autocast": float((None, torch.float16, torch.bfloat16).index(self._autocast)),
                    "released tensors": float(
                        sum(len(group["params"]) for group in optimizer.param_groups)
                    ),
                    "released values": float(
                        sum(p.numel() for group in optimizer.param_groups for p in group["params"])
                    ),
                }
            )
        self._engine: Engine = engine_cls(model, loss_fn)
        self._guard = ModelGuard(model)

        self._inner = optimizer
        self._ledger = PrivacyLedger()
        self._steps = 0
        self._noiseless_steps = 0
        self._public_sum: Sums | None = None
        self._private_sum: Sums | None = None
        self._noisy_private: Sums | None = None
        self._budget_left: int | None = None  # steps the target still allows (cached)
        #: Norms and clip factors of the last private batch: computed from sensitive
        #: content without noise, **not private** (tests and debugging only).
        self.last_norms: Tensor | None = None
        self.last_clip_factors: Tensor | None = None

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
    def expected_public_batch_size(self) -> int:
        return self._public_batch_size

    @property
    def randomness(self) -> Randomness:
        return self._randomness

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

    #: Attributes computed from the private batch without noise: never pickled.
    _UNRELEASED = ("last_norms", "last_clip_factors", "_private_sum", "_noisy_private")

    def __getstate__(self) -> dict[str, Any]:
        """The optimizer's state for pickling, without anything un-noised from the private
        batch (the accumulated clipped sum, the last norms and clip factors)."""
        return {k: (None if k in self._UNRELEASED else v) for k, v in self.__dict__.items()}

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
        """Forget the accumulated sums and clear the inner optimizer's gradients."""
        self._public_sum = self._private_sum = self._noisy_private = None
        self._inner.zero_grad(set_to_none=set_to_none)

    def backward(
        self,
        inputs: Tensor,
        mask: Tensor,
        targets: Tensor,
        *,
        public: Records | None = None,
        present: Tensor | None = None,
    ) -> Tensor:
        r"""Clip and accumulate one private batch and one public batch; return the public loss.

        ``(inputs, mask, targets)`` is the private Poisson batch :math:`P`; ``public`` the
        public batch :math:`U`, drawn independently of :math:`P` (required, except with
        ``protect_labels``). Adds :math:`\sum_P c_i \Delta_i` and :math:`\sum_U h_j` to the
        sums accumulated since the last step. Several calls before one step split the batches
        into chunks (virtual batches): the private chunks between two steps must together be
        ONE Poisson sample at ``sample_rate``. ``present`` (bool, N) erases private records
        (their :math:`\Delta_i = 0`; tests and audits).

        Returns the mean public-view loss over :math:`U` (a public figure, safe to show;
        ``nan`` without a public batch). Nothing computed from the private batch is returned.
        """
        public_batch = check_public_batch(public, self._protect_labels)
        if public_batch is not None and _same_storage(public_batch[0], inputs):
            raise InvalidInputError(
                "public= holds the private batch itself: the public batch must be drawn "
                "independently of the private one (a public term over the private batch "
                "reveals which records were sampled); use the second item of make_private's "
                "loader"
            )
        # The private side on a random stream of its own (maskdp.mechanism.randomness.private_scope):
        # what it draws never shifts the streams the public batch uses.
        with self._guard.watch(), precision.autocast(self._autocast, inputs.device):
            with private_scope(self._randomness, inputs.device):
                batch = make_batch(
                    self._view,
                    inputs,
                    mask,
                    targets,
                    protect_labels=self._protect_labels,
                    present=present,
                    guard=self._guard,
                )
                clipped = self._engine.compute(batch, max_grad_norm=self._clip)
            if public_batch is not None:
                public_sum, loss, count = public_gradient(
                    self._model, self._engine.loss_fn, self._view, public_batch
                )
        self._private_sum = _add(self._private_sum, self._select(clipped.private))
        self.last_norms, self.last_clip_factors = clipped.norms, clipped.clip_factors
        if public_batch is None:
            return torch.full((), math.nan)
        self._public_sum = _add(self._public_sum, self._select(public_sum))
        return loss / count if count else torch.full((), math.nan)

    def _select(self, sums: Sums) -> Sums:
        """The released parameters' entries of ``sums``, in float32 or wider."""
        missing = [name for name, _ in self._released() if name not in sums]
        if missing:
            raise InvalidInputError(
                f"parameters {missing} are in the optimizer but the engine gave no gradient "
                "for them (requires_grad turned off after building the optimizer?)"
            )
        return {name: sums[name].to(accumulation_dtype(p.dtype)) for name, p in self._released()}

    def _zeros(self) -> Sums:
        return {
            name: torch.zeros(p.shape, dtype=accumulation_dtype(p.dtype), device=p.device)
            for name, p in self._released()
        }

    def add_noise(self) -> None:
        r""":math:`Z = \sum_P c_i \Delta_i + N(0, \sigma^2 C^2 I)`, always (an empty batch too).

        Drawn from :attr:`randomness` in float32 or wider. Distributed: rank 0 alone adds the
        noise, then the ranks' sums are all-reduced, so the noise enters the global sum
        exactly once (:mod:`maskdp.training.distributed`).
        """
        private = self._private_sum if self._private_sum is not None else self._zeros()
        main = self._dist is None or self._dist.is_main
        std = self._sigma * self._clip if main else 0.0
        private = noise.add_noise(private, std=std, randomness=self._randomness)
        if self._dist is not None:
            private = self._dist.all_reduce_sum(private)
        self._noisy_private = private

    def scale(self) -> None:
        r"""``p.grad`` :math:`= \frac{1}{B_{pub}}\sum_U h_j + \frac{w}{B} s(Z)` (expected sizes)."""
        if self._noisy_private is None:
            raise InvalidInputError("scale() needs add_noise() first: the step has no noise yet")
        public = self._public_sum if self._public_sum is not None else self._zeros()
        if self._dist is not None and not self._protect_labels:
            public = self._dist.all_reduce_sum(public)
        released = postprocess.release(
            public,
            self._noisy_private,
            public_batch_size=self._public_batch_size,
            expected_batch_size=self._batch_size,
            private_weight=self._private_weight,
            shrinkage=self._shrinkage,
            noise_std=self._sigma * self._clip,
        )
        for name, p in self._released():
            p.grad = released[name].to(p.dtype)

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
        return epsilon_after(
            self._ledger,
            more_steps,
            sample_rate=self._sample_rate,
            noise_multiplier=self._sigma,
            delta=self._target_delta,
            accountant=self._accountant,
        )

    def check_budget(self) -> None:
        """Raise :class:`PrivacyBudgetExceeded` if one more step would pass the target."""
        if self._target_epsilon is None:
            return
        if self._budget_left is None:
            self._budget_left = steps_within_budget(
                self._ledger,
                target_epsilon=self._target_epsilon,
                sample_rate=self._sample_rate,
                noise_multiplier=self._sigma,
                delta=self._target_delta,
                accountant=self._accountant,
            )
        if self._budget_left == 0:
            eps = self._epsilon_after(1)
            raise PrivacyBudgetExceeded(
                f"step {self._steps + 1} would spend epsilon {eps:.6g} > target_epsilon "
                f"{self._target_epsilon:g} at delta {self._target_delta:g} ({self._accountant}); "
                "stop training or raise the target"
            )

    def pre_step(self) -> None:
        """Budget check, noise, scale and account; leaves the released gradient in ``p.grad``."""
        self.check_budget()
        self.add_noise()
        self.scale()
        self.account()
        self._public_sum = self._private_sum = self._noisy_private = None

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One MaskDP-SGD step (see module docstring); a step with no batch is an empty batch.

        ``closure``, if given, runs first (with gradients enabled) and should call
        :meth:`backward`; its value is returned. The accumulated sums are consumed: the next
        step releases only batches seen after this one (no ``zero_grad`` is needed).
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
        """Inner optimizer state, ledger (JSON-compatible dict) and step counts.

        Secret randomness has no state, so nothing here replays the noise. Only a test's
        :class:`~maskdp.mechanism.randomness.InsecureSeededRandomness` adds its state, under the key
        ``"insecure_randomness"`` (such a checkpoint must stay as secret as the data).
        """
        state = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "optimizer": self._inner.state_dict(),
            "ledger": self._ledger.to_dict(),
            "steps": self._steps,
            "noiseless_steps": self._noiseless_steps,
        }
        if is_replayable(self._randomness):
            state["insecure_randomness"] = self._randomness.state_dict()  # type: ignore[attr-defined]
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; everything is validated before anything changes.

        A saved ``insecure_randomness`` state is restored only into the same kind of
        randomness. The accumulated sums are cleared.
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
        missing = {"optimizer", "ledger", "steps", "noiseless_steps"} - set(state_dict)
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
        replay = state_dict.get("insecure_randomness")
        if replay is not None:
            if not is_replayable(self._randomness):
                raise InvalidInputError(
                    "state_dict holds an insecure (seeded) randomness state; this optimizer "
                    "draws secret randomness and will not replay it"
                )
            self._randomness.check_state(replay)  # type: ignore[attr-defined]
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
        if replay is not None:
            self._randomness.load_state_dict(replay)  # type: ignore[attr-defined]
        self._public_sum = self._private_sum = self._noisy_private = None

    def close(self) -> None:
        """Release the engine's hooks on the model."""
        self._engine.close()
