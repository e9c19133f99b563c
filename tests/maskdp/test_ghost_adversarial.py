"""Adversarial cases for the ghost engine's per-module rule (maskdp/engines/ghost/functional.py),
found by review: each broke the guarantee before the record-independence probe
(independence.py), the sequential schedule for replayed layers and the sealed-region check
(capture.py). Each model must now be refused (UnsupportedModelError) or computed exactly
(the reference loop in float64), and whether it is refused must not depend on sensitive
content."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import random_clips
from test_ghost import assert_matches, ghost, run
from torch import Tensor, nn

from maskdp.engines.base import MaskedBatch
from maskdp.engines.ghost.engine import GhostEngine, plan_layers
from maskdp.engines.reference import ReferenceEngine
from maskdp.errors import UnsupportedModelError
from maskdp.mechanism.gradient import make_batch
from maskdp.mechanism.views import FillView

DIM = 8
PIXELS = 3 * 4 * 16 * 16


def batch_of(n: int, *, p: float = 0.3, seed: int = 1, protect_labels: bool = False) -> MaskedBatch:
    x, mask, y = random_clips(n, seed=seed, p=p, dtype=torch.float64)
    if p >= 1.0:
        mask = torch.ones_like(mask)
    batch = make_batch(FillView(0.0), x, mask, y, protect_labels=protect_labels)
    return dataclasses.replace(batch, random=False)


def refused_or_matches(engine, model: nn.Module, batch: MaskedBatch, clip: float = 0.5) -> None:
    """Either the ghost engine refuses, or it gives the reference loop's numbers."""
    try:
        got = run(engine, model, batch, clip)
    except UnsupportedModelError:
        return
    assert_matches(got, run(ReferenceEngine, model, batch, clip), rtol=1e-9)


# ------------------------------------------------ 1. batch dimension not 0 (sequence first)


class SeqFirstScale(nn.Module):
    """A LayerScale-like raw parameter applied to sequence-first tokens (T, B, D)."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(1.0 + 0.1 * torch.randn(DIM))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class SeqFirstModel(nn.Module):
    """(3, 4, 16, 16) clips in (4, 8, 8) tubelets: 4 tokens, handled sequence first."""

    def __init__(self, block: str) -> None:
        super().__init__()
        self.patch = nn.Conv3d(3, DIM, (4, 8, 8), stride=(4, 8, 8))
        if block == "scale":
            self.block = SeqFirstScale()
        else:  # PyTorch's default layout: batch_first=False
            self.block = nn.TransformerEncoderLayer(DIM, 2, 16, dropout=0.0)
        self.head = nn.Linear(DIM, 3)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch(x).flatten(2).permute(2, 0, 1)  # (T, B, D)
        return self.head(self.block(tokens).tanh().mean(0))


@pytest.mark.parametrize("block", ["scale", "encoder"])
def test_sequence_first_module_when_the_batch_size_equals_the_token_count(block):
    """The per-module rule reads dimension 0 as the batch for every module but
    nn.MultiheadAttention. When a Poisson batch happens to hold exactly T records, a
    sequence-first (T, B, D) module passes the shape check, its replay slices time steps
    (an elementwise forward reproduces the output, so the public-row check passes too) and
    each 'record' gets the norm of one time step of the whole batch. nn.TransformerEncoderLayer
    with its default batch_first=False was refused before the change (its MHA had no rule):
    it is now accepted, and its linears, read batch-first, are wrong at n == T as well."""
    torch.manual_seed(0)
    model = SeqFirstModel(block).double()
    if block == "scale":  # only the replayed parameter is private (private_parameters)
        for p in [*model.patch.parameters(), *model.head.parameters()]:
            p.requires_grad_(False)
    n = 4  # == number of tokens
    refused_or_matches(GhostEngine, model, batch_of(n))


# ------------------------------------------------ 2. records mixing that the check cannot see


class HandBatchNorm(nn.Module):
    """A BatchNorm written by hand: batch statistics, raw affine parameters (validate_model
    refuses only _BatchNorm subclasses)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(dim))
        self.bias = nn.Parameter(0.1 * torch.randn(dim))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(0, keepdim=True)
        var = x.var(0, unbiased=False, keepdim=True)
        return (x - mean) / (var + 1e-5).sqrt() * self.weight + self.bias


def mixing_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(PIXELS, DIM), HandBatchNorm(DIM), nn.Tanh(), nn.Linear(DIM, 3)
    ).double()


def test_protect_labels_skips_the_reproduction_check():
    """With protect_labels there is no public pass, so check_reproduced never runs: a module
    that mixes records is replayed per record without any check and the norms are not the
    records' (and every record's contribution depends on the others')."""
    model = mixing_model()
    assert [layer.rule.replays for layer in plan_layers(model)] == [False, True, False]
    refused_or_matches(GhostEngine, model, batch_of(3, protect_labels=True))


def test_all_sensitive_masks_make_public_rows_identical_and_the_check_blind():
    """With all-sensitive masks (a documented configuration) every public row is the same
    fill, so a batch-statistics module reproduces its public output exactly when replayed
    one record at a time: the check passes while the full pass mixes records. Sensitive
    content of record 0 then moves the norms of records 1 and 2."""
    model = mixing_model()
    batch = batch_of(3, p=1.0)
    try:
        a = run(GhostEngine, model, batch)
    except UnsupportedModelError:
        return
    full = batch.full.inputs.clone()
    full[0] = -3.0 * full[0]  # sensitive content of record 0 only
    b = run(
        GhostEngine,
        model,
        dataclasses.replace(batch, full=dataclasses.replace(batch.full, inputs=full)),
    )
    assert torch.equal(a.norms[1:], b.norms[1:]), "record 0's sensitive content moved others"
    refused_or_matches(GhostEngine, model, batch)


class Centering(nn.Module):
    """Subtracts the batch mean and scales by a raw parameter (records mix)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return (x - x.mean(0, keepdim=True)) * self.scale


def test_stacked_refusal_does_not_depend_on_sensitive_content():
    """check_reproduced says that whether it raises never depends on sensitive content,
    because only public rows are compared. In the stacked schedule the recorded public rows
    come from one 2n call, so for a module that mixes records they are a function of the
    full rows. Two batches that differ only in sensitive content (all-sensitive masks):
    records (x, -x) give a batch mean of exactly the public fill and pass the check, records
    (x, x') raise. The refusal (and AutoEngine's choice it would drive) reveals sensitive
    content."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), Centering(PIXELS), nn.Linear(PIXELS, 3)).double()
    x, mask, y = random_clips(2, seed=3, p=1.0, dtype=torch.float64)
    mask = torch.ones_like(mask)
    y = torch.tensor([0, 1])

    def raises(inputs: Tensor) -> bool:
        batch = dataclasses.replace(make_batch(FillView(0.0), inputs, mask, y), random=False)
        try:
            run(ghost(stack=True), model, batch)
        except UnsupportedModelError:
            return True
        return False

    symmetric = torch.stack([x[0], -x[0]])  # differs from `x` in sensitive pixels only
    assert raises(symmetric) == raises(x)


# ------------------------------------ 3. gradient reaching the parameters around the output


class Stashing(nn.Module):
    """Keeps an intermediate on self (attention maps for an auxiliary loss, a cache)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(1.0 + 0.1 * torch.randn(DIM))
        self.stash: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        h = x * self.scale
        self.stash = h
        return h.tanh()


class StashModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(PIXELS, DIM)
        self.block = Stashing()
        self.head = nn.Linear(DIM, 3)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(self.inp(x.flatten(1)))
        return self.head(out) + self.block.stash[:, :3]  # the stash reaches the loss


def test_gradient_through_a_stashed_intermediate():
    """analyse_graph checks only that every consumer of the module's parameters lies between
    its inputs and its (first) output; the tuple-output hook sees only returned tensors. A
    tensor kept on self and used by the parent carries gradient to the parameters around the
    captured output G, which the replay never differentiates: norms come out too small."""
    torch.manual_seed(0)
    model = StashModel().double()
    for p in [*model.inp.parameters(), *model.head.parameters()]:
        p.requires_grad_(False)  # only the replayed parameter is private
    refused_or_matches(GhostEngine, model, batch_of(3))


# ------------------------------------------------------- checked and held (passing tests)


class KeywordAttention(nn.Module):
    """Patches -> raw cls token (keyword call) -> sequence-first MHA called by keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv3d(3, DIM, (2, 4, 4), stride=(2, 4, 4))
        self.cls = ClsToken()
        self.attn = nn.MultiheadAttention(DIM, 2)
        self.head = nn.Linear(DIM, 3)

    def forward(self, x: Tensor) -> Tensor:
        t = self.cls(tokens=self.patch(x).flatten(2).transpose(1, 2)).transpose(0, 1)
        out = self.attn(query=t, key=t, value=t, need_weights=False)[0]
        return self.head(out[0])


class ClsToken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, DIM))

    def forward(self, *, tokens: Tensor) -> Tensor:
        return torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], 1)


@pytest.mark.parametrize("frozen", [None, "attn.out_proj", "attn.in_proj_bias"])
@pytest.mark.parametrize("stack", [False, True])
def test_keyword_calls_and_frozen_parameters_inside_a_replayed_subtree(frozen, stack):
    """Keyword tensors (MHA by name, a keyword-only module) get the right batch dims, and
    a private_parameters subset that freezes part of a replayed subtree leaves it out of
    the replay (functional_call takes the frozen ones from the module) without changing
    the trainable parameters' norms."""
    torch.manual_seed(0)
    model = KeywordAttention().double()
    if frozen is not None:
        for name, p in model.named_parameters():
            if name == frozen or name.startswith(frozen + "."):
                p.requires_grad_(False)
    assert {layer.path for layer in plan_layers(model) if layer.rule.replays} == {"cls", "attn"}
    batch = batch_of(3)
    clip = float(run(ReferenceEngine, model, batch).norms.median())
    got = run(ghost(stack=stack), model, batch, clip)
    assert_matches(got, run(ReferenceEngine, model, batch, clip), rtol=1e-9)


# ------------------------------------------- the probe itself (independence.py), any layer


class SeqFirstLinear(nn.Module):
    """Only ruled layers (Conv3d, Linear), but the Linear runs on (T, B, D) tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv3d(3, DIM, (4, 8, 8), stride=(4, 8, 8))
        self.mix = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, 3)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch(x).flatten(2).permute(2, 0, 1)  # (T = 4, B, D)
        return self.head(self.mix(tokens).tanh().mean(0))


def test_a_sequence_first_ruled_layer_is_refused_when_the_batch_equals_its_length():
    """No replayed module at all: the Linear rule reads dimension 0 (time, T = 4 = n) as the
    batch. Without the probe the ghost norms were silently wrong (measured, clip 100:
    1.9318, 1.1483, 1.4489, 2.5033 against the reference loop's 1.9260, 1.1335, 1.4781,
    2.5089); now the engine refuses before computing anything."""
    torch.manual_seed(0)
    model = SeqFirstLinear().double()
    assert not any(layer.rule.replays for layer in plan_layers(model))
    with pytest.raises(UnsupportedModelError, match=r"^mix \(Linear\): with 3 records"):
        run(GhostEngine, model, batch_of(4))


def test_the_probe_reads_no_values_and_leaves_the_generator_as_it_was():
    from maskdp.engines.ghost.independence import probe_record_independence
    from maskdp.mechanism.views import ModelInput

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(PIXELS, 3)).double()
    layers = plan_layers(model)
    nan_clips = torch.full((2, 3, 4, 16, 16), float("nan"), dtype=torch.float64)
    before = torch.get_rng_state()
    probe_record_independence(model, layers, ModelInput(nan_clips))  # dropout: replayed draws
    assert torch.equal(torch.get_rng_state(), before)
