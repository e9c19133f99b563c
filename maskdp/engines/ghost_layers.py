r"""Per-layer rules of the ghost engine: per-sample norms and clipped sums from (A, G).

For one layer, a record's contribution :math:`\Delta_i` restricted to that layer's
parameters is the per-sample gradient of a "sequence" stacking the full-view rows and the
public-view rows of sample ``i`` (DESIGN.md section 4); the public rows already carry the
weight -1 through their output gradient ``G``. Writing :math:`S(A, G)` for the per-sample
gradient of a layer (linear in ``G``), a rule returns, for a :class:`Pair` of passes,

- ``sq_norms``: :math:`\lVert S(A^f_i, G^f_i) + S(A^p_i, G^p_i)\rVert^2` (float64, one per
  sample),
- ``public``: :math:`\sum_i h_i = -\sum_i S(A^p_i, G^p_i)` (empty with protected labels),
- ``private(c)``: :math:`\sum_i c_i \Delta_i`, computed once the clip factors are known.

Two ways to get there (Bu et al. 2022, "Scalable and efficient training of large
convolutional neural networks with differential privacy", mixed ghost norm):

- *instantiate*: materialise :math:`\Delta_i` for the layer (``B x P_layer`` values), take
  its norm, keep it for the weighted sum. Cost ``2 R p d`` per sample for a linear map with
  ``R`` rows per pass.
- *ghost*: :math:`\lVert G^\top A\rVert_F^2 = \langle A A^\top, G G^\top\rangle` (Li et al.
  2022, "Large language models can be strong differentially private learners"; Opacus ghost
  clipping), then the clipped sum is one matmul with the rows of ``G`` rescaled by
  :math:`c_i` (book-keeping, Bu et al. 2023, "Differentially private optimization on large
  model at small cost"). Cost ``O(R^2 (d + p))`` per sample plus that matmul.

``"auto"`` instantiates when :math:`p d \le (R_f + R_p)(d + p)`: then the instantiated
gradient is also smaller than the activations and gradients the ghost branch must keep.

Rules are pure functions registered in :data:`RULES`, keyed by exact module type.
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
PerSample = Callable[["Pass"], dict[str, Tensor]]

@dataclass(frozen=True)
class Pass:
    """One pass through a layer: its tensor inputs and the gradient of the objective with
    respect to its output, both batch first (``n`` samples). ``node`` is the autograd node
    that produced the output, when known (normalisation rules reuse its saved statistics)."""

    inputs: tuple[Tensor, ...]
    grad: Tensor
    node: Any = None

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
    ``public``: :math:`\sum_i h_i` per parameter (any shape with the parameter's numel).
    ``deltas``: instantiated :math:`\Delta_i`, flattened to (n, numel); ``weighted``, for
    the ghost branch, computes :math:`\sum_i c_i \Delta_i` from the clip factors itself.
    """

    sq_norms: Tensor
    public: dict[str, Tensor]
    deltas: dict[str, Tensor]
    weighted: Callable[[Tensor], dict[str, Tensor]] | None = None

    def private(self, factors: Tensor) -> dict[str, Tensor]:
        r""":math:`\sum_i c_i \Delta_i` per parameter (flattened for instantiated ones)."""
        out = {k: factors.to(v.dtype) @ v for k, v in self.deltas.items()}
        if self.weighted is not None:
            out.update(self.weighted(factors))
        return out


Compute = Callable[[nn.Module, Pair, frozenset[str], Mode], LayerResult]


@dataclass(frozen=True)
class LayerRule:
    """How the ghost engine handles one module type.

    ``params``: the direct parameter names the rule knows (None: any); ``refusal(module)`` returns why a
    configuration is not supported (None when it is); ``inputs``: how many tensor inputs the
    module's forward must receive (None: any).
    """

    compute: Compute
    params: frozenset[str] | None
    refusal: Callable[[nn.Module], str | None] = lambda module: None
    inputs: int | None = 1


# --------------------------------------------------------------------------- helpers


def _sq(x: Tensor) -> Tensor:
    """Squared norm of each sample's slice (float32 pairwise sums are accurate enough for
    one layer; layers are accumulated in float64 by the engine)."""
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1).square_()


def from_deltas(deltas: dict[str, Tensor], public: dict[str, Tensor], n: int) -> LayerResult:
    r"""A result holding the layer's :math:`\Delta_i` (``n`` first) until the factors are known."""
    flat = {k: v.reshape(n, -1) for k, v in deltas.items()}
    values = iter(flat.values())
    sq_norms = torch.linalg.vector_norm(next(values), dim=1).square_()
    for v in values:
        sq_norms += torch.linalg.vector_norm(v, dim=1).square_()
    return LayerResult(sq_norms, public, flat)


def instantiate(per_sample: PerSample, pair: Pair) -> LayerResult:
    r"""Materialise :math:`\Delta_i = S(A^f_i, G^f_i) + S(A^p_i, G^p_i)` for the layer."""
    n = pair.full.n
    if pair.stacked is not None:
        both = per_sample(pair.stacked)
        public = {k: v[n:].sum(0).neg_() for k, v in both.items()}
        return from_deltas({k: v[:n] + v[n:] for k, v in both.items()}, public, n)
    deltas = per_sample(pair.full)
    public: dict[str, Tensor] = {}
    if pair.public is not None:
        pub = per_sample(pair.public)
        public = {k: v.sum(0).neg_() for k, v in pub.items()}
        deltas = {k: v + pub[k] for k, v in deltas.items()}
        del pub
    return from_deltas(deltas, public, pair.full.n)


def _gram_dot(a1: Tensor, a2: Tensor, g1: Tensor, g2: Tensor) -> Tensor:
    r""":math:`\langle A_1 A_2^\top, G_1 G_2^\top\rangle` per batch entry, in float64."""
    return (torch.bmm(a1, a2.transpose(1, 2)) * torch.bmm(g1, g2.transpose(1, 2))).sum(
        (1, 2), dtype=torch.float64
    )


def ghost_sq_norms(af: Tensor, gf: Tensor, ap: Tensor | None, gp: Tensor | None) -> Tensor:
    r"""Per-sample :math:`\lVert G_f^\top A_f + G_p^\top A_p\rVert_F^2` without forming it.

    Rows ``(n, R, d)`` and ``(n, R, p)``. With equal row counts the pair is rewritten as
    :math:`\Delta = dG^\top A_p - G_f^\top dA` with :math:`dA = A_p - A_f`,
    :math:`dG = G_p + G_f` (exact algebra), so that a record whose two passes nearly agree
    (small :math:`\Delta`) is computed from small differences instead of cancelling large
    terms:
    :math:`\lVert\Delta\rVert^2 = \langle A_pA_p^\top, dG\,dG^\top\rangle
    + \langle dA\,dA^\top, G_fG_f^\top\rangle - 2\langle A_p dA^\top, dG\,G_f^\top\rangle`.
    Otherwise the rows are concatenated and the Gram products taken in float64.
    """
    if ap is None or gp is None:
        return _gram_dot(af, af, gf, gf).clamp_min(0)
    if ap.shape[1] == af.shape[1]:
        da, dg = ap - af, gp + gf
        sq = _gram_dot(ap, ap, dg, dg) + _gram_dot(da, da, gf, gf) - 2 * _gram_dot(ap, da, dg, gf)
        return sq.clamp_min(0)
    a = torch.cat([af, ap], 1).double()
    g = torch.cat([gf, gp], 1).double()
    return _gram_dot(a, a, g, g).clamp_min(0)


# ------------------------------------------------------------------ linear-form layers


@dataclass(frozen=True)
class LinearForm:
    r"""A layer whose weight gradient is :math:`G^\top A` over rows, per sample and group.

    ``rows_a(x)`` maps a captured input ``(n, ...)`` to ``(n * groups, R, d)`` and
    ``rows_g(g)`` an output gradient to ``(n * groups, R, p)``; the per-group gradient
    ``(p, d)`` reshapes to ``weight_shape``. ``bias_of(g)`` is the per-sample bias gradient
    ``(n, out)``. ``direct(x, g)``, when given, computes the per-sample weight gradients
    ``(n, *weight_shape)`` without forming rows (convolutions with overlapping windows).
    """

    rows_a: Callable[[Tensor], Tensor]
    rows_g: Callable[[Tensor], Tensor]
    bias_of: Callable[[Tensor], Tensor]
    groups: int
    weight_shape: tuple[int, ...]
    rows: int  # R: rows per sample and pass
    d: int
    p: int
    direct: Callable[[Tensor, Tensor], Tensor] | None = None

    def weight_grads(self, pass_: Pass, into: Tensor | None = None) -> Tensor:
        """Per-sample weight gradients of one pass, added to ``into`` (in place) if given."""
        x, g = pass_.inputs[0], pass_.grad
        if self.direct is not None:
            grads = self.direct(x, g)
            return grads if into is None else into.add_(grads)
        a, gt = self.rows_a(x), self.rows_g(g).transpose(1, 2)
        if into is None:
            return torch.bmm(gt, a).view(pass_.n, *self.weight_shape)
        into.view(-1, self.p, self.d).baddbmm_(gt, a)
        return into

    def weighted_sum(self, a: Tensor, g: Tensor, weights: Tensor | None) -> Tensor:
        r""":math:`\sum_i w_i G_i^\top A_i` over rows (``weights`` None: all ones)."""
        if weights is not None:
            g = g * weights.repeat_interleave(self.groups).to(g.dtype)[:, None, None]
        k = self.groups
        if k == 1:
            return (g.reshape(-1, self.p).T @ a.reshape(-1, self.d)).view(self.weight_shape)
        a = a.reshape(-1, k, a.shape[1], self.d).transpose(0, 1).reshape(k, -1, self.d)
        g = g.reshape(-1, k, g.shape[1], self.p).transpose(0, 1).reshape(k, -1, self.p)
        return torch.bmm(g.transpose(1, 2), a).reshape(self.weight_shape)


def _instantiate_linear(form: LinearForm, pair: Pair, names: frozenset[str]) -> LayerResult:
    r""":math:`\Delta_i` materialised: public-pass gradients first, then the full pass is
    accumulated into them by one batched GEMM (``baddbmm``)."""
    n = pair.full.n
    deltas: dict[str, Tensor] = {}
    public: dict[str, Tensor] = {}
    if "weight" in names:
        if pair.public is None:
            deltas["weight"] = form.weight_grads(pair.full)
        else:
            grads = form.weight_grads(pair.public)
            public["weight"] = grads.sum(0).neg_()
            deltas["weight"] = form.weight_grads(pair.full, into=grads)
    if "bias" in names:
        if pair.stacked is not None:
            both = form.bias_of(pair.stacked.grad)
            bias, bias_p = both[:n], both[n:]
        else:
            bias = form.bias_of(pair.full.grad)
            bias_p = None if pair.public is None else form.bias_of(pair.public.grad)
        if bias_p is not None:
            public["bias"] = bias_p.sum(0).neg_()
            bias = bias + bias_p
        deltas["bias"] = bias
    return from_deltas(deltas, public, n)


def linear_form_result(form: LinearForm, pair: Pair, names: frozenset[str], mode: Mode) -> LayerResult:
    """Instantiate or ghost a linear-form layer (see the module docstring for the choice)."""
    rows = form.rows * (1 if pair.public is None else 2)
    ghost = mode == "ghost" or (mode == "auto" and form.p * form.d > rows * (form.d + form.p))
    if not ghost:
        return _instantiate_linear(form, pair, names)
    n = pair.full.n
    af, gf = form.rows_a(pair.full.inputs[0]), form.rows_g(pair.full.grad)
    ap = gp = None
    if pair.public is not None:
        ap, gp = form.rows_a(pair.public.inputs[0]), form.rows_g(pair.public.grad)
    sq = torch.zeros(n, dtype=torch.float64, device=gf.device)
    if "weight" in names:
        sq = sq + ghost_sq_norms(af, gf, ap, gp).view(n, form.groups).sum(1)
    public: dict[str, Tensor] = {}
    bias = form.bias_of(pair.full.grad)
    if pair.public is not None:
        bias_p = form.bias_of(pair.public.grad)
        if "bias" in names:
            public["bias"] = -bias_p.sum(0)
        bias = bias + bias_p
    if "bias" in names:
        sq = sq + _sq(bias).double()
    if ap is not None and gp is not None and "weight" in names:
        public["weight"] = -form.weighted_sum(ap, gp, None)

    def private(factors: Tensor) -> dict[str, Tensor]:
        out = {}
        if "weight" in names:
            weight = form.weighted_sum(af, gf, factors)
            if ap is not None and gp is not None:
                weight = weight + form.weighted_sum(ap, gp, factors)
            out["weight"] = weight
        if "bias" in names:
            out["bias"] = torch.tensordot(factors.to(bias.dtype), bias, dims=1)
        return out

    return LayerResult(sq, public, {}, private)


def _linear(module: nn.Module, pair: Pair, names: frozenset[str], mode: Mode) -> LayerResult:
    """``nn.Linear`` on inputs (n, ..., d): rows are all positions of a sample."""
    p, d = module.weight.shape
    x = pair.full.inputs[0]
    form = LinearForm(
        rows_a=lambda a: a.reshape(a.shape[0], -1, d),
        rows_g=lambda g: g.reshape(g.shape[0], -1, p),
        bias_of=lambda g: g.reshape(g.shape[0], -1, p).sum(1),
        groups=1,
        weight_shape=(p, d),
        rows=max(1, x[0].numel() // d) if x.shape[0] else 1,
        d=d,
        p=p,
    )
    return linear_form_result(form, pair, names, mode)


def _conv_padding(module: nn.modules.conv._ConvNd) -> list[tuple[int, int]]:
    """(left, right) padding per spatial dimension, as ``F.conv*``/``F.pad`` apply it."""
    if module.padding == "valid":
        return [(0, 0)] * len(module.kernel_size)
    if module.padding == "same":
        pads = []
        for k, dil in zip(module.kernel_size, module.dilation):
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
    for i, (k, s, dil) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        x = x.unfold(2 + i, dil * (k - 1) + 1, s)
        if dil > 1:
            x = x[..., ::dil]
    # (n, C, *out, *kernel) -> (n, *out, C, *kernel)
    x = x.permute(0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    return x.reshape(x.shape[0], math.prod(x.shape[1 : 1 + nd]), -1)


def conv_weight_grads(module: nn.modules.conv._ConvNd, x: Tensor, g: Tensor) -> Tensor:
    """Per-sample weight gradients (n, *weight.shape) of a convolution, by one grouped
    weight-gradient convolution with the batch folded into the groups (no unfolding)."""
    n = x.shape[0]
    x = _pad(module, x)
    weight = module.weight
    stacked = weight.detach().expand(n, *weight.shape).reshape(n * weight.shape[0], *weight.shape[1:])
    _, grads, _ = torch.ops.aten.convolution_backward(
        g.reshape(1, -1, *g.shape[2:]),
        x.reshape(1, -1, *x.shape[2:]),
        stacked,
        None,
        list(module.stride),
        [0] * len(module.kernel_size),
        list(module.dilation),
        False,
        [0] * len(module.kernel_size),
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


def _conv(module: nn.Module, pair: Pair, names: frozenset[str], mode: Mode) -> LayerResult:
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

    form = LinearForm(
        rows_a=rows_a,
        rows_g=rows_g,
        bias_of=lambda g: g.reshape(g.shape[0], out_channels, -1).sum(2),
        groups=k,
        weight_shape=tuple(module.weight.shape),
        rows=max(1, math.prod(pair.full.grad.shape[2:])),
        d=d,
        p=p,
        direct=None if _is_tubelet(module) else partial(conv_weight_grads, module),
    )
    return linear_form_result(form, pair, names, mode)


# -------------------------------------------------------------------------- embedding


def _embedding(module: nn.Module, pair: Pair, names: frozenset[str], mode: Mode) -> LayerResult:
    r"""``nn.Embedding``: :math:`\lVert\Delta_i\rVert^2 = \sum_{r,s} 1[id_r = id_s]\, g_r \cdot g_s`
    over the stacked rows (ghost), or scatter into (n, V, dim) (instantiate)."""
    vocab, dim = module.weight.shape

    def rows(pass_: Pass) -> tuple[Tensor, Tensor]:
        ids = pass_.inputs[0].reshape(pass_.n, -1)
        g = pass_.grad.reshape(pass_.n, -1, dim)
        if module.padding_idx is not None:
            g = g * (ids != module.padding_idx).unsqueeze(-1).to(g.dtype)
        return ids, g

    ids_f, g_f = rows(pair.full)
    ids_p, g_p = rows(pair.public) if pair.public is not None else (None, None)
    n, total = ids_f.shape[0], ids_f.shape[1] + (0 if ids_p is None else ids_p.shape[1])
    if mode == "instantiate" or (mode == "auto" and vocab * dim <= total * total):

        def per_sample(pass_: Pass) -> dict[str, Tensor]:
            ids, g = rows(pass_)
            flat = (ids + vocab * torch.arange(ids.shape[0], device=ids.device)[:, None]).reshape(
                -1
            )
            out = g.new_zeros(ids.shape[0] * vocab, dim).index_add_(0, flat, g.reshape(-1, dim))
            return {"weight": out.view(ids.shape[0], vocab, dim)}

        return instantiate(per_sample, pair)

    ids = ids_f if ids_p is None else torch.cat([ids_f, ids_p], 1)
    g = g_f if g_p is None else torch.cat([g_f, g_p], 1)
    g64 = g.double()
    same = (ids[:, :, None] == ids[:, None, :]).to(torch.float64)
    sq = (torch.bmm(g64, g64.transpose(1, 2)) * same).sum((1, 2)).clamp_min(0)

    def scatter(ids: Tensor, g: Tensor) -> Tensor:
        return g.new_zeros(vocab, dim).index_add_(0, ids.reshape(-1), g.reshape(-1, dim))

    public = {} if ids_p is None else {"weight": -scatter(ids_p, g_p)}

    def private(factors: Tensor) -> dict[str, Tensor]:
        return {"weight": scatter(ids, g * factors.to(g.dtype)[:, None, None])}

    return LayerResult(sq, public, {}, private)


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


def _layer_norm(module: nn.Module, pair: Pair, names: frozenset[str], mode: Mode) -> LayerResult:
    r"""``nn.LayerNorm``: weight grad :math:`\sum_{rows} G \odot \hat x`, bias :math:`\sum G`."""
    shape = tuple(module.normalized_shape)

    def per_sample(pass_: Pass) -> dict[str, Tensor]:
        g = pass_.grad
        out = {}
        if "weight" in names:
            out["weight"] = _sum_rows(g * _layer_norm_hat(module, pass_, shape), shape)
        if "bias" in names:
            out["bias"] = _sum_rows(g, shape)
        return out

    return instantiate(per_sample, pair)


def _rms_norm(module: nn.Module, pair: Pair, names: frozenset[str], mode: Mode) -> LayerResult:
    r"""``nn.RMSNorm``: weight grad :math:`\sum_{rows} G \odot x / \mathrm{rms}(x)`."""
    shape = tuple(module.normalized_shape)

    def per_sample(pass_: Pass) -> dict[str, Tensor]:
        x, g = pass_.inputs[0], pass_.grad
        return {"weight": _sum_rows(g * F.rms_norm(x, shape, eps=module.eps), shape)}

    return instantiate(per_sample, pair)


def _group_norm(module: nn.Module, pair: Pair, names: frozenset[str], mode: Mode) -> LayerResult:
    r"""``nn.GroupNorm``: weight grad :math:`\sum_{positions} G \odot \hat x` per channel."""

    def per_sample(pass_: Pass) -> dict[str, Tensor]:
        g, n = pass_.grad, pass_.n
        channels = module.num_channels
        out = {}
        if "weight" in names:
            xhat = _group_norm_hat(module, pass_)
            out["weight"] = (g * xhat).reshape(n, channels, -1).sum(2)
        if "bias" in names:
            out["bias"] = g.reshape(n, channels, -1).sum(2)
        return out

    return instantiate(per_sample, pair)


def _positional(module: nn.Module, pair: Pair, names: frozenset[str], mode: Mode) -> LayerResult:
    r""":class:`~maskdp.models.vit.PositionalEmbedding` (``x + weight``): per-sample grad is
    ``G`` summed to the weight's shape."""
    shape = tuple(module.weight.shape)

    def per_sample(pass_: Pass) -> dict[str, Tensor]:
        g = pass_.grad
        if tuple(g.shape[g.dim() - len(shape) :]) != shape:
            g = (
                torch.stack([gi.sum_to_size(shape) for gi in g])
                if g.shape[0]
                else g.new_zeros(0, *shape)
            )
            return {"weight": g}
        return {"weight": _sum_rows(g, shape)}

    return instantiate(per_sample, pair)


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

    def compute(module: nn.Module, pair: Pair, names: frozenset[str], mode: Mode) -> LayerResult:
        params = dict(module.named_parameters(recurse=False))

        def per_sample(pass_: Pass) -> dict[str, Tensor]:
            grads = sampler(module, list(pass_.inputs), pass_.grad)
            return {k: grads[params[k]] for k in names}

        return instantiate(per_sample, pair)

    # Any parameter names and inputs: Opacus's sampler decides what it handles.
    return LayerRule(compute, None, inputs=None)


RULES: dict[type[nn.Module], LayerRule] = {
    nn.Linear: LayerRule(_linear, frozenset({"weight", "bias"})),
    nn.Conv1d: LayerRule(_conv, frozenset({"weight", "bias"})),
    nn.Conv2d: LayerRule(_conv, frozenset({"weight", "bias"})),
    nn.Conv3d: LayerRule(_conv, frozenset({"weight", "bias"})),
    nn.LayerNorm: LayerRule(_layer_norm, frozenset({"weight", "bias"})),
    nn.GroupNorm: LayerRule(_group_norm, frozenset({"weight", "bias"})),
    nn.Embedding: LayerRule(_embedding, frozenset({"weight"}), _embedding_refusal),
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


def _lookup(module_type: type, table: dict[type, object]) -> tuple[type, object] | None:
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
        return rule if _inherits_forward(module_type, base) else None  # type: ignore[return-value]
    found = _lookup(module_type, opacus_samplers())
    if found is not None and _inherits_forward(module_type, found[0]):
        return _opacus_rule(found[1])  # type: ignore[arg-type]
    return None
