r"""Linear-form layers: per-sample weight gradient :math:`G^\top A` over rows.

:class:`LinearForm` describes such a layer by how it turns its input ``A`` and output
gradient ``G`` into rows; it provides both branches (instantiation by batched GEMM, ghost
norms by Gram products with book-keeping sums) and :func:`linear_form_rule` makes it a
:class:`~maskdp.engines.ghost.rules.LayerRule`. ``nn.Linear`` is here (rows: all
positions of a sample); convolutions build on it in :mod:`maskdp.engines.ghost.conv`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from maskdp.engines.ghost.ghost_norm import ghost_slack, ghost_sq_norms, ghost_terms
from maskdp.engines.ghost.rules import (
    GHOST_MEMORY_RATIO,
    LayerResult,
    LayerRule,
    Pair,
    Pass,
    from_deltas,
    zero_dropped,
)


@dataclass(frozen=True)
class LinearForm:
    r"""A layer whose weight gradient is :math:`G^\top A` over rows, per sample and group.

    ``rows_a(x)`` maps a captured input ``(n, ...)`` to ``(n * groups, R, d)`` and
    ``rows_g(g)`` an output gradient to ``(n * groups, R, p)``; the per-group gradient
    ``(p, d)`` reshapes to ``weight_shape``. ``bias_of(g)`` is the per-sample bias gradient
    ``(n, out)``. ``rows(pass_)`` is ``R``. ``direct(x, g)``, when given, computes the
    per-sample weight gradients ``(n, *weight_shape)`` without forming rows (convolutions
    with overlapping windows).
    """

    rows_a: Callable[[Tensor], Tensor]
    rows_g: Callable[[Tensor], Tensor]
    bias_of: Callable[[Tensor], Tensor]
    rows: Callable[[Pass], int]
    groups: int
    weight_shape: tuple[int, ...]
    d: int
    p: int
    direct: Callable[[Tensor, Tensor], Tensor] | None = None

    def per_sample(self, pass_: Pass, names: frozenset[str]) -> dict[str, Tensor]:
        x, g, n = pass_.inputs[0], pass_.grad, pass_.n
        out = {}
        if "weight" in names:
            if self.direct is not None:
                out["weight"] = self.direct(x, g)
            else:
                gt, a = self.rows_g(g).transpose(1, 2), self.rows_a(x)
                if pass_.alloc is None:
                    grads = torch.bmm(gt, a)
                else:
                    grads = torch.bmm(gt, a, out=pass_.alloc((a.shape[0], self.p, self.d), a))
                out["weight"] = grads.view(n, *self.weight_shape)
        if "bias" in names:
            out["bias"] = self.bias_of(g)
        return out

    def instantiate(self, pair: Pair, names: frozenset[str]) -> LayerResult:
        r""":math:`\Delta_i` of a pair: the public pass's per-sample gradients first, then the
        full pass accumulated into them by one batched GEMM (``baddbmm``), which saves two
        passes over the ``n x P`` buffer compared with adding two materialised halves."""
        if pair.public is None:
            raise RuntimeError("LinearForm.instantiate needs a public pass; got labels protected")
        n, out = pair.full.n, self.per_sample(pair.public, names)
        if "weight" in names:
            x, g = pair.full.inputs[0], pair.full.grad
            if self.direct is not None:
                out["weight"] += self.direct(x, g)
            else:
                grads = out["weight"].view(-1, self.p, self.d)
                grads.baddbmm_(self.rows_g(g).transpose(1, 2), self.rows_a(x))
        if "bias" in names:
            out["bias"] = out["bias"] + self.bias_of(pair.full.grad)
        return from_deltas(out, n)

    def prefers_ghost(self, pass_: Pass, passes: int) -> bool:
        rows = self.rows(pass_) * passes
        return self.p * self.d > GHOST_MEMORY_RATIO * rows * (self.d + self.p)

    def weighted_sum(self, a: Tensor, g: Tensor, weights: Tensor | None) -> Tensor:
        r""":math:`\sum_i w_i G_i^\top A_i` over rows (``weights`` None: all ones)."""
        if weights is not None:
            a, g = zero_dropped(a, weights, self.groups), zero_dropped(g, weights, self.groups)
            g = g * weights.repeat_interleave(self.groups).to(g.dtype)[:, None, None]
        k = self.groups
        if k == 1:
            return (g.reshape(-1, self.p).T @ a.reshape(-1, self.d)).view(self.weight_shape)
        a = a.reshape(-1, k, a.shape[1], self.d).transpose(0, 1).reshape(k, -1, self.d)
        g = g.reshape(-1, k, g.shape[1], self.p).transpose(0, 1).reshape(k, -1, self.p)
        return torch.bmm(g.transpose(1, 2), a).reshape(self.weight_shape)

    def ghost(self, pair: Pair, names: frozenset[str]) -> LayerResult:
        """Ghost norms; the row terms stay alive (in float64) until the weighted sums."""
        n = pair.full.n
        public = pair.public
        terms = ghost_terms(
            self.rows_a(pair.full.inputs[0]),
            self.rows_g(pair.full.grad),
            None if public is None else self.rows_a(public.inputs[0]),
            None if public is None else self.rows_g(public.grad),
        )
        sq = torch.zeros(n, dtype=torch.float64, device=pair.full.grad.device)
        sq_slack = torch.zeros_like(sq)
        slack = torch.zeros_like(sq)
        if "weight" in names:
            sq += ghost_sq_norms(terms).view(n, self.groups).sum(1)
            extra_sq, extra = ghost_slack(terms, d=self.d, p=self.p)
            sq_slack += extra_sq.view(n, self.groups).sum(1)
            slack += extra.view(n, self.groups).sum(1)
        bias = self.bias_of(pair.full.grad)
        if public is not None:
            bias = bias + self.bias_of(public.grad)
        if "bias" in names:
            sq += torch.linalg.vector_norm(bias, dim=1).double().square_()

        def weighted(factors: Tensor) -> dict[str, Tensor]:
            out = {}
            if "weight" in names:
                out["weight"] = sum(sign * self.weighted_sum(a, g, factors) for a, g, sign in terms)
            if "bias" in names:
                out["bias"] = factors.to(bias.dtype) @ zero_dropped(bias, factors)
            return out

        return LayerResult(sq, {}, weighted, sq_slack, slack)


def linear_form_rule(form_of: Callable[[nn.Module], LinearForm], **kwargs: Any) -> LayerRule:
    """A rule for a layer seen as a :class:`LinearForm` (``form_of(module)``)."""
    return LayerRule(
        per_sample=lambda module, pass_, names: form_of(module).per_sample(pass_, names),
        params=frozenset({"weight", "bias"}),
        ghost=lambda module, pair, names: form_of(module).ghost(pair, names),
        prefers_ghost=lambda module, pass_, passes: form_of(module).prefers_ghost(pass_, passes),
        instantiate=lambda module, pair, names: form_of(module).instantiate(pair, names),
        **kwargs,
    )


def _linear_form(module: nn.Module) -> LinearForm:
    """``nn.Linear`` on inputs (n, ..., d): rows are all positions of a sample."""
    p, d = module.weight.shape
    return LinearForm(
        rows_a=lambda a: a.reshape(a.shape[0], -1, d),
        rows_g=lambda g: g.reshape(g.shape[0], -1, p),
        bias_of=lambda g: g.reshape(g.shape[0], -1, p).sum(1),
        rows=lambda pass_: max(1, pass_.grad[0].numel() // p) if pass_.n else 1,
        groups=1,
        weight_shape=(p, d),
        d=d,
        p=p,
    )


#: ``nn.Linear``.
LINEAR_RULE = linear_form_rule(_linear_form)
