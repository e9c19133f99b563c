"""MaskDPOptimizer against independent truths.

- without noise the released gradient is sum_U h / B_pub + sum_P c (g - h) / B, checked
  against a brute-force per-record loop (clipping included); with the public batch equal
  to the private batch, B_pub = B and no clipping, that is vanilla SGD on sum-loss / B;
- the noise, isolated by subtracting a sigma = 0 run, has std sigma C / B (chi-square
  bounds) and is Gaussian, on empty batches too, with B the expected private batch size
  (not the realised one, nor B_pub); it comes from secret randomness by default, and only
  the insecure seeded test randomness replays it;
- a private record whose content is not finite contributes exactly zero;
- the ledger of k steps equals a PrivacyLedger built directly; the budget guard fires
  exactly after the last affordable step and changes nothing;
- a checkpoint round trip reproduces an uninterrupted run bit for bit (seeded test
  randomness); secret randomness saves no state;
- with protect_labels, the update equals Opacus's DPOptimizer (plain DP-SGD).
"""

from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch
from helpers import batch, public_batch, tiny_cnn, tiny_vit, wrap
from maskdp.accounting.events import PoissonGaussianEvent
from maskdp.accounting.ledger import PrivacyLedger
from scipy import stats
from support import supported_engines
from torch import nn

import maskdp
from maskdp.engines.base import engine_names
from maskdp.errors import (
    InvalidInputError,
    PrivacyBudgetExceeded,
    UnsafeModelError,
)
from maskdp.mechanism.randomness import (
    InsecureRandomnessWarning,
    InsecureSeededRandomness,
    SecretRandomness,
)
from maskdp.training.optimizer import MaskDPOptimizer

SEEDED = pytest.mark.filterwarnings("ignore::maskdp.mechanism.randomness.InsecureRandomnessWarning")
ENGINE_NAMES = [n for n in engine_names() if n != "auto"]


def fill(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """FillView(0.0) written out: sensitive pixels set to 0."""
    return x.masked_fill(m[:, None], 0.0)


def supported(engine: str, model: nn.Module) -> None:
    """Every engine must compute the test models (tests/maskdp/support.py); a refusal fails."""
    assert engine in supported_engines(type(model).__name__)


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_params_close(a, b, atol=1e-6):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


# ---------------------------------------------------------------------- release formula


def record_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The gradient of one record's cross-entropy (x has a batch dimension of one)."""
    loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
    return list(torch.autograd.grad(loss, list(model.parameters())))


def brute_force_release(model, private, public, *, clip, batch_size, public_batch_size):
    """sum_U h_j / B_pub + sum_P min(1, C / ||g_i - h_i||) (g_i - h_i) / B, one record at
    a time (FillView(0.0) written out)."""
    total = [torch.zeros_like(p) for p in model.parameters()]
    ux, um, uy = public
    for j in range(len(ux)):
        h = record_grads(model, fill(ux[j : j + 1], um[j : j + 1]), uy[j : j + 1])
        total = [t + hj / public_batch_size for t, hj in zip(total, h, strict=True)]
    x, m, y = private
    for i in range(len(x)):
        g = record_grads(model, x[i : i + 1], y[i : i + 1])
        h = record_grads(model, fill(x[i : i + 1], m[i : i + 1]), y[i : i + 1])
        delta = [gi - hi for gi, hi in zip(g, h, strict=True)]
        norm = math.sqrt(sum(float((d**2).sum()) for d in delta))
        factor = min(1.0, clip / norm) if norm > 0 else 1.0
        total = [t + factor * d / batch_size for t, d in zip(total, delta, strict=True)]
    return total


RELEASE_CASES = {
    # name: (public batch is the private batch, mask, max_grad_norm, B_pub)
    "same-batch-no-mask": (True, "none", 1e8, 4),
    "same-batch": (True, "random", 1e8, 4),
    "independent": (False, "random", 1e8, 3),
    "independent-clipped": (False, "all", 0.02, 3),
}


@pytest.mark.parametrize("engine", ENGINE_NAMES)
@pytest.mark.parametrize("case", list(RELEASE_CASES))
def test_noiseless_release_equals_brute_force_loop(engine, case):
    """sigma = 0: each step's p.grad equals the brute-force release, over k steps of varying
    (and empty) private and public batches; no zero_grad between steps. With the public
    batch equal to the private batch, B_pub = B and no clipping it is also vanilla SGD on
    sum-loss / B."""
    same, mask, clip, b_pub = RELEASE_CASES[case]
    model, ref = tiny_vit(), tiny_vit()
    supported(engine, model)
    opt = wrap(model, max_grad_norm=clip, engine=engine, expected_public_batch_size=b_pub)
    assert opt.expected_batch_size == 4 and opt.expected_public_batch_size == b_pub
    vanilla = tiny_vit()
    sgd = torch.optim.SGD(vanilla.parameters(), lr=0.1)
    clipped = False
    for k, (n, n_pub) in enumerate([(5, 2), (3, 0), (0, 4), (2, 3)]):
        private = batch(n, seed=k, mask=mask)
        # The same records as the private batch, in their own tensors (the optimizer refuses
        # the private batch's own storage as its public batch).
        copy = tuple(t.clone() for t in private)
        public = copy if same else public_batch(n_pub, seed=50 + k, mask=mask)
        opt.backward(*private, public=public)
        opt.step()
        expected = brute_force_release(
            ref, private, public, clip=clip, batch_size=4, public_batch_size=b_pub
        )
        for p, e in zip(model.parameters(), expected, strict=True):
            torch.testing.assert_close(p.grad, e, rtol=1e-7, atol=1e-10)
        with torch.no_grad():
            for p, e in zip(ref.parameters(), expected, strict=True):
                p -= 0.1 * e
        clipped |= bool((opt.last_clip_factors < 1).any())
        if same and clip > 1e3:
            sgd.zero_grad()
            x, _, y = private
            (nn.functional.cross_entropy(vanilla(x), y, reduction="sum") / 4).backward()
            sgd.step()
    assert_params_close(params(model), params(ref), atol=1e-9)
    if same and clip > 1e3:
        assert_params_close(params(model), params(vanilla), atol=1e-9)
    assert clipped == (clip < 1), "the clipped case must exercise clipping"
    assert opt.steps == 4 and opt.epsilon(1e-5) == math.inf


def test_public_term_uses_its_own_divisor():
    """Only the public batch (no private record): p.grad = sum_U h / B_pub exactly."""
    model = tiny_vit()
    opt = wrap(model, expected_batch_size=4, expected_public_batch_size=7)
    x, m, y = public_batch(3)
    opt.backward(*batch(0), public=(x, m, y))
    opt.step()
    ref = tiny_vit()
    loss = nn.functional.cross_entropy(ref(fill(x, m)), y, reduction="sum") / 7
    expected = torch.autograd.grad(loss, list(ref.parameters()))
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------- noise


def one_step_update(sigma: float, case: str, *, randomness=None) -> list[torch.Tensor]:
    """Params after one SGD(lr=1) step from the same start; ``case`` picks the batch."""
    model = tiny_vit()
    opt = wrap(
        model,
        inner=torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=sigma,
        max_grad_norm=0.5,
        expected_batch_size=8,
        expected_public_batch_size=5,
        randomness=randomness,
        protect_labels=case == "protect-labels",
    )
    if case == "batch":
        opt.backward(*batch(3), public=public_batch(2))
    elif case == "protect-labels":  # plain DP-SGD: the same noise, no public term
        opt.backward(*batch(3))
    elif case == "empty-batch":
        opt.backward(*batch(0), public=public_batch(0))
    opt.step()
    return params(model)


@pytest.mark.parametrize("case", ["batch", "empty-batch", "no-backward", "protect-labels"])
def test_noise_std_is_sigma_c_over_expected_batch_size(case):
    """Default (secret) randomness: the released gradient minus the noiseless one is
    N(0, (sigma C / B)^2) per coordinate, B the expected private batch size."""
    sigma, clip, expected = 2.0, 0.5, 8
    clean = one_step_update(0.0, case)
    noisy = one_step_update(sigma, case)
    diffs = [c - n for c, n in zip(clean, noisy, strict=True)]
    assert all(bool((d != 0).all()) for d in diffs), "every coordinate of every param is noised"
    z = torch.cat([d.flatten() for d in diffs])
    n, std = z.numel(), sigma * clip / expected  # realised batch 3 or 0, B_pub 5: no matter
    # (n - 1) s^2 / std^2 ~ chi2(n - 1): a 1e-6 two-sided interval.
    low, high = stats.chi2.ppf([5e-7, 1 - 5e-7], n - 1)
    var = float(z.var())
    assert low / (n - 1) < var / std**2 < high / (n - 1), (var**0.5, std)
    assert abs(float(z.mean())) < 5.5 * std / n**0.5
    assert stats.kstest((z / std).numpy(), "norm").pvalue > 1e-6


def test_default_randomness_is_secret():
    opt = wrap(tiny_vit(), noise_multiplier=1.0)
    assert isinstance(opt.randomness, SecretRandomness)
    a, b = one_step_update(1.0, "batch"), one_step_update(1.0, "batch")
    assert all(bool((x != y).all()) for x, y in zip(a, b, strict=True)), "fresh noise each run"


@SEEDED
def test_seeded_test_randomness_replays_the_noise():
    def seeded(seed: int) -> list[torch.Tensor]:
        return one_step_update(1.0, "batch", randomness=InsecureSeededRandomness(seed))

    assert_params_close(seeded(7), seeded(7), atol=0)
    assert not torch.equal(seeded(8)[0], seeded(7)[0])


def test_insecure_randomness_warns():
    with pytest.warns(InsecureRandomnessWarning, match="privacy guarantee does not hold"):
        randomness = InsecureSeededRandomness(0)
    assert "Insecure" in repr(randomness)


# ---------------------------------------------------------------------- accounting


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_equals_ledger_computed_directly(accountant):
    q, sigma, k, delta = 0.05, 1.1, 4, 1e-5
    model = tiny_vit()
    opt = wrap(model, noise_multiplier=sigma, sample_rate=q, accountant=accountant)
    assert opt.epsilon(delta) == 0.0
    for i in range(k):
        if i == 0:
            opt.backward(*batch(2), public=public_batch(2))
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


@SEEDED
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_budget_guard_fires_exactly_before_the_step_that_passes_the_target(accountant):
    q, sigma, delta = 0.1, 1.0, 1e-5
    target, k_star = k_star_target(q, sigma, delta, accountant)
    assert k_star == 3
    model = tiny_vit()
    randomness = InsecureSeededRandomness(0)  # its state shows whether noise was drawn
    opt = wrap(
        model,
        inner=torch.optim.AdamW(model.parameters(), lr=1e-2),
        noise_multiplier=sigma,
        sample_rate=q,
        target_epsilon=target,
        target_delta=delta,
        accountant=accountant,
        randomness=randomness,
    )
    for k in range(k_star):
        opt.backward(*batch(2, seed=k), public=public_batch(2, seed=50 + k))
        opt.step()
    assert opt.epsilon() <= target
    before = (
        params(model),
        opt.ledger,
        copy.deepcopy(opt.state_dict()),
        randomness.state_dict()["state"].clone(),
    )
    opt.backward(*batch(2, seed=99), public=public_batch(2))
    with pytest.raises(PrivacyBudgetExceeded, match="target_epsilon"):
        opt.step()
    assert_params_close(params(model), before[0], atol=0)
    assert opt.ledger == before[1] and opt.steps == k_star
    after = opt.state_dict()
    for key, value in before[2]["optimizer"]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, after["optimizer"]["state"][key][name])
    assert torch.equal(randomness.state_dict()["state"], before[3]), "no noise was drawn"


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


def run(model, opt, steps):
    for private, public in steps:
        opt.backward(*private, public=public)
        opt.step()


STEPS = [
    (batch(n, seed=s), public_batch(u, seed=50 + s))
    for s, (n, u) in enumerate([(3, 2), (2, 0), (0, 3), (4, 1), (1, 2)])
]
STATE_KEYS = {"format", "version", "optimizer", "ledger", "steps", "noiseless_steps"}


def checkpoint(model, opt) -> dict:
    """A torch.save / torch.load(weights_only=True) round trip of model and optimizer."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@SEEDED
def test_state_dict_round_trip_continues_like_an_uninterrupted_run():
    """Seeded test randomness: its state is saved, so a resumed run replays the noise."""
    kw = dict(noise_multiplier=0.7, max_grad_norm=0.5, sample_rate=0.2)

    def fresh(seed: int):
        model = tiny_vit()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, wrap(model, inner=inner, randomness=InsecureSeededRandomness(seed), **kw)

    model_a, opt_a = fresh(0)
    run(model_a, opt_a, STEPS)

    model_b, opt_b = fresh(0)
    run(model_b, opt_b, STEPS[:2])
    state = opt_b.state_dict()
    assert set(state) == STATE_KEYS | {"insecure_randomness"} and state["version"] == 2
    json.dumps(state["ledger"])  # the ledger is JSON-compatible
    saved = checkpoint(model_b, opt_b)
    model_c, opt_c = fresh(12345)  # the randomness state comes from the checkpoint
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    run(model_c, opt_c, STEPS[2:])

    assert_params_close(params(model_a), params(model_c), atol=0)
    assert opt_a.ledger == opt_c.ledger and opt_c.steps == 5


def test_secret_randomness_saves_no_state_and_a_resumed_run_keeps_accounting():
    kw = dict(noise_multiplier=0.7, max_grad_norm=0.5, sample_rate=0.2)
    model_a = tiny_vit()
    opt_a = wrap(model_a, inner=torch.optim.AdamW(model_a.parameters(), lr=1e-2), **kw)
    run(model_a, opt_a, STEPS[:2])
    assert set(opt_a.state_dict()) == STATE_KEYS
    saved = checkpoint(model_a, opt_a)
    model_b = tiny_vit(seed=3)
    opt_b = wrap(model_b, inner=torch.optim.AdamW(model_b.parameters(), lr=1e-2), **kw)
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    assert_params_close(params(model_b), params(model_a), atol=0)
    inner_a, inner_b = opt_a.original_optimizer.state, opt_b.original_optimizer.state
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(inner_a[pa]["exp_avg"], inner_b[pb]["exp_avg"])
    run(model_b, opt_b, STEPS[2:])
    run(model_a, opt_a, STEPS[2:])
    assert opt_b.ledger == opt_a.ledger == PrivacyLedger([PoissonGaussianEvent(0.2, 0.7, 5)])
    # fresh secret noise after the resume: the two continuations differ
    assert not torch.equal(params(model_a)[0], params(model_b)[0])


@SEEDED
@pytest.mark.parametrize(
    "corrupt",
    [
        lambda s: s.update(format="other"),
        lambda s: s.update(version=1),
        lambda s: s.update(steps=7),
        lambda s: s.update(noiseless_steps=-1),
        lambda s: s.update(ledger={"format": "nope"}),
        lambda s: s["insecure_randomness"].update(state=torch.zeros(3, dtype=torch.uint8)),
        lambda s: s["optimizer"]["param_groups"].append({}),
        lambda s: s.pop("ledger"),
    ],
)
def test_load_state_dict_validates_before_changing_anything(corrupt):
    model = tiny_vit()
    opt = wrap(model, noise_multiplier=1.0, randomness=InsecureSeededRandomness(0))
    run(model, opt, STEPS[:1])
    state = copy.deepcopy(opt.state_dict())
    fresh_model = tiny_vit()
    fresh = wrap(fresh_model, noise_multiplier=1.0, randomness=InsecureSeededRandomness(1))
    before = copy.deepcopy(fresh.state_dict())
    corrupt(state)
    with pytest.raises(InvalidInputError):
        fresh.load_state_dict(state)
    after = fresh.state_dict()
    assert after["ledger"] == before["ledger"] and after["steps"] == 0
    assert torch.equal(
        after["insecure_randomness"]["state"], before["insecure_randomness"]["state"]
    )
    assert after["optimizer"] == before["optimizer"]


@SEEDED
def test_seeded_randomness_state_is_refused_by_secret_randomness():
    opt = wrap(tiny_vit(), noise_multiplier=1.0, randomness=InsecureSeededRandomness(0))
    secret = wrap(tiny_vit(), noise_multiplier=1.0)
    with pytest.raises(InvalidInputError, match="insecure"):
        secret.load_state_dict(opt.state_dict())
    assert set(secret.state_dict()) == STATE_KEYS and secret.steps == 0


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
    loss = opt.backward(x, m, y)
    opt.step()
    assert bool(torch.isnan(loss)), "no public batch, no public loss"
    assert (opt.last_clip_factors < 1).all(), "the test must exercise clipping"
    # G = sum_i c_i g_i / B: the clipped private sum is the whole update
    assert any(float(p.grad.abs().max()) > 0 for p in model.parameters()), "no update at all"

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
    public = public_batch(2)

    def update(loss_fn):
        model = tiny_vit()
        opt = wrap(model, loss_fn=loss_fn, max_grad_norm=0.1)
        loss = opt.backward(x, m, y, public=public)
        opt.step()
        return params(model), float(loss)

    loss_fn = (
        (lambda out, target: nn.functional.cross_entropy(out, target, reduction="none"))
        if reduction == "callable"
        else nn.CrossEntropyLoss(reduction=reduction)
    )
    (a, loss_a), (b, loss_b) = update(nn.CrossEntropyLoss()), update(loss_fn)
    assert_params_close(a, b, atol=1e-12)
    assert loss_a == pytest.approx(loss_b, rel=1e-12)


def test_backward_calls_accumulate_into_one_step():
    """Two chunks of each batch before a step equal the whole batches (virtual batches)."""
    x, m, y = batch(5)
    ux, um, uy = public_batch(4)
    whole, split = tiny_vit(), tiny_vit()
    opt_whole, opt_split = wrap(whole, max_grad_norm=0.1), wrap(split, max_grad_norm=0.1)
    loss = opt_whole.backward(x, m, y, public=(ux, um, uy))
    opt_whole.step()
    opt_split.backward(x[:2], m[:2], y[:2], public=(ux[:1], um[:1], uy[:1]))
    opt_split.backward(x[2:], m[2:], y[2:], public=(ux[1:], um[1:], uy[1:]))
    opt_split.step()
    assert_params_close(params(whole), params(split), atol=1e-12)
    assert loss.shape == () and not loss.requires_grad
    assert opt_whole.last_norms.shape == (5,) and opt_split.last_clip_factors.shape == (3,)
    assert opt_whole.last_norms.dtype == opt_whole.last_clip_factors.dtype == torch.float64
    assert (opt_whole.last_clip_factors < 1).any(), "clipping is exercised"


def test_backward_returns_the_mean_public_loss_and_nothing_private():
    """The returned loss is the mean public-view loss over U (brute force), whatever the
    private batch holds."""
    ux, um, uy = public_batch(3)
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(tiny_vit()(fill(ux, um)), uy))
    losses = []
    for seed, n in ((1, 2), (2, 5), (3, 0)):
        opt = wrap(tiny_vit())
        losses.append(float(opt.backward(*batch(n, seed=seed), public=(ux, um, uy))))
    assert losses == pytest.approx([expected] * 3, rel=1e-12)
    empty = wrap(tiny_vit()).backward(*batch(2), public=public_batch(0))
    assert bool(torch.isnan(empty))


def test_backward_needs_a_public_batch_unless_labels_are_protected():
    model = tiny_vit()
    opt = wrap(model)
    with pytest.raises(InvalidInputError, match="public="):
        opt.backward(*batch(2))
    labels = wrap(tiny_vit(), protect_labels=True)
    with pytest.raises(InvalidInputError, match="protect_labels"):
        labels.backward(*batch(2), public=public_batch(2))
    opt.step()  # nothing was accumulated: an empty step, zero gradient at sigma = 0
    assert all(float(p.grad.abs().max()) == 0 for p in model.parameters())


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x, m, y: (x, m), "public must be a batch"),
        (lambda x, m, y: x, "public must be a batch"),
        (lambda x, m, y: (x, m[:, :2], y), "mask shape"),
        (lambda x, m, y: (x, m, y[:1]), "targets"),
        (lambda x, m, y: (x.masked_fill(~m[:, None], math.nan), m, y), "non-finite"),
    ],
)
def test_bad_public_batches_raise_before_anything_changes(make, match):
    model = tiny_vit()
    opt = wrap(model)
    with pytest.raises(InvalidInputError, match=match):
        opt.backward(*batch(2), public=make(*public_batch(2)))
    opt.step()  # the private batch was not accumulated either
    assert all(float(p.grad.abs().max()) == 0 for p in model.parameters())


@pytest.mark.parametrize("engine", ENGINE_NAMES)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_private_record_contributes_exactly_zero(engine, value):
    """Record 1's sensitive pixels are not finite: its clip factor is 0 and the step equals
    the step without it (no error: what the code does must not depend on private content)."""
    x, m, y = batch(3)
    bad = x.clone()
    bad[1] = bad[1].masked_fill(m[1][None], value)
    keep = torch.tensor([True, False, True])
    public = public_batch(2)

    def grads(private):
        model = tiny_vit()
        supported(engine, model)
        opt = wrap(model, engine=engine, max_grad_norm=0.1)
        opt.backward(*private, public=public)
        opt.step()
        return [p.grad.clone() for p in model.parameters()], opt

    got, opt = grads((bad, m, y))
    expected, _ = grads((x[keep], m[keep], y[keep]))
    assert float(opt.last_clip_factors[1]) == 0.0 and not math.isfinite(opt.last_norms[1])
    assert bool((opt.last_clip_factors[keep] > 0).all())
    for g, e in zip(got, expected, strict=True):
        assert bool(torch.isfinite(g).all())
        torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-10)


def test_step_consumes_the_accumulated_sum():
    model = tiny_vit()
    opt = wrap(model)
    opt.backward(*batch(2), public=public_batch(2))
    opt.step()
    assert any(float(p.grad.abs().max()) > 0 for p in model.parameters())
    opt.step()  # nothing since the last step: an empty batch, zero gradient at sigma = 0
    assert all(float(p.grad.abs().max()) == 0 for p in model.parameters())


def test_no_zero_grad_is_needed_between_steps():
    """lr = 0 keeps the parameters: step 2's gradient is that of its own batches only."""
    model, fresh_model = tiny_vit(), tiny_vit()
    opt = wrap(model, inner=torch.optim.SGD(model.parameters(), lr=0.0))
    fresh = wrap(fresh_model, inner=torch.optim.SGD(fresh_model.parameters(), lr=0.0))
    opt.backward(*batch(3, seed=1), public=public_batch(2, seed=2))
    opt.step()
    opt.backward(*batch(2, seed=3), public=public_batch(3, seed=4))
    opt.step()
    fresh.backward(*batch(2, seed=3), public=public_batch(3, seed=4))
    fresh.step()
    for p, q in zip(model.parameters(), fresh_model.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_lr_scheduler_drives_the_wrapper():
    model = tiny_vit()
    opt = wrap(model)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
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
    opt.backward(*batch(2), public=public_batch(2))
    opt.step()
    assert torch.equal(model.patch_embed.weight, frozen)
    assert any(float(p.grad.abs().max()) > 0 for p in model.parameters() if p.requires_grad)
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
        ({"expected_public_batch_size": 0}, "expected_public_batch_size"),
        ({"expected_public_batch_size": 2.5}, "expected_public_batch_size"),
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
        ({"randomness": 3}, "randomness"),
        ({"randomness": torch.Generator().manual_seed(0)}, "torch.Generator"),
        ({"view": 3}, "view"),
    ],
)
def test_bad_arguments_raise_typed_errors(override, match):
    with pytest.raises(InvalidInputError, match=match):
        wrap(tiny_vit(), **override)


def test_noise_generator_is_gone():
    with pytest.raises(InvalidInputError, match="unknown privacy setting .noise_generator."):
        wrap(tiny_vit(), noise_generator=torch.Generator().manual_seed(0))


def test_bad_optimizer_and_models_are_refused():
    model = tiny_vit()
    with pytest.raises(InvalidInputError, match="optimizer"):
        wrap(model, inner=model.parameters())  # parameters, not an optimizer
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
        (lambda x, m, y: (x, m, y[:1]), "targets"),
        (lambda x, m, y: (x.long(), m, y), "floating"),
    ],
)
def test_bad_batches_raise_before_anything_changes(make, match):
    model = tiny_vit()
    opt = wrap(model)
    with pytest.raises(InvalidInputError, match=match):
        opt.backward(*make(*batch(2)), public=public_batch(2))
    opt.step()  # still a valid (empty) step
    assert all(float(p.grad.abs().max()) == 0 for p in model.parameters())


def test_public_api_exports_the_wrapper():
    assert maskdp.MaskDPOptimizer is MaskDPOptimizer
