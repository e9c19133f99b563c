r"""What a ghost layer rule is, and how its two branches are chosen (dispatch).

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

This module holds the contract every rule follows (:class:`Pass`, :class:`Pair`,
:class:`LayerResult`, :class:`LayerRule`), the dispatch between the two branches
(:func:`uses_ghost`, :func:`layer_result`) and the helpers shared by the rule modules.
The rules themselves live in one module per layer family (:mod:`.linear`, :mod:`.conv`,
:mod:`.norm`, :mod:`.embedding`; float64 Gram terms and their rounding bounds in
:mod:`.ghost_norm`); :mod:`.registry` maps module types to them. To add a layer rule,
see :mod:`maskdp.engines.ghost.registry`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

Mode = Literal["auto", "ghost", "instantiate"]

#: The fix every refusal of the ghost engine suggests.
FIX = "use engine='vmap' (torch.func handles any layer)"

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
    #: The call, for rules that replay it (:mod:`.functional`), and ``(first row, output
    #: rows)`` of the recorded output of its public rows (None: no public rows).
    replay: Any = None
    result: tuple[int, Tensor] | None = None

    @property
    def n(self) -> int:
        return int(self.grad.shape[0 if self.replay is None else self.replay.out_dim])


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
    what is actually summed (:func:`~maskdp.engines.ghost.ghost_norm.ghost_slack`).
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
    #: Whether the rule replays the module's call (:mod:`.functional`): the capture then
    #: records the call's structure and accepts several outputs (the first is used).
    replays: bool = False
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
        if rule.ghost is None:
            raise RuntimeError("uses_ghost chose the ghost branch of a rule that has none")
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


def sum_rows(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Sum ``x`` (n, ..., *shape) over everything between the batch and ``shape``."""
    dims = tuple(range(1, x.dim() - len(shape)))
    return x.sum(dims) if dims else x
