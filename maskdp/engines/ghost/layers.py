r"""Per-layer rules of the ghost engine: per-sample norms and clipped sums from (A, G).

For one layer, a record's contribution :math:`\Delta_i` restricted to that layer's
parameters is the per-sample gradient of a "sequence" stacking the full-view rows and the
public-view rows of sample ``i`` (DESIGN.md section 4); the public rows already carry the
weight -1 through their output gradient ``G``. Writing :math:`S(A, G)` for the per-sample
gradient of a layer (linear in ``G``), :func:`layer_result` returns for a :class:`Pair`

- ``sq_norms``: :math:`\lVert S(A^f_i, G^f_i) + S(A^p_i, G^p_i)\rVert^2`, one per sample,
- ``private(c)``: :math:`\sum_i c_i \Delta_i`, once the clip factors are known.

Two ways to get there (mixed ghost norm, Bu et al. 2022, "Scalable and efficient training
of large convolutional neural networks with differential privacy"):

- *instantiate* (every rule): ``per_sample`` materialises :math:`S(A, G)` of one pass,
  the two passes are added and kept for the weighted sum. Cost ``2 R p d`` per sample for a
  linear map with ``R`` rows per pass; it needs only one pass at a time.
- *ghost* (linear maps, convolutions, embeddings):
  :math:`\lVert G^\top A\rVert_F^2 = \langle A A^\top, G G^\top\rangle` (Li et al. 2022,
  "Large language models can be strong differentially private learners"; Opacus ghost
  clipping), then the clipped sum is one matmul with the rows of ``G`` rescaled by
  :math:`c_i` (book-keeping, Bu et al. 2023, "Differentially private optimization on large
  model at small cost"). Cost ``O(R^2 (d + p))`` per sample plus that matmul.

Counting everything, instantiation never needs more arithmetic (``2 R p d`` against
``3 R^2 (d + p)`` for the Gram products plus ``3 R p d`` for the weighted sums), but it
holds ``p d`` values per sample where the ghost branch holds ``(R_f + R_p)(d + p)``.
``"auto"`` therefore takes the ghost branch only when instantiation would hold
:data:`GHOST_MEMORY_RATIO` times more (few rows, wide layers: heads, late small-resolution
convolutions). Measured on CPU, instantiation was faster for every layer of the reference
ViT, including a 192-wide one where the Gram products have fewer operations.

Rules are registered in :data:`RULES`, keyed by module type; :func:`rule_for` also accepts
subclasses that keep the base class's forward, and falls back to Opacus's grad samplers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskdp.models.vit import PositionalEmbedding

Mode = Literal["auto", "ghost", "instantiate"]

#: ``"auto"`` uses the ghost branch when per-sample gradients would take this many times
#: the memory of the rows (activations and output gradients) the ghost branch keeps.
GHOST_MEMORY_RATIO = 4


@dataclass(frozen=True)
class Pass:
    """One pass through a layer: its tensor inputs and the gradient of the objective with
    respect to its output, both batch first (``n`` samples). ``node`` is the autograd node
    that produced the output, when known (normalisation rules reuse its saved statistics).
    ``alloc(shape, like)``, when given, provides the buffers of per-sample gradients (the
    engine reuses them from call to call)."""

    inputs: tuple[Tensor, ...]
    grad: Tensor
    node: Any = None
    alloc: Callable[[tuple[int, ...], Tensor], Tensor] | None = None

    @property
    def n(self) -> int:
        return int(self.grad.shape[0])


@dataclass(frozen=True)
class Pair:
    """The full pass and the public pass (gradient of ``-loss``) of the same ``n`` samples.

    ``public`` is None when labels are protected: then :math:`\\Delta_i = g_i`.
    ``stacked``, when both passes ran as one call, is that ``2n`` pass (full rows first);
    ``full`` and ``public`` are then views of it.
    """

    full: Pass
    public: Pass | None
    stacked: Pass | None = None


@dataclass(frozen=True)
class LayerResult:
    r"""What a rule returns for one layer; parameter names are the module's local names.

    ``sq_norms`` (n,): per-sample squared norms of :math:`\Delta_i` on this layer.
    ``deltas``: instantiated :math:`\Delta_i`, flattened to (n, numel); ``weighted``, for
    the ghost branch, computes :math:`\sum_i c_i \Delta_i` from the clip factors itself.
    ``sq_slack`` and ``slack`` (n,), on the ghost branch: certified bounds on the rounding
    of the Gram products and of the weighted sums, so that
    :math:`\sqrt{\text{sq\_norms} + \text{sq\_slack}} + \text{slack}` bounds the norm of
    what is actually summed (:func:`ghost_slack`).
    """

    sq_norms: Tensor
    deltas: dict[str, Tensor]
    weighted: Callable[[Tensor], dict[str, Tensor]] | None = None
    sq_slack: Tensor | None = None
    slack: Tensor | None = None

    def private(self, factors: Tensor) -> dict[str, Tensor]:
        r""":math:`\sum_i c_i \Delta_i` per parameter (flattened for instantiated ones); rows
        with :math:`c_i = 0` (non-finite norm) are zeroed first, never ``0 * inf``."""
        out = {}
        for k, v in self.deltas.items():
            out[k] = factors.to(v.dtype) @ zero_dropped(v, factors)
        if self.weighted is not None:
            out.update(self.weighted(factors))
        return out


PerSample = Callable[[nn.Module, Pass, frozenset[str]], dict[str, Tensor]]
PairRule = Callable[[nn.Module, Pair, frozenset[str]], LayerResult]
#: ``prefers_ghost(module, pass_, passes)``: whether the ghost branch is cheaper for a pair
#: of ``passes`` passes shaped like ``pass_``.
PrefersGhost = Callable[[nn.Module, Pass, int], bool]


@dataclass(frozen=True)
class LayerRule:
    """How the ghost engine handles one module type.

    ``per_sample(module, pass_, names)``: per-sample gradients ``(n, ...)`` of one pass for
    the parameters in ``names``. ``ghost`` / ``prefers_ghost``: the ghost branch and its cost
    rule, for layers that have one. ``params``: the direct parameter names the rule knows
    (None: any). ``refusal(module)``: why a configuration is not supported, or None.
    ``inputs``: how many tensor inputs the forward must receive (None: any).
    """

    per_sample: PerSample
    params: frozenset[str] | None
    ghost: PairRule | None = None
    prefers_ghost: PrefersGhost | None = None
    refusal: Callable[[nn.Module], str | None] = lambda module: None
    inputs: int | None = 1
    #: Optional faster instantiation of a whole pair (same result as the generic one).
    instantiate: PairRule | None = None


# ----------------------------------------------------------------------- combination


def uses_ghost(rule: LayerRule, module: nn.Module, pass_: Pass, passes: int, mode: Mode) -> bool:
    """Whether ``mode`` sends this layer to its ghost branch."""
    if rule.ghost is None or mode == "instantiate":
        return False
    if mode == "ghost":
        return True
    return rule.prefers_ghost is not None and rule.prefers_ghost(module, pass_, passes)


def zero_dropped(rows: Tensor, factors: Tensor, groups: int = 1) -> Tensor:
    r"""``rows`` (``n * groups`` first) with the rows of samples whose :math:`c_i = 0` set to
    exact zeros, so that a non-finite record adds nothing to a weighted sum."""
    dropped = factors == 0
    if not bool(dropped.any()):
        return rows
    keep = ~dropped.repeat_interleave(groups).view(-1, *([1] * (rows.dim() - 1)))
    return torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))


def from_deltas(deltas: dict[str, Tensor], n: int) -> LayerResult:
    r"""A result holding the layer's :math:`\Delta_i` until the factors are known.

    Squared norms are float32 sums per layer (pairwise summation); the engine accumulates
    layers in float64.
    """
    flat = {k: v.reshape(n, -1) for k, v in deltas.items()}
    values = iter(flat.values())
    sq_norms = torch.linalg.vector_norm(next(values), dim=1).square_()
    for v in values:
        sq_norms += torch.linalg.vector_norm(v, dim=1).square_()
    return LayerResult(sq_norms, flat)


def combine(full: dict[str, Tensor], public: dict[str, Tensor] | None, n: int) -> LayerResult:
    r""":math:`\Delta_i = S_f + S_p` from per-sample gradients (the public pass carries -1)."""
    if public is None:
        return from_deltas(full, n)
    return from_deltas({k: v + public[k] for k, v in full.items()}, n)


def layer_result(
    rule: LayerRule, module: nn.Module, pair: Pair, names: frozenset[str], mode: Mode
) -> LayerResult:
    """Norms and sums of one layer from both passes (ghost or instantiate, see module doc)."""
    passes = 1 if pair.public is None else 2
    if uses_ghost(rule, module, pair.full, passes, mode):
        assert rule.ghost is not None
        return rule.ghost(module, pair, names)
    n = pair.full.n
    if rule.instantiate is not None and pair.public is not None:
        return rule.instantiate(module, pair, names)
    if pair.stacked is not None:
        both = rule.per_sample(module, pair.stacked, names)
        return combine({k: v[:n] for k, v in both.items()}, {k: v[n:] for k, v in both.items()}, n)
    full = rule.per_sample(module, pair.full, names)
    public = None if pair.public is None else rule.per_sample(module, pair.public, names)
    return combine(full, public, n)


# ------------------------------------------------------------------------ ghost norms


def _gram_dot(a1: Tensor, a2: Tensor, g1: Tensor, g2: Tensor) -> Tensor:
    r""":math:`\langle A_1 A_2^\top, G_1 G_2^\top\rangle` per batch entry, in float64."""
    return (torch.bmm(a1, a2.transpose(1, 2)) * torch.bmm(g1, g2.transpose(1, 2))).sum(
        (1, 2), dtype=torch.float64
    )


Terms = list[tuple[Tensor, Tensor, float]]


def ghost_terms(af: Tensor, gf: Tensor, ap: Tensor | None, gp: Tensor | None) -> Terms:
    r""":math:`\Delta = \sum_t s_t G_t^\top A_t` as ``(A_t, G_t, s_t)`` row terms, in float64.

    Rows ``(n, R, d)`` and ``(n, R, p)``. With equal row counts the pair is rewritten as
    :math:`\Delta = dG^\top A_p - G_f^\top dA` with :math:`dA = A_p - A_f`,
    :math:`dG = G_p + G_f` (exact algebra; the public rows carry the sign), so that a record
    whose two passes nearly agree has small rows instead of large ones that cancel, and an
    erased record has exactly zero rows. Otherwise the rows are concatenated.
    """
    af, gf = af.double(), gf.double()
    if ap is None or gp is None:
        return [(af, gf, 1.0)]
    ap, gp = ap.double(), gp.double()
    if ap.shape[1] == af.shape[1]:
        return [(ap, gp + gf, 1.0), (ap - af, gf, -1.0)]
    return [(torch.cat([af, ap], 1), torch.cat([gf, gp], 1), 1.0)]


def ghost_sq_norms(terms: Terms) -> Tensor:
    r"""Per-sample :math:`\lVert \sum_t s_t G_t^\top A_t \rVert_F^2` without forming it:
    :math:`\sum_{t,t'} s_t s_{t'} \langle A_t A_{t'}^\top, G_t G_{t'}^\top\rangle`."""
    first = terms[0][0]
    sq = torch.zeros(first.shape[0], dtype=torch.float64, device=first.device)
    for i, (a1, g1, s1) in enumerate(terms):
        for j, (a2, g2, s2) in enumerate(terms[i:], start=i):
            sq += (1.0 if i == j else 2.0) * s1 * s2 * _gram_dot(a1, a2, g1, g2)
    return sq.clamp_min(0)


_U64 = 2.0**-53


def _gamma(k: int) -> float:
    r"""Higham's :math:`\gamma_k = k u / (1 - k u)` for float64: the relative error bound of a
    k-term dot product computed in any order."""
    return k * _U64 / (1 - k * _U64)


def ghost_slack(terms: Terms, *, d: int, p: int) -> tuple[Tensor, Tensor]:
    r"""Per-row-group bounds ``(sq_slack, slack)`` on the rounding of the ghost branch.

    With :math:`S = \sum_t \sum_r \lVert a_{tr}\rVert \lVert g_{tr}\rVert` over the rows of
    the terms, the float64 Gram computation of :math:`\lVert\Delta\rVert^2` errs by at most
    :math:`(2\gamma_k + \gamma_k^2 + 4u) S^2` (:math:`k = \max(d, p)`: each Gram entry is a
    k-term dot product, then one product and a float64 sum; Higham 2002, Thm. 3.5) and the
    float64 weighted sum of the record's rows, and the rounding of the rows themselves, by
    at most :math:`(\gamma_{m+2} + 2u) S` (:math:`m` its rows). Without such a bound, rows
    with large values that cancel could give a computed norm of 0 while the summed
    contribution is large. Relative to :math:`\lVert\Delta\rVert` the slack is about
    :math:`10^{-16} m S / \lVert\Delta\rVert`: invisible unless the rows cancel; zero for an
    erased record (its terms have zero rows).
    """
    s = sum((a.norm(dim=2) * g.norm(dim=2)).sum(1) for a, g, _ in terms)
    rows = sum(a.shape[1] for a, _, _ in terms)
    k = max(d, p)
    sq_slack = (2 * _gamma(k) + _gamma(k) ** 2 + 4 * _U64) * s.square()
    return sq_slack, (_gamma(rows + 2) + 2 * _U64) * s


# ------------------------------------------------------------------ linear-form layers


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
        assert pair.public is not None
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


def _conv_padding(module: nn.modules.conv._ConvNd) -> list[tuple[int, int]]:
    """(left, right) padding per spatial dimension, as ``F.conv*``/``F.pad`` apply it."""
    if module.padding == "valid":
        return [(0, 0)] * len(module.kernel_size)
    if module.padding == "same":
        pads = []
        for k, dil in zip(module.kernel_size, module.dilation, strict=True):
            total = dil * (k - 1)
            pads.append((total // 2, total - total // 2))
        return pads
    return [(p, p) for p in module.padding]


def _pad(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """The input as the convolution sees it after padding (any padding mode)."""
    pads = _conv_padding(module)
    if not any(left or right for left, right in pads):
        return x
    flat = [v for pair in reversed(pads) for v in pair]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, flat, mode=mode)


def conv_patches(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """Unfold ``x`` (n, C, *spatial) into patches (n, L, C * prod(kernel)).

    Patch entries are ordered (channel, kernel offsets), matching ``weight.view(O, -1)``. A
    tubelet embedding (stride == kernel, no padding) is a pure reshape of the input.
    """
    x = _pad(module, x)
    nd = len(module.kernel_size)
    for i, (k, s, dil) in enumerate(
        zip(module.kernel_size, module.stride, module.dilation, strict=True)
    ):
        x = x.unfold(2 + i, dil * (k - 1) + 1, s)
        if dil > 1:
            x = x[..., ::dil]
    # (n, C, *out, *kernel) -> (n, *out, C, *kernel)
    x = x.permute(0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    return x.reshape(x.shape[0], math.prod(x.shape[1 : 1 + nd]), -1)


def conv_weight_grads(module: nn.modules.conv._ConvNd, x: Tensor, g: Tensor) -> Tensor:
    """Per-sample weight gradients (n, *weight.shape) of a convolution, by one grouped
    weight-gradient convolution with the batch folded into the groups (no unfolding)."""
    n, weight = x.shape[0], module.weight
    x = _pad(module, x)
    shape = (n * weight.shape[0], *weight.shape[1:])
    stacked = weight.detach().expand(n, *weight.shape).reshape(shape)
    zeros = [0] * len(module.kernel_size)
    _, grads, _ = torch.ops.aten.convolution_backward(
        g.reshape(1, -1, *g.shape[2:]),
        x.reshape(1, -1, *x.shape[2:]),
        stacked,
        None,
        list(module.stride),
        zeros,
        list(module.dilation),
        False,
        zeros,
        n * module.groups,
        [False, True, False],
    )
    return grads.view(n, *weight.shape)


def _is_tubelet(module: nn.modules.conv._ConvNd) -> bool:
    """Non-overlapping windows without padding: patches are a reshape of the input."""
    return (
        tuple(module.stride) == tuple(module.kernel_size)
        and all(d == 1 for d in module.dilation)
        and not any(left or right for left, right in _conv_padding(module))
    )


def _conv_form(module: nn.Module) -> LinearForm:
    """``nn.Conv1d/2d/3d``: a linear map on unfolded patches, per group."""
    k, out_channels = module.groups, module.out_channels
    d = module.in_channels // k * math.prod(module.kernel_size)
    p = out_channels // k

    def rows_a(x: Tensor) -> Tensor:
        patches = conv_patches(module, x)  # (n, L, C * K)
        n, length = patches.shape[:2]
        return patches.view(n, length, k, d).transpose(1, 2).reshape(n * k, length, d)

    def rows_g(g: Tensor) -> Tensor:
        n = g.shape[0]
        return g.reshape(n, k, p, -1).transpose(2, 3).reshape(n * k, -1, p)

    return LinearForm(
        rows_a=rows_a,
        rows_g=rows_g,
        bias_of=lambda g: g.reshape(g.shape[0], out_channels, -1).sum(2),
        rows=lambda pass_: max(1, math.prod(pass_.grad.shape[2:])),
        groups=k,
        weight_shape=tuple(module.weight.shape),
        d=d,
        p=p,
        direct=None if _is_tubelet(module) else partial(conv_weight_grads, module),
    )


# -------------------------------------------------------------------------- embedding


def _embedding_rows(module: nn.Module, pass_: Pass) -> tuple[Tensor, Tensor]:
    """Ids (n, R) and output gradients (n, R, dim); rows at ``padding_idx`` get no gradient."""
    ids = pass_.inputs[0].reshape(pass_.n, -1)
    g = pass_.grad.reshape(pass_.n, -1, module.weight.shape[1])
    if module.padding_idx is not None:
        g = g * (ids != module.padding_idx).unsqueeze(-1).to(g.dtype)
    return ids, g


def _embedding_per_sample(
    module: nn.Module, pass_: Pass, names: frozenset[str]
) -> dict[str, Tensor]:
    """Per-sample gradients (n, V, dim): each row's gradient scattered to its id."""
    vocab, dim = module.weight.shape
    ids, g = _embedding_rows(module, pass_)
    n = ids.shape[0]
    flat = (ids + vocab * torch.arange(n, device=ids.device)[:, None]).reshape(-1)
    out = g.new_zeros(n * vocab, dim).index_add_(0, flat, g.reshape(-1, dim))
    return {"weight": out.view(n, vocab, dim)}


def _embedding_ghost(module: nn.Module, pair: Pair, names: frozenset[str]) -> LayerResult:
    r""":math:`\lVert\Delta_i\rVert^2 = \sum_{r,s} 1[id_r = id_s]\, g_r \cdot g_s` over the
    rows of both passes (float64)."""
    vocab, dim = module.weight.shape
    ids, g = _embedding_rows(module, pair.full)

    def scatter(ids: Tensor, g: Tensor) -> Tensor:
        return g.new_zeros(vocab, dim).index_add_(0, ids.reshape(-1), g.reshape(-1, dim))

    if pair.public is not None:
        ids_p, g_p = _embedding_rows(module, pair.public)
        ids, g = torch.cat([ids, ids_p], 1), torch.cat([g, g_p], 1)
    g64 = g.double()
    same = (ids[:, :, None] == ids[:, None, :]).to(torch.float64)
    sq = (torch.bmm(g64, g64.transpose(1, 2)) * same).sum((1, 2)).clamp_min(0)
    # One-hot inputs: a_r has norm 1, so the rows of the slack are the g_r alone.
    sq_slack, slack = ghost_slack([(torch.ones_like(g64[..., :1]), g64, 1.0)], d=1, p=dim)

    def weighted(factors: Tensor) -> dict[str, Tensor]:
        safe = zero_dropped(g64, factors)
        return {"weight": scatter(ids, safe * factors.to(g64.dtype)[:, None, None])}

    return LayerResult(sq, {}, weighted, sq_slack, slack)


def _embedding_prefers_ghost(module: nn.Module, pass_: Pass, passes: int) -> bool:
    """Instantiation holds ``V dim`` values per sample, the Gram ``(R_f + R_p)^2``."""
    rows = passes * (pass_.inputs[0][0].numel() if pass_.n else 1)
    return module.weight.numel() > GHOST_MEMORY_RATIO * rows * rows


def _embedding_refusal(module: nn.Module) -> str | None:
    if module.scale_grad_by_freq:
        return (
            "scale_grad_by_freq scales gradients by word counts over the whole batch, which "
            "mixes samples; build it with scale_grad_by_freq=False"
        )
    return None


# ------------------------------------------------------------ per-sample cheap layers


def _sum_rows(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Sum ``x`` (n, ..., *shape) over everything between the batch and ``shape``."""
    dims = tuple(range(1, x.dim() - len(shape)))
    return x.sum(dims) if dims else x


def _saved(node: Any, kind: str, names: tuple[str, ...]) -> tuple[Tensor, ...] | None:
    """Statistics autograd saved for the forward's normalisation node, if still there.

    Reusing them avoids recomputing a mean and variance per row; any surprise (another
    node type, freed buffers) falls back to recomputation.
    """
    if node is None or type(node).__name__ != kind:
        return None
    try:
        return tuple(getattr(node, name) for name in names)
    except (AttributeError, RuntimeError):
        return None


def _layer_norm_hat(module: nn.Module, pass_: Pass, shape: tuple[int, ...]) -> Tensor:
    r""":math:`\hat x = (x - \mu) / \sqrt{\sigma^2 + \epsilon}` per row."""
    x = pass_.inputs[0]
    saved = _saved(pass_.node, "NativeLayerNormBackward0", ("_saved_result1", "_saved_result2"))
    stats_shape = tuple(x.shape[: x.dim() - len(shape)]) + (1,) * len(shape)
    if saved is not None and all(tuple(t.shape) == stats_shape for t in saved):
        mean, rstd = saved
        return (x - mean) * rstd
    return F.layer_norm(x, shape, eps=module.eps)


def _group_norm_hat(module: nn.Module, pass_: Pass) -> Tensor:
    r""":math:`\hat x` of GroupNorm: normalised per sample and group."""
    x, groups = pass_.inputs[0], module.num_groups
    saved = _saved(pass_.node, "NativeGroupNormBackward0", ("_saved_result1", "_saved_result2"))
    if saved is not None and all(tuple(t.shape) == (x.shape[0], groups) for t in saved):
        mean, rstd = (t.view(x.shape[0], groups, 1) for t in saved)
        return ((x.reshape(x.shape[0], groups, -1) - mean) * rstd).view_as(x)
    return F.group_norm(x, groups, eps=module.eps)


def _layer_norm(module: nn.Module, pass_: Pass, names: frozenset[str]) -> dict[str, Tensor]:
    r"""``nn.LayerNorm``: weight grad :math:`\sum_{rows} G \odot \hat x`, bias :math:`\sum G`."""
    shape, g = tuple(module.normalized_shape), pass_.grad
    out = {}
    if "weight" in names:
        out["weight"] = _sum_rows(g * _layer_norm_hat(module, pass_, shape), shape)
    if "bias" in names:
        out["bias"] = _sum_rows(g, shape)
    return out


def _rms_norm(module: nn.Module, pass_: Pass, names: frozenset[str]) -> dict[str, Tensor]:
    r"""``nn.RMSNorm``: weight grad :math:`\sum_{rows} G \odot x / \mathrm{rms}(x)`."""
    shape = tuple(module.normalized_shape)
    x_hat = F.rms_norm(pass_.inputs[0], shape, eps=module.eps)
    return {"weight": _sum_rows(pass_.grad * x_hat, shape)}


def _group_norm(module: nn.Module, pass_: Pass, names: frozenset[str]) -> dict[str, Tensor]:
    r"""``nn.GroupNorm``: weight grad :math:`\sum_{positions} G \odot \hat x` per channel."""
    g, n, channels = pass_.grad, pass_.n, module.num_channels
    out = {}
    if "weight" in names:
        out["weight"] = (g * _group_norm_hat(module, pass_)).reshape(n, channels, -1).sum(2)
    if "bias" in names:
        out["bias"] = g.reshape(n, channels, -1).sum(2)
    return out


def _positional(module: nn.Module, pass_: Pass, names: frozenset[str]) -> dict[str, Tensor]:
    r""":class:`~maskdp.models.vit.PositionalEmbedding` (``x + weight``): the per-sample
    gradient is ``G`` summed to the weight's shape."""
    shape, g = tuple(module.weight.shape), pass_.grad
    if tuple(g.shape[g.dim() - len(shape) :]) == shape:
        return {"weight": _sum_rows(g, shape)}
    if not pass_.n:
        return {"weight": g.new_zeros(0, *shape)}
    return {"weight": torch.stack([gi.sum_to_size(shape) for gi in g])}


# ------------------------------------------------------------------- opacus fallback


def opacus_samplers() -> dict[type, Callable]:
    """Opacus's per-sample gradient functions by module type (imported lazily: ~5 s)."""
    try:
        from opacus.grad_sample import GradSampleModule
    except ImportError:  # pragma: no cover - opacus is a dependency
        return {}
    return dict(GradSampleModule.GRAD_SAMPLERS)


def _opacus_rule(sampler: Callable) -> LayerRule:
    """A rule materialising per-sample gradients with an Opacus grad sampler."""

    def per_sample(module: nn.Module, pass_: Pass, names: frozenset[str]) -> dict[str, Tensor]:
        params = dict(module.named_parameters(recurse=False))
        grads = sampler(module, list(pass_.inputs), pass_.grad)
        return {k: grads[params[k]] for k in names}

    # Any parameter names and inputs: Opacus's sampler decides what it handles.
    return LayerRule(per_sample, None, inputs=None)


RULES: dict[type[nn.Module], LayerRule] = {
    nn.Linear: linear_form_rule(_linear_form),
    nn.Conv1d: linear_form_rule(_conv_form),
    nn.Conv2d: linear_form_rule(_conv_form),
    nn.Conv3d: linear_form_rule(_conv_form),
    nn.LayerNorm: LayerRule(_layer_norm, frozenset({"weight", "bias"})),
    nn.GroupNorm: LayerRule(_group_norm, frozenset({"weight", "bias"})),
    nn.Embedding: LayerRule(
        _embedding_per_sample,
        frozenset({"weight"}),
        ghost=_embedding_ghost,
        prefers_ghost=_embedding_prefers_ghost,
        refusal=_embedding_refusal,
    ),
    PositionalEmbedding: LayerRule(_positional, frozenset({"weight"})),
}
if hasattr(nn, "RMSNorm"):
    RULES[nn.RMSNorm] = LayerRule(_rms_norm, frozenset({"weight"}))

#: Methods a subclass must not override to inherit its base class's rule.
_FORWARD_METHODS = ("forward", "_conv_forward")


def _inherits_forward(module_type: type, base: type) -> bool:
    return all(
        getattr(module_type, name, None) is getattr(base, name, None) for name in _FORWARD_METHODS
    )


def _lookup(module_type: type, table: dict[type, Any]) -> tuple[type, Any] | None:
    for base in module_type.__mro__:
        if base in table:
            return base, table[base]
    return None


def rule_for(module_type: type) -> LayerRule | None:
    """The rule for a module type: its own, or a base class's when the subclass keeps the
    base's forward (e.g. torchvision's ``Conv3DSimple``); else Opacus's grad sampler, if any
    (Opacus is imported only then)."""
    found = _lookup(module_type, RULES)
    if found is not None:
        base, rule = found
        return rule if _inherits_forward(module_type, base) else None
    found = _lookup(module_type, opacus_samplers())
    if found is not None and _inherits_forward(module_type, found[0]):
        return _opacus_rule(found[1])
    return None
