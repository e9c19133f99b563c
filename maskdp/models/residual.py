r"""A public model plus a private residual branch, their logits added.

:math:`f(x) = f_{pub}(x) + f_{res}(x)`: with ``private_term="full"`` and
``private_parameters=PrivateResidual.PRIVATE`` (what ``maskdp train --private-branch``
passes), the ``public`` model learns from public views alone (noise-free) and the
``residual`` branch from the private term alone, DP-SGD's clipped and noised :math:`g_i` on
full clips (:mod:`maskdp.mechanism.subset` states the update and proves it private). The
branch learns what the public model cannot see: on the real-footage task whose label depends
on the sensitive scene, the public model learns the action and the branch the scene.

As a product of experts (Hinton 2002), :math:`\mathrm{softmax}(f_{pub} + f_{res})
\propto p_{pub} \cdot p_{res}`, and the branch starts as the uniform expert: its last
:class:`~torch.nn.Linear` is zero-initialised, so the sum starts as the public model and
the private term's noise moves only the branch, never the public model's weights. The
public term fits the public model alone (:meth:`PrivateResidual.public_pass`): fitted
through the sum, it would learn to cancel the branch on public views, and with it on full
clips.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from maskdp.errors import InvalidInputError


class PrivateResidual(nn.Module):
    """``public(x) + residual(x)`` (module docstring). ``zero_init``: zero the residual
    branch's last ``nn.Linear`` so the sum starts as the public model."""

    #: The ``private_parameters`` that select the branch.
    PRIVATE: tuple[str, ...] = ("residual",)

    def __init__(self, public: nn.Module, residual: nn.Module, *, zero_init: bool = True) -> None:
        super().__init__()
        for name, module in (("public", public), ("residual", residual)):
            if not isinstance(module, nn.Module):
                raise InvalidInputError(
                    f"PrivateResidual: {name} must be an nn.Module, got {type(module).__name__}"
                )
        if public is residual:
            raise InvalidInputError(
                "PrivateResidual: public and residual must be two models (the branch learns "
                "from the private term alone)"
            )
        self.public = public
        self.residual = residual
        self._public_only = False
        if zero_init:
            linears = [m for m in residual.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise InvalidInputError(
                    "PrivateResidual: the residual branch has no nn.Linear to zero-initialise; "
                    "pass zero_init=False"
                )
            nn.init.zeros_(linears[-1].weight)
            if linears[-1].bias is not None:
                nn.init.zeros_(linears[-1].bias)

    @contextmanager
    def public_pass(self) -> Iterator[None]:
        """Within the block the model is the public model alone: the public term fits it to
        public views on its own, so it never learns to cancel the branch (whose output on
        public views is meaningless). ``MaskDPOptimizer`` enters it for the public pass of
        ``private_term="full"``; any model may offer the same protocol."""
        self._public_only = True
        try:
            yield
        finally:
            self._public_only = False

    @property
    def supports_token_drop(self) -> bool:
        """The token-drop protocol (:class:`~maskdp.mechanism.views.DropView`) is the
        public model's: a public view reaches the public model alone."""
        return bool(getattr(self.public, "supports_token_drop", False))

    @property
    def tubelet_size(self) -> Any:
        return self.public.tubelet_size

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        if self._public_only:
            return self.public(x, **kwargs)
        return self.public(x, **kwargs) + self.residual(x, **self._residual_kwargs(kwargs))

    def _residual_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``drop_tokens`` reaches a branch that implements token drop; another branch sees
        the clip as given (under DropView, its sensitive pixels already filled)."""
        if getattr(self.residual, "supports_token_drop", False):
            return kwargs
        return {k: v for k, v in kwargs.items() if k != "drop_tokens"}
