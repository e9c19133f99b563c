"""MaskDPOptimizer against independent truths.

- no clipping and no noise equals vanilla training (plain SGD on sum-loss / B);
- the noise, isolated by subtracting a sigma = 0 run, has std sigma C / B (chi-square
  bounds), on empty batches too, with B the expected (not realised) batch size;
- the ledger of k steps equals a PrivacyLedger built directly; the budget guard fires
  exactly after the last affordable step and changes nothing;
- a checkpoint round trip reproduces an uninterrupted run bit for bit;
- with protect_labels, the update equals Opacus's DPOptimizer (plain DP-SGD).
"""

from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch
from scipy import stats
from torch import nn

import maskdp
from accounting.events import PoissonGaussianEvent
from accounting.ledger import PrivacyLedger
from maskdp.engines.base import ENGINES, engine_names
from maskdp.errors import (
    InvalidInputError,
    PrivacyBudgetExceeded,
    UnsafeModelError,
    UnsupportedModelError,
)
from maskdp.models import SmallVideoCNN, VideoViT
from maskdp.optimizer import MaskDPOptimizer
from maskdp.views import FillView

ENGINE_NAMES = [n for n in engine_names() if n != "auto"]


def tiny_vit(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    model = VideoViT(num_classes=3, frames=4, image_size=16, dim=16, depth=1, heads=2)
    return model.to(dtype)


def tiny_cnn(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return SmallVideoCNN(num_classes=3, width=4).to(dtype)


def batch(n: int, *, seed: int = 1, mask: str = "random", dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, 16, 16, generator=gen).to(dtype)
    if mask == "random":
        m = torch.rand(n, 4, 16, 16, generator=gen) < 0.4
    else:
        m = torch.full((n, 4, 16, 16), mask == "all", dtype=torch.bool)
    y = torch.randint(0, 3, (n,), generator=gen)
    return x, m, y


def wrap(model: nn.Module, inner=None, **kw) -> MaskDPOptimizer:
    args = dict(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=4,
        sample_rate=0.1,
        view=FillView(0.0),
        engine="reference",
    )
    args.update(kw)
    inner = inner if inner is not None else torch.optim.SGD(model.parameters(), lr=0.1)
    return MaskDPOptimizer(inner, **args)


def supported(engine: str, model: nn.Module) -> None:
    try:
        ENGINES[engine].check_support(model)
    except UnsupportedModelError as err:
        pytest.skip(f"{engine} does not support {type(model).__name__}: {err}")


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_params_close(a, b, atol=1e-6):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


# ---------------------------------------------------------------------- vanilla equivalence


@pytest.mark.parametrize("engine", ENGINE_NAMES)
@pytest.mark.parametrize("mask", ["none", "random"])
def test_no_clip_no_noise_equals_vanilla_sgd(engine, mask):
    """Huge C, sigma = 0: k steps equal k steps of SGD on sum-loss / B (varying batch sizes)."""
    model, ref = tiny_vit(), tiny_vit()
    supported(engine, model)
    opt = wrap(model, max_grad_norm=1e8, engine=engine, expected_batch_size=4)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for k, n in enumerate([5, 3, 0, 2]):
        x, m, y = batch(n, seed=k, mask=mask)
        opt.zero_grad()
        opt.backward(x, m, y)
        opt.step()
        sgd.zero_grad()
        (loss_fn(ref(x), y) / 4).backward()
        sgd.step()
    assert_params_close(params(model), params(ref))
    assert opt.steps == 4 and opt.epsilon(1e-5) == math.inf


# ---------------------------------------------------------------------- noise


def one_step_update(sigma: float, case: str, *, seed: int = 7) -> list[torch.Tensor]:
    """Params after one SGD(lr=1) step from the same start; ``case`` picks the batch."""
    model = tiny_vit()
    opt = wrap(
        model,
        inner=torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=sigma,
        max_grad_norm=0.5,
        expected_batch_size=8,
        noise_generator=torch.Generator().manual_seed(seed),
    )
    opt.zero_grad()
    if case == "batch":
        opt.backward(*batch(3))
    elif case == "empty-batch":
        opt.backward(*batch(0))
    opt.step()
    return params(model)


@pytest.mark.parametrize("case", ["batch", "empty-batch", "no-backward"])
def test_noise_std_is_sigma_c_over_expected_batch_size(case):
    sigma, clip, expected = 2.0, 0.5, 8
    clean = one_step_update(0.0, case)
    noisy = one_step_update(sigma, case)
    diffs = [c - n for c, n in zip(clean, noisy, strict=True)]
    assert all(bool((d != 0).all()) for d in diffs), "every coordinate of every param is noised"
    z = torch.cat([d.flatten() for d in diffs])
    n, std = z.numel(), sigma * clip / expected  # realised batch 3 or 0 must not matter
    # (n - 1) s^2 / std^2 ~ chi2(n - 1): a 1e-6 two-sided interval.
    low, high = stats.chi2.ppf([5e-7, 1 - 5e-7], n - 1)
    var = float(z.var())
    assert low / (n - 1) < var / std**2 < high / (n - 1), (var**0.5, std)
    assert abs(float(z.mean())) < 5.5 * std / n**0.5


def test_noise_is_reproducible_from_the_generator():
    assert_params_close(one_step_update(1.0, "batch"), one_step_update(1.0, "batch"), atol=0)
    other = one_step_update(1.0, "batch", seed=8)
    assert not torch.equal(other[0], one_step_update(1.0, "batch")[0])


# ---------------------------------------------------------------------- accounting


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_equals_ledger_computed_directly(accountant):
    q, sigma, k, delta = 0.05, 1.1, 4, 1e-5
    model = tiny_vit()
    opt = wrap(model, noise_multiplier=sigma, sample_rate=q, accountant=accountant)
    assert opt.epsilon(delta) == 0.0
    for i in range(k):
        opt.zero_grad()
        if i == 0:
            opt.backward(*batch(2))
        opt.step()
    direct = PrivacyLedger([PoissonGaussianEvent(q, sigma, k)])
    assert opt.ledger == direct
    assert opt.epsilon(delta) == direct.epsilon(delta, accountant=accountant)
    assert opt.steps == k


def test_sigma_zero_reports_infinite_epsilon_and_records_nothing():
    opt = wrap(tiny_vit(), noise_multiplier=0.0, target_delta=1e-5)
    assert opt.epsilon() == 0.0
    opt.step()
    assert opt.epsilon() == math.inf and opt.ledger.steps == 0 and opt.steps == 1


def test_epsilon_needs_a_delta():
    opt = wrap(tiny_vit(), noise_multiplier=1.0)
    with pytest.raises(InvalidInputError, match="delta"):
        opt.epsilon()
    with pytest.raises(InvalidInputError, match="delta"):
        opt.epsilon(1.5)


def k_star_target(q, sigma, delta, accountant="rdp"):
    """A target between eps(3 steps) and eps(4 steps), and k* found with the ledger directly."""

    def eps(k):
        return PrivacyLedger([PoissonGaussianEvent(q, sigma, k)]).epsilon(
            delta, accountant=accountant
        )

    target = (eps(3) + eps(4)) / 2
    k_star = 0
    while eps(k_star + 1) <= target:
        k_star += 1
    return target, k_star


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_budget_guard_fires_exactly_before_the_step_that_passes_the_target(accountant):
    q, sigma, delta = 0.1, 1.0, 1e-5
    target, k_star = k_star_target(q, sigma, delta, accountant)
    assert k_star == 3
    model = tiny_vit()
    gen = torch.Generator().manual_seed(0)
    opt = wrap(
        model,
        inner=torch.optim.AdamW(model.parameters(), lr=1e-2),
        noise_multiplier=sigma,
        sample_rate=q,
        target_epsilon=target,
        target_delta=delta,
        accountant=accountant,
        noise_generator=gen,
    )
    for k in range(k_star):
        opt.zero_grad()
        opt.backward(*batch(2, seed=k))
        opt.step()
    assert opt.epsilon() <= target
    before = (params(model), opt.ledger, copy.deepcopy(opt.state_dict()), gen.get_state())
    opt.zero_grad()
    opt.backward(*batch(2, seed=99))
    with pytest.raises(PrivacyBudgetExceeded, match="target_epsilon"):
        opt.step()
    assert_params_close(params(model), before[0], atol=0)
    assert opt.ledger == before[1] and opt.steps == k_star
    after = opt.state_dict()
    for key, value in before[2]["optimizer"]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, after["optimizer"]["state"][key][name])
    assert torch.equal(gen.get_state(), before[3])


def test_budget_guard_counts_the_steps_of_a_restored_ledger():
    q, sigma, delta = 0.1, 1.0, 1e-5
    target, k_star = k_star_target(q, sigma, delta)
    kw = dict(noise_multiplier=sigma, sample_rate=q, target_epsilon=target, target_delta=delta)
    first = wrap(tiny_vit(), **kw)
    for _ in range(k_star - 1):
        first.step()
    resumed = wrap(tiny_vit(), **kw)
    resumed.step()  # a cached budget must not survive loading
    resumed.load_state_dict(first.state_dict())
    resumed.step()
    with pytest.raises(PrivacyBudgetExceeded, match=f"step {k_star + 1}"):
        resumed.step()


# ---------------------------------------------------------------------- checkpoints


def run(model, opt, batches):
    for x, m, y in batches:
        opt.zero_grad()
        opt.backward(x, m, y)
        opt.step()


def test_state_dict_round_trip_continues_like_an_uninterrupted_run():
    batches = [batch(n, seed=s) for s, n in enumerate([3, 2, 0, 4, 1])]
    kw = dict(noise_multiplier=0.7, max_grad_norm=0.5, sample_rate=0.2)

    def fresh(seed: int):
        model = tiny_vit()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, wrap(
            model, inner=inner, noise_generator=torch.Generator().manual_seed(seed), **kw
        )

    model_a, opt_a = fresh(0)
    run(model_a, opt_a, batches)

    model_b, opt_b = fresh(0)
    run(model_b, opt_b, batches[:2])
    buffer = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buffer)
    json.dumps(opt_b.state_dict()["ledger"])  # the ledger is JSON-compatible
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model_c, opt_c = fresh(12345)  # the generator state comes from the checkpoint
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    run(model_c, opt_c, batches[2:])

    assert_params_close(params(model_a), params(model_c), atol=0)
    assert opt_a.ledger == opt_c.ledger and opt_c.steps == 5


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda s: s.update(format="other"),
        lambda s: s.update(steps=7),
        lambda s: s.update(ledger={"format": "nope"}),
        lambda s: s.update(noise_generator=torch.zeros(3, dtype=torch.uint8)),
        lambda s: s["optimizer"]["param_groups"].append({}),
        lambda s: s.pop("ledger"),
    ],
)
def test_load_state_dict_validates_before_changing_anything(corrupt):
    model = tiny_vit()
    opt = wrap(model, noise_multiplier=1.0, noise_generator=torch.Generator().manual_seed(0))
    run(model, opt, [batch(2)])
    state = copy.deepcopy(opt.state_dict())
    fresh_model = tiny_vit()
    fresh = wrap(
        fresh_model, noise_multiplier=1.0, noise_generator=torch.Generator().manual_seed(1)
    )
    before = copy.deepcopy(fresh.state_dict())
    corrupt(state)
    with pytest.raises(InvalidInputError):
        fresh.load_state_dict(state)
    after = fresh.state_dict()
    assert after["ledger"] == before["ledger"] and after["steps"] == 0
    assert torch.equal(after["noise_generator"], before["noise_generator"])
    assert after["optimizer"] == before["optimizer"]


def test_generator_state_needs_a_generator():
    model = tiny_vit()
    opt = wrap(model, noise_multiplier=1.0, noise_generator=torch.Generator().manual_seed(0))
    with pytest.raises(InvalidInputError, match="noise_generator"):
        wrap(tiny_vit(), noise_multiplier=1.0).load_state_dict(opt.state_dict())


# ---------------------------------------------------------------------- against Opacus


@pytest.mark.filterwarnings("ignore:Full backward hook")
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_protect_labels_equals_opacus_dp_sgd(engine):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model, ref = tiny_cnn(), tiny_cnn()
    supported(engine, model)
    clip, expected = 0.05, 6
    x, m, y = batch(4, mask="all")
    opt = wrap(
        model, engine=engine, protect_labels=True, max_grad_norm=clip, expected_batch_size=expected
    )
    opt.zero_grad()
    opt.backward(x, m, y)
    opt.step()
    assert (opt.last_clip_factors < 1).all(), "the test must exercise clipping"

    gsm = GradSampleModule(ref, loss_reduction="mean")
    dp = DPOptimizer(
        torch.optim.SGD(ref.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=expected,
        loss_reduction="mean",
    )
    dp.zero_grad()
    nn.CrossEntropyLoss()(gsm(x), y).backward()
    dp.step()
    gsm._close()
    # Opacus clips with C / (norm + 1e-6): a relative 1e-6 difference in the factors.
    assert_params_close(params(model), params(ref), atol=1e-6)


# ---------------------------------------------------------------------- loop behaviour


@pytest.mark.parametrize("reduction", ["sum", "none", "callable"])
def test_loss_reduction_does_not_change_the_update(reduction):
    x, m, y = batch(3)

    def update(loss_fn):
        model = tiny_vit()
        opt = wrap(model, loss_fn=loss_fn, max_grad_norm=0.1)
        opt.zero_grad()
        opt.backward(x, m, y)
        opt.step()
        return params(model)

    loss_fn = (
        (lambda out, target: nn.functional.cross_entropy(out, target, reduction="none"))
        if reduction == "callable"
        else nn.CrossEntropyLoss(reduction=reduction)
    )
    assert_params_close(update(nn.CrossEntropyLoss()), update(loss_fn), atol=1e-12)


def test_backward_calls_accumulate_into_one_step():
    """Two chunks of one batch before a step equal the whole batch (virtual batches)."""
    x, m, y = batch(5)
    whole, split = tiny_vit(), tiny_vit()
    opt_whole, opt_split = wrap(whole, max_grad_norm=0.1), wrap(split, max_grad_norm=0.1)
    opt_whole.zero_grad()
    loss = opt_whole.backward(x, m, y)
    opt_whole.step()
    opt_split.zero_grad()
    opt_split.backward(x[:2], m[:2], y[:2])
    opt_split.backward(x[2:], m[2:], y[2:])
    opt_split.step()
    assert_params_close(params(whole), params(split), atol=1e-12)
    assert loss.shape == () and not loss.requires_grad
    assert opt_whole.last_norms.shape == (5,) and opt_split.last_clip_factors.shape == (3,)
    assert float(opt_whole.last_public) > 0 and float(opt_whole.last_private) > 0


def test_step_consumes_the_accumulated_sum():
    model = tiny_vit()
    opt = wrap(model)
    opt.zero_grad()
    opt.backward(*batch(2))
    opt.step()
    opt.step()  # nothing since the last step: an empty batch, zero gradient at sigma = 0
    assert all(float(p.grad.abs().max()) == 0 for p in model.parameters())


def test_lr_scheduler_drives_the_wrapper():
    model = tiny_vit()
    opt = wrap(model)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        opt.zero_grad()
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert opt.original_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    assert opt.defaults["lr"] == 0.1  # __getattr__/properties reach the inner optimizer


def test_partially_frozen_model_updates_only_released_parameters():
    model = tiny_vit()
    model.patch_embed.requires_grad_(False)
    frozen = model.patch_embed.weight.detach().clone()
    opt = wrap(
        model, inner=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    )
    opt.zero_grad()
    opt.backward(*batch(2))
    opt.step()
    assert torch.equal(model.patch_embed.weight, frozen)
    with pytest.raises(InvalidInputError, match="patch_embed"):
        wrap(model, inner=torch.optim.SGD(model.parameters(), lr=0.1))


def test_add_param_group_checks_parameters():
    model = tiny_vit()
    opt = wrap(model, inner=torch.optim.SGD(model.head.parameters(), lr=0.1))
    opt.add_param_group({"params": list(model.norm.parameters()), "lr": 0.01})
    assert len(opt.param_groups) == 2
    with pytest.raises(InvalidInputError, match="not a trainable parameter"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "override, match",
    [
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"expected_batch_size": 0}, "expected_batch_size"),
        ({"expected_batch_size": 4.0}, "expected_batch_size"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"noise_multiplier": 1.0, "target_epsilon": 1.0}, "target_delta"),
        ({"noise_multiplier": 0.0, "target_epsilon": 1.0, "target_delta": 1e-5}, "noise"),
        ({"noise_multiplier": 1.0, "target_epsilon": -1.0, "target_delta": 1e-5}, "target_eps"),
        ({"target_delta": 1.0}, "target_delta"),
        ({"accountant": "moments"}, "accountant"),
        ({"engine": "fastest"}, "engine"),
        ({"protect_labels": 1}, "protect_labels"),
        ({"noise_generator": 3}, "noise_generator"),
        ({"view": 3}, "view"),
    ],
)
def test_bad_arguments_raise_typed_errors(override, match):
    with pytest.raises(InvalidInputError, match=match):
        wrap(tiny_vit(), **override)


def test_bad_optimizer_and_models_are_refused():
    model = tiny_vit()
    with pytest.raises(InvalidInputError, match="optimizer"):
        MaskDPOptimizer(
            model.parameters(),
            model=model,
            loss_fn=nn.CrossEntropyLoss(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=1,
            sample_rate=0.1,
        )
    with pytest.raises(InvalidInputError, match="not a trainable parameter"):
        wrap(model, inner=torch.optim.SGD(tiny_vit().parameters(), lr=0.1))
    bn = nn.Sequential(nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4))
    with pytest.raises(UnsafeModelError, match="BatchNorm"):
        wrap(bn, inner=torch.optim.SGD(bn.parameters(), lr=0.1))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x, m, y: (x, m[:, :2], y), "mask shape"),
        (lambda x, m, y: (x, m.float(), y), "bool"),
        (lambda x, m, y: (x.masked_fill(m[:, None], math.nan), m, y), "NaN"),
        (lambda x, m, y: (x, m, y[:1]), "targets"),
        (lambda x, m, y: (x.long(), m, y), "floating"),
    ],
)
def test_bad_batches_raise_before_anything_changes(make, match):
    model = tiny_vit()
    opt = wrap(model)
    with pytest.raises(InvalidInputError, match=match):
        opt.backward(*make(*batch(2)))
    opt.step()  # still a valid (empty) step
    assert all(float(p.grad.abs().max()) == 0 for p in model.parameters())


def test_public_api_exports_the_wrapper():
    assert maskdp.MaskDPOptimizer is MaskDPOptimizer
