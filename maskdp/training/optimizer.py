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
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from maskdp.accounting.ledger import PrivacyLedger
from maskdp.engines.base import Engine, PerSampleLoss, build_engine, resolve_engine
from maskdp.engines.probe import ModelGuard
from maskdp.engines.validate import validate_model
from maskdp.errors import InvalidInputError, UnsupportedModelError
from maskdp.mechanism import noise, postprocess, subset
from maskdp.mechanism.gradient import Records, check_public_batch, make_batch, public_gradient
from maskdp.mechanism.randomness import (
    Randomness,
    check_randomness,
    check_replay_state,
    is_replayable,
    private_scope,
)
from maskdp.settings import PrivacySettings, SettingAttribute, resolve_settings
from maskdp.training import precision
from maskdp.training.distributed import DistributedContext, unwrap_ddp
from maskdp.training.spent import PrivacySpent
from maskdp.training.wrapper import OptimizerWrapper, load_inner_state

FORMAT = "maskdp-optimizer"
FORMAT_VERSION = 2
Sums = dict[str, Tensor]


def _add(total: Sums | None, more: Sums) -> Sums:
    return more if total is None else {n: total[n] + more[n] for n in more}


class MaskDPOptimizer(OptimizerWrapper):
    r"""Wrap ``optimizer`` so that each step is a MaskDP-SGD step.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over trainable parameters of ``model``.
        model: the model (never modified or wrapped; engines hook it). Refused if it holds a
            layer that mixes samples (BatchNorm): :func:`maskdp.engines.validate.validate_model`.
        loss_fn: a loss module (its ``reduction`` is ignored: per-sample losses are summed
            and divided by ``expected_batch_size``) or a per-sample callable.
        settings: the mechanism's :class:`~maskdp.settings.PrivacySettings` (frozen,
            validated), or its fields as keyword arguments, which build one:
            ``noise_multiplier``, ``max_grad_norm``, ``sample_rate``, ``expected_batch_size``
            (required), ``expected_public_batch_size``, ``view``, ``engine``,
            ``protect_labels``, ``target_epsilon``, ``target_delta``, ``accountant``, ``relation``,
            ``autocast``, ``private_weight``, ``shrinkage``, ``private_parameters``.
        randomness: where the noise comes from: ``None`` (default) draws it from the OS
            entropy pool, secret and stateless (:mod:`maskdp.mechanism.randomness`). Only
            tests pass :class:`~maskdp.mechanism.randomness.InsecureSeededRandomness`
            (replayable: no privacy).

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
        settings: PrivacySettings | None = None,
        randomness: Randomness | None = None,
        **options: Any,
    ) -> None:
        # Validate everything before building anything (an invalid wrapper never exists).
        model, self._dist = unwrap_ddp(model)
        #: The mechanism's settings (frozen, validated): :class:`~maskdp.settings.PrivacySettings`.
        self.settings = resolve_settings(settings, options)
        validate_model(model)
        super().__init__(optimizer, model)
        self._randomness = check_randomness(randomness)
        self._model = model
        autocast = self.settings.autocast is not None
        engine_cls = resolve_engine(self.settings.engine, model)
        if autocast and self.settings.engine != "auto" and not engine_cls.autocast_safe:
            raise UnsupportedModelError(
                f"engine {engine_cls.name!r} does not keep the clipping bound under autocast "
                "(it reduces in low precision); pass engine='hooks', 'vmap' or 'reference'"
            )
        if self._dist is not None:  # a collective: every rank builds its optimizer here
            self._dist.check_same_settings(self.settings, optimizer)
        #: Names of the parameters that get the private term (:mod:`maskdp.mechanism.subset`).
        self._private_names = subset.resolve_private_parameters(
            model, self.settings.private_parameters
        )
        #: ``private_term="full"`` (:mod:`maskdp.mechanism.subset`).
        self._full_term = subset.is_full_term(model, self._private_names, self.settings)
        with subset.private_subset(model, self._private_names):
            self._engine: Engine = build_engine(
                self.settings.engine, model, loss_fn, autocast=autocast
            )
        self._guard = ModelGuard(model)

        self._spent = PrivacySpent(self.settings)
        self._public_sum: Sums | None = None
        self._private_sum: Sums | None = None
        self._noisy_private: Sums | None = None
        #: Norms and clip factors of the last private batch: computed from sensitive
        #: content without noise, **not private** (tests and debugging only).
        self.last_norms: Tensor | None = None
        self.last_clip_factors: Tensor | None = None

    # ------------------------------------------------------------------ configuration

    # Read-only views of :attr:`settings` (``optimizer.noise_multiplier`` etc.).
    autocast = SettingAttribute()
    view = SettingAttribute()
    private_weight = SettingAttribute()
    shrinkage = SettingAttribute()
    private_parameters = SettingAttribute()
    private_term = SettingAttribute()
    noise_multiplier = SettingAttribute()
    max_grad_norm = SettingAttribute()
    expected_batch_size = SettingAttribute()
    sample_rate = SettingAttribute()
    expected_public_batch_size = SettingAttribute()
    protect_labels = SettingAttribute()
    target_epsilon = SettingAttribute()
    target_delta = SettingAttribute()
    accountant = SettingAttribute()
    relation = SettingAttribute()

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
    def randomness(self) -> Randomness:
        return self._randomness

    @property
    def steps(self) -> int:
        """Steps taken (noisy and noiseless)."""
        return self._spent.steps

    @property
    def ledger(self) -> PrivacyLedger:
        """A copy of the privacy ledger (steps with ``noise_multiplier > 0`` only)."""
        return self._spent.ledger.copy()

    # torch.optim.Optimizer interface, delegated (LR schedulers read and write these).

    #: Attributes computed from the private batch without noise: never pickled.
    _UNRELEASED = ("last_norms", "last_clip_factors", "_private_sum", "_noisy_private")

    def __getstate__(self) -> dict[str, Any]:
        """The optimizer's state for pickling, without anything un-noised from the private
        batch (the accumulated clipped sum, the last norms and clip factors)."""
        return {k: (None if k in self._UNRELEASED else v) for k, v in self.__dict__.items()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        inner, engine = type(self._inner).__name__, self._engine.name
        return f"MaskDPOptimizer({inner}, engine={engine!r}, {self.settings!r})"

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
        public_batch = check_public_batch(public, self.settings.protect_labels, inputs)
        # The private side on a random stream of its own (maskdp.mechanism.randomness.private_scope):
        # what it draws never shifts the streams the public batch uses.
        with self._guard.watch(), precision.autocast(self.settings.autocast, inputs.device):
            with private_scope(self._randomness, inputs.device), self._private_pass():
                batch = make_batch(
                    self.settings.view,
                    inputs,
                    mask,
                    targets,
                    protect_labels=self.settings.protect_labels,
                    full_term=self._full_term,
                    present=present,
                    guard=self._guard,
                )
                clipped = self._engine.compute(batch, max_grad_norm=self.settings.max_grad_norm)
            if public_batch is not None:
                with subset.public_side(self._model, self._private_names, self._full_term):
                    public_sum, loss, count = public_gradient(
                        self._model, self._engine.loss_fn, self.settings.view, public_batch
                    )
                if self._full_term:  # the private branch learns from the private term alone
                    public_sum = {**self._zeros(self._private_names), **public_sum}
        private = self._select(clipped.private, self._private_names)
        self._private_sum = _add(self._private_sum, private)
        self.last_norms, self.last_clip_factors = clipped.norms, clipped.clip_factors
        if public_batch is None:
            return torch.full((), math.nan)
        self._public_sum = _add(self._public_sum, self._select(public_sum))
        return loss / count if count else torch.full((), math.nan)

    def _private_pass(self) -> AbstractContextManager[None]:
        """The private side runs with the parameters outside the private subset frozen."""
        return subset.private_subset(self._model, self._private_names)

    def add_noise(self) -> None:
        r""":math:`Z = \sum_P c_i \Delta_i + N(0, \sigma^2 C^2 I)`, always (an empty batch too).

        Drawn from :attr:`randomness` in float32 or wider. Distributed: rank 0 alone adds the
        noise, then the ranks' sums are all-reduced, so the noise enters the global sum
        exactly once (:mod:`maskdp.training.distributed`).
        """
        private = self._private_sum
        if private is None:
            private = self._zeros(self._private_names)
        main = self._dist is None or self._dist.is_main
        std = self.settings.noise_multiplier * self.settings.max_grad_norm if main else 0.0
        private = noise.add_noise(private, std=std, randomness=self._randomness)
        if self._dist is not None:
            private = self._dist.all_reduce_sum(private)
        self._noisy_private = private

    def scale(self) -> None:
        r"""``p.grad`` :math:`= \frac{1}{B_{pub}}\sum_U h_j + \frac{w}{B} s(Z)` (expected sizes)."""
        if self._noisy_private is None:
            raise InvalidInputError("scale() needs add_noise() first: the step has no noise yet")
        public = self._public_sum if self._public_sum is not None else self._zeros()
        if self._dist is not None and not self.settings.protect_labels:
            public = self._dist.all_reduce_sum(public)
        released = postprocess.release(
            public,
            self._noisy_private,
            public_batch_size=self.settings.expected_public_batch_size,
            expected_batch_size=self.settings.expected_batch_size,
            private_weight=self.settings.private_weight,
            shrinkage=self.settings.shrinkage,
            noise_std=self.settings.noise_multiplier * self.settings.max_grad_norm,
        )
        for name, p in self._released():
            p.grad = released[name].to(p.dtype)

    def account(self) -> None:
        """Record one step at (q, sigma) (:class:`~maskdp.training.spent.PrivacySpent`)."""
        self._spent.record_step()

    def check_budget(self) -> None:
        """Raise :class:`PrivacyBudgetExceeded` if one more step would pass the target."""
        self._spent.check_budget()

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
        """Epsilon spent so far at ``delta`` (default ``target_delta``), with ``accountant``:
        an upper bound; ``0.0`` before the first step, ``math.inf`` once a step without
        noise was taken."""
        return self._spent.epsilon(delta)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Inner optimizer state, ledger (JSON-compatible dict) and step counts.

        Secret randomness has no state, so nothing here replays the noise. Only a test's
        :class:`~maskdp.mechanism.randomness.InsecureSeededRandomness` adds its state, under
        the key ``"insecure_randomness"`` (such a checkpoint must stay as secret as the data).
        """
        state = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "optimizer": self._inner.state_dict(),
            **self._spent.to_dict(),
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
        if "optimizer" not in state_dict:
            raise InvalidInputError("state_dict lacks ['optimizer']")
        spent = PrivacySpent.from_dict(self.settings, state_dict)
        replay = state_dict.get("insecure_randomness")
        check_replay_state(self._randomness, replay)
        load_inner_state(self._inner, state_dict["optimizer"])
        self._spent = spent
        if replay is not None:
            self._randomness.load_state_dict(replay)  # type: ignore[attr-defined]
        self._public_sum = self._private_sum = self._noisy_private = None

    def close(self) -> None:
        """Release the engine's hooks on the model."""
        self._engine.close()
