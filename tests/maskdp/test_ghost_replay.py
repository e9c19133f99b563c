"""The ghost engine's per-module rule (maskdp/engines/ghost/functional.py): modules whose own
parameters no layer rule covers (raw tokens and tables, nn.MultiheadAttention, overridden
forwards) are replayed per record, and the result must equal the per-sample reference loop
(float64, 1e-9), pass the leak test, and refuse what it cannot do exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import random_clips
from test_ghost import assert_matches, ghost, run
from test_leak import CHANGED, CLIP, engine_pair, private_distance
from torch import Tensor, nn

from maskdp.engines.base import MaskedBatch, resolve_engine
from maskdp.engines.ghost.engine import GhostEngine, plan_layers
from maskdp.engines.reference import ReferenceEngine
from maskdp.errors import UnsupportedModelError
from maskdp.mechanism.gradient import make_batch
from maskdp.mechanism.views import FillView, ModelInput

DIM, TOKENS = 8, 2 * 4 * 4  # a (4, 16, 16) clip in (2, 4, 4) tubelets


class Tokens(nn.Module):
    """A raw cls token concatenated and a raw positional table added (ViT embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, DIM))
        self.pos = nn.Parameter(0.1 * torch.randn(1, TOKENS + 1, DIM))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos


class RelativeBias(nn.Module):
    """Attention logits with a raw relative-position bias table gathered by index (Swin)."""

    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.table = nn.Parameter(0.1 * torch.randn(2 * (TOKENS + 1) - 1, heads))
        pos = torch.arange(TOKENS + 1)
        self.register_buffer("index", pos[:, None] - pos[None, :] + TOKENS)

    def forward(self, x: Tensor) -> Tensor:
        n, t, _ = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        bias = self.table[self.index].permute(2, 0, 1)  # (heads, t, t)
        attn = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias).softmax(-1)
        return (attn @ v).transpose(1, 2).reshape(n, t, DIM)


class TokenModel(nn.Module):
    """Patches -> tokens -> an attention layer of ``kind`` -> norm -> head."""

    def __init__(self, kind: str = "mha", batch_first: bool = True, dropout: float = 0.0):
        super().__init__()
        self.kind, self.batch_first = kind, batch_first
        self.patch = nn.Conv3d(3, DIM, (2, 4, 4), stride=(2, 4, 4))
        self.tokens = Tokens()
        if kind == "mha":
            self.attn = nn.MultiheadAttention(DIM, 2, dropout=dropout, batch_first=batch_first)
        elif kind == "encoder":
            self.attn = nn.TransformerEncoderLayer(DIM, 2, 16, dropout=dropout, batch_first=True)
        else:
            self.attn = RelativeBias()
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, 3)

    def forward(self, x: Tensor) -> Tensor:
        t = self.tokens(self.patch(x).flatten(2).transpose(1, 2))
        if self.kind != "mha":
            t = self.attn(t)
        elif self.batch_first:
            t, _ = self.attn(t, t, t)
        else:
            s = t.transpose(0, 1)
            t = self.attn(s, s, s, need_weights=False)[0].transpose(0, 1)
        return self.head(self.norm(t[:, 0]))


def model_of(kind: str = "mha", **kw) -> nn.Module:
    torch.manual_seed(0)
    return TokenModel(kind, **kw).double()


def batch_of(n: int = 3, random: bool = False, dtype=torch.float64) -> MaskedBatch:
    x, mask, y = random_clips(n, seed=1, p=0.3, dtype=dtype)
    return dataclasses.replace(make_batch(FillView(0.0), x, mask, y), random=random)


CASES = {
    "mha_batch_first": dict(kind="mha", batch_first=True),
    "mha_sequence_first": dict(kind="mha", batch_first=False),
    "encoder_layer": dict(kind="encoder"),
    "relative_bias": dict(kind="relative"),
}


@pytest.mark.parametrize("stack", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_replayed_modules_match_the_reference_loop(case, stack):
    model = model_of(**CASES[case])
    replayed = {layer.path for layer in plan_layers(model) if layer.rule.replays}
    # Only what no rule covers: the encoder layer's linears and norms keep their rules.
    assert replayed == {"tokens", "attn.self_attn" if case == "encoder_layer" else "attn"}
    assert resolve_engine("auto", model) is GhostEngine
    batch = batch_of()
    clip = float(run(ReferenceEngine, model, batch).norms.median())  # some records clipped
    got = run(ghost(stack=stack), model, batch, clip)
    assert_matches(got, run(ReferenceEngine, model, batch, clip), rtol=1e-9)
    assert (got.clip_factors < 1).any() and (got.clip_factors == 1).any()


def test_protect_labels_matches_the_reference_loop():
    model = model_of("mha", batch_first=False)
    x, mask, y = random_clips(3, seed=1, p=0.3, dtype=torch.float64)
    batch = make_batch(FillView(0.0), x, mask, y, protect_labels=True)
    assert_matches(run(GhostEngine, model, batch), run(ReferenceEngine, model, batch), rtol=1e-9)


def test_overridden_forward_of_a_ruled_type_is_replayed():
    """A Linear subclass with its own forward does not inherit Linear's rule: it is replayed."""

    class ScaledLinear(nn.Linear):
        def forward(self, x: Tensor) -> Tensor:
            return 2 * super().forward(x).tanh()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), ScaledLinear(3 * 4 * 16 * 16, 3)).double()
    assert [layer.rule.replays for layer in plan_layers(model)] == [True]
    batch = batch_of()
    assert_matches(run(GhostEngine, model, batch), run(ReferenceEngine, model, batch), rtol=1e-9)


@pytest.mark.parametrize("how", ["huge", "other_record"])
def test_leak_test_on_a_replayed_model(how):
    """DESIGN.md section 6 on the per-module rule: the public side is bit-identical (checked
    in engine_pair), the private sum moves by at most 2C per changed record and the other
    records' norms do not move."""
    a, b = engine_pair("ghost", "fill", model_of("mha", batch_first=False).float(), how)
    assert private_distance(a, b) <= 2 * CLIP * len(CHANGED) * (1 + 1e-5)
    unchanged = [i for i in range(len(a.norms)) if i not in CHANGED]
    assert torch.equal(a.norms[unchanged], b.norms[unchanged])


def test_non_finite_sensitive_content_gets_zero_factor_without_raising():
    model = model_of("relative")
    batch = batch_of()
    full = batch.full.inputs.clone()
    full[0, :, 0, 0, 0] = float("nan")  # a sensitive pixel of record 0 (FillView: public 0)
    got = run(GhostEngine, model, dataclasses.replace(batch, full=ModelInput(full)))
    assert got.clip_factors[0] == 0 and torch.isfinite(got.norms[1:]).all()


# ----------------------------------------------------------------------------- refusals


def test_raw_parameter_in_the_root_forward_is_refused_with_a_fix():
    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.head = nn.Linear(3 * 4 * 16 * 16, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(x.flatten(1)) * self.scale

    with pytest.raises(UnsupportedModelError, match=r"<root>: Root.*move them into a submodule"):
        GhostEngine.check_support(Root())
    assert resolve_engine("auto", Root()).name == "vmap"


def test_using_attention_weights_in_the_loss_is_refused():
    class UsesWeights(TokenModel):
        def forward(self, x: Tensor) -> Tensor:
            t = self.tokens(self.patch(x).flatten(2).transpose(1, 2))
            out, weights = self.attn(t, t, t)
            return self.head(self.norm(out[:, 0])) + weights[:, 0, :3]

    torch.manual_seed(0)
    model = UsesWeights().double()
    with pytest.raises(UnsupportedModelError, match=r"attn \(MultiheadAttention\).*other than"):
        run(GhostEngine, model, batch_of())
    assert all(p.grad is None for p in model.parameters())


def test_attention_dropout_is_refused():
    model = model_of("mha", dropout=0.5).train()
    with pytest.raises(UnsupportedModelError, match=r"attn \(MultiheadAttention\).*random numb"):
        run(GhostEngine, model, batch_of(random=True))


class _Mixing(nn.Module):
    """Subtracts the batch mean (records mix) and scales by a raw parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(DIM))

    def forward(self, x: Tensor) -> Tensor:
        return (x - x.mean(0, keepdim=True)) * self.scale


class _SequenceFirst(nn.Module):
    """A recurrence along dimension 0, as a sequence-first module has (the records would be
    read as time steps), scaled by a raw parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        return x.cumsum(0) * self.weight


@pytest.mark.parametrize("stack", [False, True])
@pytest.mark.parametrize("kind", ["mixing", "sequence_first"])
def test_a_module_whose_rows_are_not_records_is_refused(kind, stack):
    """The record-independence probe (maskdp/engines/ghost/independence.py)."""
    torch.manual_seed(0)
    if kind == "mixing":
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 16 * 16, DIM), _Mixing(),
                              nn.Linear(DIM, 3))  # fmt: skip
    else:
        model = nn.Sequential(nn.Flatten(), _SequenceFirst(), nn.Linear(3 * 4 * 16 * 16, 3))
    model = model.double()
    with pytest.raises(UnsupportedModelError, match=r"^[12] \(_\w+\): changing one record"):
        run(ghost(stack=stack), model, batch_of())
    assert not any(m._forward_hooks for m in model.modules())


def test_a_replay_that_does_not_give_the_output_back_is_refused():
    from maskdp.engines.ghost.functional import check_reproduced

    out = torch.randn(3, 4, dtype=torch.float64)
    check_reproduced("m (M)", out + 1e-9, out)  # batched against per-sample rounding
    with pytest.raises(UnsupportedModelError, match=r"^m \(M\): replayed one record"):
        check_reproduced("m (M)", out.flip(0), out)
