"""``OptimizerWrapper``: a torch ``Optimizer`` that delegates to the one it wraps.

What any drop-in wrapper of a torch optimizer needs (Opacus ``DPOptimizer`` does the same):
``param_groups``, ``state`` and ``defaults`` are the inner optimizer's, unknown attributes
are looked up there, and every parameter it updates must be a trainable parameter of the
model (the clipped, noised gradient covers exactly those).
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from maskdp.engines.base import accumulation_dtype
from maskdp.errors import InvalidInputError


def load_inner_state(inner: Optimizer, state: Any) -> None:
    """Load the wrapped optimizer's state; torch checks group sizes before changing any."""
    if not isinstance(state, Mapping) or len(state.get("param_groups", ())) != len(
        inner.param_groups
    ):
        raise InvalidInputError(
            "state_dict optimizer state does not match the wrapped optimizer's param groups"
        )
    try:
        inner.load_state_dict(state)  # type: ignore[arg-type]
    except (ValueError, KeyError, TypeError) as err:
        raise InvalidInputError(f"state_dict optimizer state is invalid: {err}") from None


class OptimizerWrapper(Optimizer):
    """Delegates to ``optimizer``, whose parameters must be trainable parameters of ``model``."""

    def __init__(self, optimizer: Optimizer, model: nn.Module) -> None:  # noqa: D107
        # Optimizer.__init__ is not called: the state lives in the inner optimizer.
        if not isinstance(optimizer, Optimizer) or isinstance(optimizer, OptimizerWrapper):
            raise InvalidInputError(
                f"optimizer must be a torch.optim.Optimizer (not already wrapped), got "
                f"{type(optimizer).__name__}"
            )
        self._inner = optimizer
        self._names = {id(p): name for name, p in model.named_parameters()}
        self._check_params(p for group in optimizer.param_groups for p in group["params"])

    @property
    def original_optimizer(self) -> Optimizer:
        """The wrapped optimizer."""
        return self._inner

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

    def _select(
        self, sums: dict[str, Tensor], among: Container[str] | None = None
    ) -> dict[str, Tensor]:
        """The released parameters' entries of ``sums`` (those ``among`` names, if given), in
        float32 or wider."""
        released = [(n, p) for n, p in self._released() if among is None or n in among]
        missing = [name for name, _ in released if name not in sums]
        if missing:
            raise InvalidInputError(
                f"parameters {missing} are in the optimizer but the engine gave no gradient "
                "for them (requires_grad turned off after building the optimizer?)"
            )
        return {name: sums[name].to(accumulation_dtype(p.dtype)) for name, p in released}

    def _zeros(self, among: Container[str] | None = None) -> dict[str, Tensor]:
        return {
            name: torch.zeros(p.shape, dtype=accumulation_dtype(p.dtype), device=p.device)
            for name, p in self._released()
            if among is None or name in among
        }
