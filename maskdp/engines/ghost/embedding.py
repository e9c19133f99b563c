r"""Embeddings: ``nn.Embedding`` (ghost branch over ids) and MaskDP's
:class:`~maskdp.models.vit.PositionalEmbedding` (``x + weight``, instantiated).

An embedding's per-sample gradient scatters each row's output gradient to its id; its
ghost norm is :math:`\sum_{r,s} 1[id_r = id_s]\, g_r \cdot g_s`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskdp.engines.ghost.ghost_norm import ghost_slack
from maskdp.engines.ghost.rules import (
    GHOST_MEMORY_RATIO,
    LayerResult,
    LayerRule,
    Pair,
    Pass,
    sum_rows,
    zero_dropped,
)


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


def _positional(module: nn.Module, pass_: Pass, names: frozenset[str]) -> dict[str, Tensor]:
    r""":class:`~maskdp.models.vit.PositionalEmbedding` (``x + weight``): the per-sample
    gradient is ``G`` summed to the weight's shape."""
    shape, g = tuple(module.weight.shape), pass_.grad
    if tuple(g.shape[g.dim() - len(shape) :]) == shape:
        return {"weight": sum_rows(g, shape)}
    if not pass_.n:
        return {"weight": g.new_zeros(0, *shape)}
    return {"weight": torch.stack([gi.sum_to_size(shape) for gi in g])}


#: ``nn.Embedding``.
EMBEDDING_RULE = LayerRule(
    _embedding_per_sample,
    frozenset({"weight"}),
    ghost=_embedding_ghost,
    prefers_ghost=_embedding_prefers_ghost,
    refusal=_embedding_refusal,
)
#: :class:`~maskdp.models.vit.PositionalEmbedding`.
POSITIONAL_RULE = LayerRule(_positional, frozenset({"weight"}))
