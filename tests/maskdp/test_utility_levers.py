"""Utility levers that cost no privacy, each checked against an independent computation.

- InpaintView reads public pixels only (bit-identical under sensitive perturbation) and
  equals a brute-force per-(sample, channel, frame) / per-pixel loop;
- ``private_weight`` scales exactly the *noisy* private sum (noise added before weighting)
  and never the public term, checked against a manual computation with replayed (seeded,
  test-only) noise; 1 is the default;
- James-Stein shrinkage is a function of the released noisy sum only: two worlds with
  different sensitive content and the same release give the same update, equal to the
  closed form;
- the public warm-up of ``maskdp.trainer.run`` spends no privacy and reads no sensitive pixel;
- the identity probe sits at chance on labels independent of the features and near 1 on
  features that encode identity; Clopper-Pearson matches scipy's exact binomial interval.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TINY_TRAIN, random_clips, tiny_vit, wrap
from scipy import stats
from torch import nn

from maskdp.analysis.leakage import (
    attribute_inference_bound,
    clopper_pearson,
    identity_inference,
    identity_probe,
    linear_probe,
    model_features,
)
from maskdp.data.poisson import MaskDPDataLoader, PoissonDataLoader
from maskdp.errors import InvalidInputError
from maskdp.mechanism import noise, postprocess
from maskdp.mechanism.gradient import masked_gradient
from maskdp.mechanism.randomness import InsecureSeededRandomness
from maskdp.mechanism.views import FillView, InpaintView
from maskdp.models import VideoViT

SEEDED = pytest.mark.filterwarnings("ignore::maskdp.mechanism.randomness.InsecureRandomnessWarning")


def clips(n: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, 5, 6, 7, generator=gen, dtype=torch.float64)
    mask = torch.rand(n, 5, 6, 7, generator=gen) < 0.6
    mask[0, 2] = True  # a frame with no public pixel: the fallback
    mask[1, :, 0, 0] = True  # a pixel sensitive in every frame
    return x, mask


# ----------------------------------------------------------------------------- InpaintView


@pytest.mark.parametrize("method", ["mean", "temporal"])
@pytest.mark.parametrize("how", ["noise", "huge", "nan"])
def test_inpaint_is_bit_identical_under_sensitive_perturbation(method, how):
    x, mask = clips()
    gen = torch.Generator().manual_seed(5)
    other = {
        "noise": x + torch.randn(x.shape, generator=gen, dtype=x.dtype),
        "huge": torch.full_like(x, 1e300),
        "nan": torch.full_like(x, math.nan),
    }[how]
    perturbed = torch.where(mask[:, None], other, x)
    view = InpaintView(method, fallback=0.25)
    a, b = view.public(x, mask).inputs, view.public(perturbed, mask).inputs
    assert torch.equal(a, b)
    assert torch.equal(a[~mask[:, None].expand_as(x)], x[~mask[:, None].expand_as(x)])


def brute_force_inpaint(x, mask, method, fallback):
    n, c, t, h, w = x.shape
    mean = torch.full((n, c, t), fallback, dtype=x.dtype)
    for i in range(n):
        for f in range(t):
            public = [(r, s) for r in range(h) for s in range(w) if not mask[i, f, r, s]]
            for ch in range(c):
                if public:
                    mean[i, ch, f] = sum(float(x[i, ch, f, r, s]) for r, s in public) / len(public)
    out = x.clone()
    for i in range(n):
        for f in range(t):
            for r in range(h):
                for s in range(w):
                    if not mask[i, f, r, s]:
                        continue
                    source = None
                    if method == "temporal":
                        for d in range(1, t):
                            for g in (f - d, f + d):  # earlier frame first
                                if source is None and 0 <= g < t and not mask[i, g, r, s]:
                                    source = g
                    for ch in range(c):
                        value = x[i, ch, source, r, s] if source is not None else mean[i, ch, f]
                        out[i, ch, f, r, s] = value
    return out


@pytest.mark.parametrize("method", ["mean", "temporal"])
def test_inpaint_equals_brute_force(method):
    x, mask = clips()
    got = InpaintView(method, fallback=0.25).public(x, mask).inputs
    torch.testing.assert_close(got, brute_force_inpaint(x, mask, method, 0.25), rtol=1e-12, atol=0)


def test_inpaint_validates_its_options():
    with pytest.raises(InvalidInputError, match="method"):
        InpaintView("median")
    with pytest.raises(InvalidInputError, match="fallback"):
        InpaintView(fallback=math.inf)


# ----------------------------------------------------------------------- private weight


def batch(seed: int = 1, n: int = 5):
    return random_clips(n, seed=seed, uniform=True, dtype=torch.float64)


SIGMA, CLIP, B, B_PUB = 0.7, 0.05, 4, 3
REFERENCE = {"view": FillView(0.0), "engine": "reference"}  # what noisy_grads uses
PUBLIC = batch(seed=2, n=3)  # the public batch of every step here (independent of batch())


def noisy_grads(model: nn.Module, x, m, y, **kw) -> dict[str, torch.Tensor]:
    opt = wrap(  # SGD, lr 0.1, q = 0.1
        model,
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        expected_batch_size=B,
        expected_public_batch_size=B_PUB,
        randomness=InsecureSeededRandomness(123),
        **REFERENCE,
        **kw,
    )
    opt.backward(x, m, y, public=PUBLIC)
    opt.pre_step()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    opt.close()
    return grads


@SEEDED
def test_private_weight_one_is_the_default():
    x, m, y = batch()
    default = noisy_grads(tiny_vit(), x, m, y)
    weighted = noisy_grads(tiny_vit(), x, m, y, private_weight=1.0)
    assert all(torch.equal(default[k], weighted[k]) for k in default)


@SEEDED
@pytest.mark.parametrize("weight", [0.0, 0.3, 2.0])
def test_private_weight_scales_exactly_the_noisy_private_sum(weight):
    x, m, y = batch()
    model = tiny_vit()
    parts = masked_gradient(
        model,
        nn.CrossEntropyLoss(),
        x,
        m,
        y,
        max_grad_norm=CLIP,
        public=PUBLIC,
        view=FillView(0.0),
        engine="reference",
    )
    names = [name for name, _ in model.named_parameters()]
    # the same seed replays the optimizer's draws: one standard normal tensor per parameter
    gen = torch.Generator().manual_seed(123)
    draws = {n: torch.randn(parts.private[n].shape, generator=gen) for n in names}
    assert all(d.dtype == torch.float32 for d in draws.values())
    expected = {
        n: parts.public[n] / B_PUB
        + weight * (parts.private[n] + SIGMA * CLIP * draws[n].double()) / B
        for n in names
    }
    got = noisy_grads(tiny_vit(), x, m, y, private_weight=weight)
    for n in names:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-9, atol=1e-12)
    if weight == 0.0:  # the noise must have been added before weighting: nothing is left
        for n in names:
            torch.testing.assert_close(got[n], parts.public[n] / B_PUB, rtol=1e-12, atol=0)


@SEEDED
def test_private_weight_is_validated():
    for bad in (-0.1, math.nan, True):
        with pytest.raises(InvalidInputError, match="private_weight"):
            noisy_grads(tiny_vit(), *batch(), private_weight=bad)
    with pytest.raises(InvalidInputError, match="shrinkage"):
        noisy_grads(tiny_vit(), *batch(), shrinkage="lasso")


# ---------------------------------------------------------------------------- shrinkage


def test_james_stein_factor_closed_form():
    z = torch.tensor([3.0, 4.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # ||z||^2 = 25, d = 5
    factor = postprocess.james_stein_factor(z, 2.0)
    assert float(factor) == pytest.approx(1 - 3 * 4.0 / 25)
    assert float(postprocess.james_stein_factor(z, 10.0)) == 0.0  # positive part
    assert float(postprocess.james_stein_factor(z, 0.0)) == 1.0
    assert float(postprocess.james_stein_factor(z[:2], 2.0)) == 1.0  # d < 3: no shrinkage


def test_james_stein_reduces_error_when_noise_dominates():
    gen = torch.Generator().manual_seed(0)
    signal = torch.full((1000,), 0.05, dtype=torch.float64)
    z = signal + torch.randn(1000, generator=gen, dtype=torch.float64)
    shrunk = postprocess.james_stein_factor(z, 1.0) * z
    assert float((shrunk - signal).norm()) < 0.5 * float((z - signal).norm())


def james_stein_closed_form(z: torch.Tensor, std: float) -> torch.Tensor:
    """(1 - (d - 2) std^2 / ||z||^2)_+ z for d >= 3, z itself otherwise."""
    d = z.numel()
    if d < 3:
        return z
    factor = 1.0 - (d - 2) * std**2 / float((z.double() ** 2).sum())
    return max(factor, 0.0) * z


@SEEDED
@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_shrinkage_is_a_function_of_the_released_noisy_sum_only(monkeypatch, weight):
    """Two worlds differ in sensitive content; force the same release Z in both: the update
    must be the same, although the clipped private sums differ (the test has power)."""
    x, m, y = batch()
    other = torch.where(m[:, None], torch.rand_like(x) * 5.0, x)
    model = tiny_vit()
    names = [name for name, _ in model.named_parameters()]
    private = {
        key: masked_gradient(
            model, nn.CrossEntropyLoss(), inp, m, y, max_grad_norm=CLIP, public=PUBLIC, **REFERENCE
        ).private
        for key, inp in (("a", x), ("b", other))
    }
    assert any(not torch.allclose(private["a"][n], private["b"][n]) for n in names)
    gen = torch.Generator().manual_seed(7)
    release = {
        n: torch.randn(private["a"][n].shape, generator=gen, dtype=torch.float64) for n in names
    }
    seen = []

    def fixed_release(clipped_sum, **_):
        seen.append({n: clipped_sum[n].clone() for n in names})
        return {n: release[n].clone() for n in names}

    monkeypatch.setattr(noise, "add_noise", fixed_release)
    grads_a = noisy_grads(tiny_vit(), x, m, y, private_weight=weight, shrinkage="james-stein")
    grads_b = noisy_grads(tiny_vit(), other, m, y, private_weight=weight, shrinkage="james-stein")
    for n in names:  # add_noise received each world's clipped private sum ...
        torch.testing.assert_close(seen[0][n], private["a"][n], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(seen[1][n], private["b"][n], rtol=1e-9, atol=1e-12)
        assert torch.equal(grads_a[n], grads_b[n])  # ... and only its release was used
    public = masked_gradient(
        model, nn.CrossEntropyLoss(), x, m, y, max_grad_norm=CLIP, public=PUBLIC, **REFERENCE
    ).public
    shrunk = {n: james_stein_closed_form(release[n], SIGMA * CLIP) for n in names}
    assert any(not torch.equal(shrunk[n], release[n]) for n in names), "shrinkage is exercised"
    for n in names:
        expected = public[n] / B_PUB + weight * shrunk[n] / B
        torch.testing.assert_close(grads_a[n], expected, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------- public warm-up


def warm_up_run(tmp_path, perturb: bool):
    from maskdp.trainer.config import build_config
    from maskdp.trainer.run import Run

    config = build_config(
        **{**TINY_TRAIN, "test_size": 8, "epochs": 0.25, "public_epochs": 0.5},
        view="inpaint",
        noise_multiplier=1.0,
    )
    run = Run(config, tmp_path)
    if perturb:  # only sensitive pixels differ
        base = run.train_set

        class Perturbed(torch.utils.data.Dataset):
            def __len__(self):
                return len(base)

            def __getitem__(self, i):
                x, mask, y = base[i]
                return torch.where(mask[None], torch.rand_like(x) * 9.0, x), mask, y

        run.train_set = Perturbed()
    # The run's own batches come from secret randomness; both runs here replay the same
    # (seeded, test-only) batches over run.train_set, so only the sensitive pixels differ.
    steps, rate = len(run.loader), run.plan.sample_rate
    run.loader = MaskDPDataLoader(
        *(
            PoissonDataLoader(
                run.train_set, sample_rate=rate, steps=steps, randomness=InsecureSeededRandomness(s)
            )
            for s in (1, 2)
        )
    )
    return run


@SEEDED
def test_public_warm_up_spends_no_privacy_and_reads_no_sensitive_pixel(tmp_path):
    runs = [warm_up_run(tmp_path / str(p), perturb=p) for p in (False, True)]
    assert runs[0].plan.public_steps == 2
    clean, perturbed = (run.loader.public.dataset[0][0] for run in runs)
    assert not torch.equal(clean, perturbed), "the perturbation reaches the loader"
    states = []
    for run in runs:
        steps = run.steps()
        for _ in range(run.plan.public_steps):
            next(steps)
        assert run.optimizer.ledger.steps == 0
        assert run.epsilon() == 0.0
        states.append({k: v.clone() for k, v in run.model.state_dict().items()})
        next(steps)  # the first private step is accounted
        assert run.optimizer.ledger.steps == 1
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# ---------------------------------------------------------------------------- leakage


def test_clopper_pearson_matches_scipy_exact_interval():
    for k, n in [(0, 10), (3, 10), (10, 10), (57, 400)]:
        expected = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        low, high = clopper_pearson(k, n)
        assert low == pytest.approx(expected.low, abs=1e-12)
        assert high == pytest.approx(expected.high, abs=1e-12)


def test_probe_is_at_chance_on_independent_labels_and_high_on_identity_features():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(800, 16, generator=gen)
    labels = torch.randint(0, 8, (800,), generator=gen)
    blind = linear_probe(features, labels, num_classes=8)
    assert blind.at_chance and blind.chance == 0.125 and blind.trials == 400
    encoded = features.clone()
    encoded[:, :8] += 4.0 * nn.functional.one_hot(labels, 8)
    seeing = linear_probe(encoded, labels, num_classes=8)
    assert seeing.accuracy > 0.9 and seeing.lower > seeing.chance


def test_model_features_leave_no_hook_and_probe_runs_on_a_dataset():
    from maskdp.data import SyntheticPrivateActions

    data = SyntheticPrivateActions(size=32, image_size=16, frames=4, train=False)
    torch.manual_seed(0)
    model = VideoViT(num_classes=4, frames=4, image_size=16, dim=16, depth=1, heads=2)
    feats = model_features(model, data.tensors()[0])
    assert feats.shape == (32, 16) and not model.head._forward_pre_hooks and model.training
    assert identity_probe(model, data, steps=20).trials == 16
    inference = identity_inference(model, data, range(4))
    assert inference.trials == 4 and inference.chance == 1 / data.num_identities
    assert attribute_inference_bound(1.0, 1e-5, 8) == pytest.approx(math.e / 8 + 1e-5)
