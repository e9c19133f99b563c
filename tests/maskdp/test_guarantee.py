"""Tests that would have caught each finding of the adversarial review (issue 9).

Each test attacks one way the guarantee was false in MaskDP 0.1: the public term summed
over the private batch, dropout and stochastic depth drawing differently in the two
passes, replayable noise, buffers that store data, non-finite records poisoning the
release, reduced precision, a sampler on a float32 grid.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import Tensor, nn
from torchvision.ops import StochasticDepth

import maskdp.analysis.audit as audit_module
from maskdp.engines.base import engine_names
from maskdp.errors import InvalidInputError, UnsafeModelError
from maskdp.mechanism.gradient import masked_gradient
from maskdp.mechanism.randomness import InsecureSeededRandomness, SecretRandomness
from maskdp.mechanism.sampling import poisson_sample
from maskdp.mechanism.views import DropView, FillView
from maskdp.training.optimizer import MaskDPOptimizer

ENGINES = [n for n in engine_names() if n != "auto"]
CLIP = 1.0


class RandomNet(nn.Module):
    """Conv, GroupNorm, dropout and stochastic depth: randomness inside the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, kernel_size=3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.drop = nn.Dropout(0.5)
        self.depth = StochasticDepth(0.5, "row")
        self.head = nn.Linear(4 * 2 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.norm(self.conv(x)))
        h = h + self.depth(self.drop(h))
        return self.head(h.flatten(1))


def batch(n: int = 4, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 2, 4, 4, generator=gen)
    m = torch.zeros(n, 2, 4, 4, dtype=torch.bool)
    m[:, :, :2] = True
    y = torch.randint(0, 3, (n,), generator=gen)
    return x, m, y


def random_net() -> nn.Module:
    torch.manual_seed(0)
    return RandomNet().train()


def sgd_optimizer(model: nn.Module, **settings) -> MaskDPOptimizer:
    """MaskDP-SGD at sigma = 1, C = 1, B = 4, q = 0.5 unless ``settings`` say otherwise."""
    defaults = {
        "loss_fn": nn.CrossEntropyLoss(),
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "expected_batch_size": 4,
        "sample_rate": 0.5,
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    return MaskDPOptimizer(
        torch.optim.SGD(trainable, lr=1.0), model=model, **{**defaults, **settings}
    )


# ------------------------------------------------------------------ randomness in the model


@pytest.mark.parametrize("engine", ENGINES)
def test_dropout_and_stochastic_depth_leave_an_erased_record_exactly_zero(engine: str) -> None:
    """Finding 2: the full and public passes of each record must see the same draws."""
    model = random_net()
    x, m, y = batch()
    x = torch.where(m[:, None], 5 * torch.randn_like(x), x)  # strong sensitive content
    present = torch.tensor([False, True, False, True])
    common = {"max_grad_norm": CLIP, "engine": engine, "public": (x, m, y), "view": FillView(0.0)}
    result = masked_gradient(model, nn.CrossEntropyLoss(), x, m, y, present=present, **common)
    assert torch.equal(result.norms[~present], torch.zeros(2, dtype=torch.float64))
    assert bool((result.norms[present] > 0).all())  # the present records do contribute
    nobody = torch.zeros(4, dtype=torch.bool)
    erased = masked_gradient(model, nn.CrossEntropyLoss(), x, m, y, present=nobody, **common)
    for value in erased.private.values():
        assert torch.equal(value, torch.zeros_like(value))


def test_random_model_with_a_token_dropping_view_is_refused() -> None:
    from maskdp.models import VideoViT

    class DroppyViT(VideoViT):
        def __init__(self) -> None:
            super().__init__(num_classes=2, frames=4, image_size=16, dim=16, depth=1, heads=2)
            self.extra = nn.Dropout(0.3)

        def forward(self, x: Tensor, **kwargs: Tensor) -> Tensor:
            return self.extra(super().forward(x, **kwargs))

    model = DroppyViT().train()
    x = torch.rand(2, 3, 4, 16, 16)
    m = torch.zeros(2, 4, 16, 16, dtype=torch.bool)
    m[:, :2, :8, :8] = True
    y = torch.tensor([0, 1])

    def step() -> None:
        masked_gradient(
            model,
            nn.CrossEntropyLoss(),
            x,
            m,
            y,
            max_grad_norm=1.0,
            public=(x, m, y),
            view=DropView.for_model(model),
            engine="vmap",
        )

    with pytest.raises(UnsafeModelError, match=r"extra \(Dropout\).*model.eval"):
        step()
    model.eval()  # without randomness the same view is accepted
    step()


# ------------------------------------------------------------------------ buffers


class RunningMean(nn.Module):
    """A custom layer that keeps a running mean of its inputs: data stored without noise."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(()))
        self.fc = nn.Linear(32, 3)

    def forward(self, x: Tensor) -> Tensor:
        self.mean.mul_(0.9).add_(0.1 * x.mean())
        return self.fc(x.flatten(1))


def _fake_quant_model() -> nn.Module:
    from torch.ao.quantization import FakeQuantize

    return nn.Sequential(nn.Flatten(), FakeQuantize(), nn.Linear(32, 3))


@pytest.mark.parametrize(
    ("build", "where"), [(RunningMean, r"<root> \(RunningMean\).*mean"), (_fake_quant_model, "1 ")]
)
def test_modules_whose_buffers_change_are_refused_and_left_untouched(build, where) -> None:
    """Finding 4: found by behaviour, not by a list of classes."""
    model = build()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    x, m, y = batch()
    with pytest.raises(UnsafeModelError, match=where):
        masked_gradient(
            model,
            nn.CrossEntropyLoss(),
            x,
            m,
            y,
            max_grad_norm=1.0,
            public=(x, m, y),
            engine="reference",
        )
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


# ---------------------------------------------------------------- non-finite and precision


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("value", [3e38, math.nan, math.inf])
def test_a_non_finite_record_contributes_zero_and_the_release_stays_finite(
    engine: str, value: float
) -> None:
    """Finding 5: a huge sensitive pixel must not NaN the release (a one-bit leak)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(32, 8), nn.Tanh(), nn.Linear(8, 3))
    x, m, y = batch()
    poisoned = x.clone()
    poisoned[1, 0, 0, 0, 0] = value  # a sensitive pixel (row 0 of the mask)
    common = {"max_grad_norm": CLIP, "engine": engine, "public": (x, m, y)}
    result = masked_gradient(model, nn.CrossEntropyLoss(), poisoned, m, y, **common)
    erased = masked_gradient(
        model,
        nn.CrossEntropyLoss(),
        poisoned,
        m,
        y,
        present=torch.tensor([True, False, True, True]),
        **common,
    )
    gap = 0.0
    for name, value_sum in result.private.items():
        assert bool(torch.isfinite(value_sum).all()), name
        gap += float(((value_sum - erased.private[name]).double() ** 2).sum())
    assert math.sqrt(gap) <= CLIP * (1 + 1e-5)  # finite or not, at most C
    if not math.isfinite(value):  # a non-finite Delta contributes exactly nothing
        assert result.clip_factors[1] == 0
        for name, value_sum in result.private.items():
            torch.testing.assert_close(value_sum, erased.private[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
def test_bf16_model_contribution_stays_within_c_and_noise_is_float32(engine: str) -> None:
    """Finding 7: norms, clip factors, sums and noise in float32 or wider."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3))
    model = model.to(torch.bfloat16)
    x, m, y = batch()
    x = torch.where(m[:, None], 50 * torch.randn_like(x), x).to(torch.bfloat16)
    one = torch.tensor([True, False, False, False])
    common = {"max_grad_norm": 0.37, "engine": engine, "public": (x, m, y)}
    with_record = masked_gradient(model, nn.CrossEntropyLoss(), x, m, y, **common)
    without = masked_gradient(model, nn.CrossEntropyLoss(), x, m, y, present=~one, **common)
    gap = torch.sqrt(
        sum(
            ((with_record.private[k] - without.private[k]).double() ** 2).sum()
            for k in without.private
        )
    )
    assert float(gap) <= 0.37 * (1 + 1e-5)
    assert all(v.dtype == torch.float32 for v in with_record.private.values())
    optimizer = sgd_optimizer(model, max_grad_norm=0.37, engine=engine)
    optimizer.backward(x, m, y, public=(x.clone(), m, y))
    optimizer.add_noise()
    assert all(v.dtype == torch.float32 for v in optimizer._noisy_private.values())


# ------------------------------------------------------------------ secret randomness


def test_two_runs_with_the_same_visible_configuration_draw_different_noise() -> None:
    """Finding 3: nothing the user can see determines the noise."""
    released = []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(32, 3))
        optimizer = sgd_optimizer(model)
        x, m, y = batch()
        torch.manual_seed(0)  # even torch's global generator replayed
        optimizer.backward(x, m, y, public=(x.clone(), m, y))
        optimizer.step()
        released.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(released[0], released[1])
    assert "insecure_randomness" not in optimizer.state_dict()


def test_a_torch_generator_is_refused_and_seeding_is_loud() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(32, 3))
    with pytest.raises(InvalidInputError, match="replayable"):
        sgd_optimizer(model, randomness=torch.Generator())
    with pytest.warns(UserWarning, match="replayable"):
        seeded = InsecureSeededRandomness(3)
    assert "insecure_randomness" in sgd_optimizer(model, randomness=seeded).state_dict()


def test_secret_gaussians_have_the_standard_normal_moments() -> None:
    z = SecretRandomness().gaussian((200_000,), device=torch.device("cpu")).double()
    assert abs(float(z.mean())) < 5 / math.sqrt(200_000)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / 200_000)
    assert abs(float((z**4).mean()) - 3) < 0.1  # Gaussian kurtosis, not a uniform's


# ------------------------------------------------------------------------- sampling


def test_the_realised_rate_at_q_1e_7_is_within_its_binomial_interval() -> None:
    """Finding 8: a float32 comparison samples at 2^-24 granularity (19% too often here)."""
    n, q = 10**11, 1e-7
    count = len(poisson_sample(n, q))
    mean, sd = n * q, math.sqrt(n * q * (1 - q))
    assert mean - 5 * sd < count < mean + 5 * sd  # the float32 grid gives 11,921 +- 109


def test_shards_partition_the_dataset() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rand = InsecureSeededRandomness(0)
    picked = [poisson_sample(101, 1.0, randomness=rand, rank=r, world_size=3) for r in range(3)]
    assert sorted(torch.cat(picked).tolist()) == list(range(101))
    assert all(bool((p % 3 == r).all()) for r, p in enumerate(picked))


# ------------------------------------------------------------------- the public term


def test_backward_refuses_a_missing_public_batch_and_returns_the_public_loss() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(32, 3))
    optimizer = sgd_optimizer(model, view=FillView(0.0))
    x, m, y = batch()
    with pytest.raises(InvalidInputError, match="public="):
        optimizer.backward(x, m, y)
    with pytest.raises(InvalidInputError, match="private batch itself"):
        optimizer.backward(x, m, y, public=(x[:2], m[:2], y[:2]))  # a view of the same batch
    xu, mu, yu = batch(3, seed=5)
    loss = optimizer.backward(x, m, y, public=(xu, mu, yu))
    public_view = torch.where(mu[:, None], torch.zeros_like(xu), xu)
    expected = nn.functional.cross_entropy(model(public_view), yu)
    torch.testing.assert_close(loss, expected.detach())


def test_subsampled_audit_with_a_large_public_gradient_stays_below_theory() -> None:
    """Finding 1, on the library's mechanism (benchmarks/audit_subsampled.py: 60,000 runs)."""
    result = audit_module.subsampled_audit(3000, 1.0)
    assert result.canary_signal == pytest.approx(1.0, rel=1e-4)  # the canary saturates C
    assert result.epsilon_lower_bound <= result.epsilon_theory


@pytest.mark.slow
def test_the_same_batch_public_term_of_maskdp_0_1_breaks_the_audit() -> None:
    """The same audit catches the old mechanism (public term summed over the private batch)."""
    result = audit_module.subsampled_audit(60000, 1.5, same_batch=True)
    assert result.epsilon_lower_bound > result.epsilon_theory


# ------------------------------------------------- findings of the second review (issue 9)


class TwoTokenLinear(nn.Module):
    """A wide linear map on two tokens: the ghost branch's Gram products see rows of large
    norm whose contributions cancel."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 256, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.flatten(2).reshape(x.shape[0], 2, 256)).sum(1)[:, :2]


def test_ghost_branch_contribution_stays_within_c_when_large_rows_cancel() -> None:
    """Review 2, finding 1: a float32 Gram norm of 0 released 24 C; the ghost branch now
    computes in float64 on the rewritten rows with a certified rounding bound."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        model = TwoTokenLinear()
        v = torch.randn(256, generator=gen) * 2000.0
        s = torch.randn(256, generator=gen)
        x = torch.stack([v, -v + 5.0 * s / s.norm()]).reshape(1, 1, 2, 16, 16)
        m = torch.ones(1, 2, 16, 16, dtype=torch.bool)
        y = torch.zeros(1, dtype=torch.long)
        results = {
            engine: masked_gradient(
                model,
                lambda out, _: out.sum(1),
                x,
                m,
                y,
                max_grad_norm=1.0,
                public=(x.clone(), m, y),
                view=FillView(0.5),
                engine=engine,
            )
            for engine in ("ghost", "reference")
        }
        assert float(results["ghost"].private["fc.weight"].double().norm()) <= 1.0 + 1e-5
        assert results["ghost"].norms[0] >= results["reference"].norms[0] * (1 - 1e-6)


class RunningMeanFromThree(nn.Module):
    """Updates a running mean only for batches of three records or more."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(()))
        self.fc = nn.Linear(32, 3)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] >= 5:  # the probe runs on at most four records
            with torch.no_grad():
                self.mean.mul_(0.5).add_(0.5 * x.mean())
        return self.fc(x.flatten(1))


class EmaCodebook(nn.Module):
    """A parameter updated in place in the forward (an EMA codebook)."""

    def __init__(self) -> None:
        super().__init__()
        self.code = nn.Parameter(torch.zeros(32), requires_grad=False)
        self.fc = nn.Linear(32, 3)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():
                self.code.mul_(0.5).add_(0.5 * x.flatten(1).mean(0))
        return self.fc(x.flatten(1))


class OwnGeneratorDropout(nn.Module):
    """Dropout drawing from a generator of its own: invisible to torch's generator."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 3)
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x: Tensor) -> Tensor:
        keep = torch.rand(x.flatten(1).shape, generator=self.generator) > 0.5
        return self.fc(x.flatten(1) * keep)


@pytest.mark.parametrize(
    ("build", "first_batch", "match"),
    [
        (RunningMeanFromThree, 1, "changed mean during a forward pass"),
        (EmaCodebook, 1, "code"),
        (OwnGeneratorDropout, 2, "OwnGeneratorDropout.*generator of its own"),
    ],
)
def test_state_and_randomness_the_first_probe_could_miss_are_refused(
    build, first_batch: int, match: str
) -> None:
    """Review 2, findings 2 and 3: state changed only for larger batches, a parameter
    updated in the forward, randomness from a module's own generator."""
    torch.manual_seed(0)
    model = build().train()
    optimizer = sgd_optimizer(model, engine="hooks")
    x, m, y = batch(6)
    public = tuple(t.clone() for t in batch(2, seed=1))
    with pytest.raises(UnsafeModelError, match=match):
        optimizer.backward(x[:first_batch], m[:first_batch], y[:first_batch], public=public)
        optimizer.step()
        optimizer.backward(x, m, y, public=public)


class TrainModeRunningMean(RunningMean):
    """A running mean that moves in train mode only."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.mean.add_(x.mean())
        return self.fc(x.flatten(1))


def test_a_module_switched_to_train_after_the_probe_is_probed_again() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(TrainModeRunningMean())
    model[0].eval()  # the probe sees a running mean that does not move...
    optimizer = sgd_optimizer(model)
    x, m, y = batch()
    public = tuple(t.clone() for t in batch(2, seed=1))
    optimizer.backward(x, m, y, public=public)
    optimizer.step()
    model[0].train()  # ...then one submodule changes mode: probed again and refused
    with pytest.raises(UnsafeModelError, match="mean"):
        optimizer.backward(x, m, y, public=public)


@pytest.mark.parametrize("view_name", ["random", "texture", "fill"])
def test_the_public_term_does_not_depend_on_the_private_batch_size(view_name: str) -> None:
    """Review 2, finding 4: the private side draws from a stream of its own, so the public
    batch's fills and dropout draws do not shift with the size of the private batch."""
    from maskdp.mechanism.texture_view import TextureFillView
    from maskdp.mechanism.views import RandomFillView

    views = {
        "random": lambda: RandomFillView(-1.0, 1.0, seed=3),
        "texture": lambda: TextureFillView(-1.0, 1.0, seed=3),
        "fill": lambda: FillView(0.0),
    }
    sums = []
    for size in (0, 1, 3):
        model = random_net()
        view = views[view_name]()
        optimizer = sgd_optimizer(model, view=view)
        x, m, y = batch(4)
        torch.manual_seed(7)  # the public side's draws (dropout) start at the same state
        optimizer.backward(x[:size], m[:size], y[:size], public=batch(3, seed=9))
        sums.append({k: v.clone() for k, v in optimizer._public_sum.items()})
    for other in sums[1:]:
        for name, value in sums[0].items():
            assert torch.equal(value, other[name]), name


def test_a_pickled_optimizer_holds_nothing_unnoised() -> None:
    """Review 2, finding 6."""
    import io
    import pickle

    model = nn.Sequential(nn.Flatten(), nn.Linear(32, 3))
    optimizer = sgd_optimizer(model, engine="hooks")
    x, m, y = batch()
    optimizer.backward(x, m, y, public=(x.clone(), m, y))  # between backward and step
    buffer = io.BytesIO()
    pickle.dump(optimizer, buffer)
    restored = pickle.loads(buffer.getvalue())
    for name in ("last_norms", "last_clip_factors", "_private_sum", "_noisy_private"):
        assert getattr(restored, name) is None, name
    assert optimizer.last_norms is not None  # the live optimizer keeps them
