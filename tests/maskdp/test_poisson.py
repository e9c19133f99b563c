"""The Poisson loader: Binomial batch sizes, per-record rate q, empty batches shaped like real ones.

Sampling draws from ``randomness=`` (default: secret OS entropy); statistical checks run
with both the secret default and a seeded test generator.
"""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from helpers import random_clips
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from maskdp.data import PoissonDataLoader, poisson_loader
from maskdp.errors import InvalidInputError
from maskdp.mechanism.randomness import InsecureSeededRandomness, SecretRandomness
from maskdp.mechanism.sampling import PoissonSampler, poisson_sample

SEEDED = pytest.mark.filterwarnings("ignore::maskdp.mechanism.randomness.InsecureRandomnessWarning")


def seeded(seed: int) -> InsecureSeededRandomness:
    return InsecureSeededRandomness(seed)


def records(n: int = 20) -> TensorDataset:
    return TensorDataset(*random_clips(n, seed=0, frames=2, size=4, p=0.5))


class IndexDataset(Dataset):
    """Records whose x is their index, to count inclusions (python int labels)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.full((1,), float(i)), torch.zeros(1, dtype=torch.bool), i % 3


@SEEDED
@pytest.mark.parametrize("source", ["secret", "seeded"])
def test_batch_sizes_are_binomial_and_records_are_included_at_rate_q(source):
    n, q, steps = 20, 0.1, 3000
    randomness = SecretRandomness() if source == "secret" else seeded(0)
    loader = PoissonDataLoader(IndexDataset(n), sample_rate=q, steps=steps, randomness=randomness)
    assert len(loader) == steps
    sizes, counts = [], torch.zeros(n)
    for x, _, _ in loader:
        sizes.append(len(x))
        assert len(set(x.flatten().tolist())) == len(x), "a record is drawn at most once"
        counts += torch.bincount(x.flatten().long(), minlength=n)
    sizes = torch.tensor(sizes, dtype=torch.float64)
    mean, var = n * q, n * q * (1 - q)
    assert abs(float(sizes.mean()) - mean) < 5 * (var / steps) ** 0.5
    assert abs(float(sizes.var()) / var - 1) < 0.15
    assert (sizes == 0).any(), "P(empty) = 0.9^20 = 0.12: empty batches must occur"
    # each record's inclusion count is Binomial(steps, q)
    sd = (steps * q * (1 - q)) ** 0.5
    assert float((counts - steps * q).abs().max()) < 5 * sd


@SEEDED
@pytest.mark.parametrize("first_empty", [True, False])
def test_empty_batches_are_shaped_like_real_ones(first_empty):
    data = records(8)
    loader = PoissonDataLoader(
        data, sample_rate=1e-9 if first_empty else 0.2, steps=50, randomness=seeded(1)
    )
    batches = list(loader)
    sizes = [len(b[0]) for b in batches]
    if first_empty:
        assert sizes[0] == 0
        x, m, y = batches[0]
    else:  # an empty batch after a real one (each step is empty with prob. 0.8^8 = 0.17)
        real = next(i for i, size in enumerate(sizes) if size > 0)
        later = [i for i in range(real + 1, len(sizes)) if sizes[i] == 0]
        assert later, sizes
        x, m, y = batches[later[0]]
    assert x.shape == (0, 3, 2, 4, 4) and x.dtype == torch.float32
    assert m.shape == (0, 2, 4, 4) and m.dtype == torch.bool
    assert y.shape == (0,) and y.dtype == torch.int64


def test_empty_batch_of_python_int_labels_and_structures():
    empty = PoissonDataLoader(IndexDataset(4), sample_rate=1e-9, steps=1).collate_fn([])
    assert [t.shape for t in empty] == [(0, 1), (0, 1), (0,)]
    assert empty[2].dtype == torch.int64
    Record = namedtuple("Record", "x y")

    class Named(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"clip": Record(torch.ones(2, 3), i)}

    empty = PoissonDataLoader(Named(), sample_rate=0.5).collate_fn([])
    assert empty["clip"].x.shape == (0, 2, 3) and empty["clip"].y.shape == (0,)


def draw(randomness=None, n: int = 30) -> list[list[int]]:
    loader = PoissonDataLoader(IndexDataset(n), sample_rate=0.2, steps=10, randomness=randomness)
    return [x.flatten().long().tolist() for x, _, _ in loader]


@SEEDED
def test_seeded_test_randomness_replays_the_sampling():
    assert draw(seeded(3)) == draw(seeded(3))
    assert draw(seeded(3)) != draw(seeded(4))


def test_default_sampling_is_secret_and_not_replayable():
    """No seed: two loaders (and two passes of one loader) draw different batches.

    P(equal) <= max_k P(Binomial(30, 0.2) = k)^10 < 0.2^10 for each comparison."""
    loader = PoissonDataLoader(IndexDataset(30), sample_rate=0.2, steps=10)
    assert isinstance(loader.batch_sampler, PoissonSampler)
    assert isinstance(loader.batch_sampler.randomness, SecretRandomness)
    first = [x.flatten().long().tolist() for x, _, _ in loader]
    second = [x.flatten().long().tolist() for x, _, _ in loader]
    assert first != second and draw() != draw()


def test_seeding_with_a_torch_generator_is_refused():
    with pytest.raises(InvalidInputError, match="generator"):
        PoissonDataLoader(records(), sample_rate=0.5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(InvalidInputError, match="torch.Generator"):
        PoissonDataLoader(records(), sample_rate=0.5, randomness=torch.Generator())
    with pytest.raises(InvalidInputError, match="randomness"):
        PoissonDataLoader(records(), sample_rate=0.5, randomness=0)


@SEEDED
def test_sampler_rate_is_exact_for_tiny_rates():
    """q = 1e-7 over 1e9 records: a float32 uniform compared with q would sample at rate
    2 * 2**-24 = 1.19e-7 (19% too many); the geometric-gap sampler hits q. 25 steps of
    Binomial(1e9, 1e-7): total ~ 2500 +- 50."""
    n, q, steps = 10**9, 1e-7, 25
    total = 0
    for k in range(steps):
        indices = poisson_sample(n, q, randomness=seeded(k))
        assert indices.dtype == torch.int64 and bool((indices[1:] > indices[:-1]).all())
        assert len(indices) == 0 or (0 <= int(indices[0]) and int(indices[-1]) < n)
        total += len(indices)
    mean, sd = n * q * steps, (n * q * (1 - q) * steps) ** 0.5
    assert abs(total - mean) < 5 * sd, (total, mean)


@SEEDED
def test_sample_rate_one_takes_every_record_and_shards_partition_the_dataset():
    assert poisson_sample(7, 1.0, randomness=seeded(0)).tolist() == list(range(7))
    world = 3
    shards = [poisson_sample(10, 1.0, rank=r, world_size=world) for r in range(world)]
    assert sorted(torch.cat(shards).tolist()) == list(range(10))
    assert all(bool((s % world == r).all()) for r, s in enumerate(shards))


@SEEDED
def test_each_rank_samples_its_shard_at_rate_q():
    """Rank r of W draws only records i = r mod W, each in a step's batch with prob. q."""
    n, q, steps, world = 12, 0.3, 2000, 3
    for rank in range(world):
        loader = PoissonDataLoader(
            IndexDataset(n),
            sample_rate=q,
            steps=steps,
            randomness=seeded(rank),
            rank=rank,
            world_size=world,
        )
        assert loader.expected_batch_size == pytest.approx(q * n)  # the global batch
        counts = torch.zeros(n)
        for x, _, _ in loader:
            counts += torch.bincount(x.flatten().long(), minlength=n)
        mine = torch.arange(n) % world == rank
        assert float(counts[~mine].sum()) == 0
        sd = (steps * q * (1 - q)) ** 0.5
        assert float((counts[mine] - steps * q).abs().max()) < 5 * sd


@SEEDED
def test_from_data_loader_replaces_shuffled_fixed_size_batches():
    data = records(20)
    shuffled = DataLoader(data, batch_size=4, shuffle=True, drop_last=True)
    loader = PoissonDataLoader.from_data_loader(shuffled, randomness=seeded(0))
    assert loader.sample_rate == pytest.approx(4 / 20)
    assert loader.expected_batch_size == pytest.approx(4)
    assert len(loader) == len(shuffled) == 5
    sizes = {len(b[0]) for _ in range(20) for b in loader}
    assert len(sizes) > 3, "Poisson batch sizes vary"
    assert isinstance(loader.batch_sampler, PoissonSampler)
    again = PoissonDataLoader.from_data_loader(loader)
    assert again.sample_rate == loader.sample_rate and len(again) == 5


def test_poisson_loader_helper_sets_q_to_b_over_n():
    loader = poisson_loader(records(20), batch_size=5)
    assert loader.sample_rate == 0.25 and len(loader) == 4
    assert poisson_loader(records(3), batch_size=8).sample_rate == 1.0


class Stream(IterableDataset):
    def __iter__(self):
        yield from range(3)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: PoissonDataLoader(records(), sample_rate=0.0), "sample_rate"),
        (lambda: PoissonDataLoader(records(), sample_rate=1.5), "sample_rate"),
        (lambda: PoissonDataLoader(records(), sample_rate=0.5, steps=0), "steps"),
        (lambda: PoissonDataLoader(records(), sample_rate=0.5, batch_size=4), "batch_size"),
        (lambda: PoissonDataLoader(records(), sample_rate=0.5, shuffle=True), "shuffle"),
        (lambda: PoissonDataLoader(Stream(), sample_rate=0.5), "map-style"),
        (lambda: PoissonDataLoader(records(0), sample_rate=0.5), "non-empty"),
        (lambda: PoissonDataLoader(records(), sample_rate=0.5, generator=1), "generator"),
        (lambda: PoissonDataLoader(records(), sample_rate=0.5, drop_last=True), "drop_last"),
        (lambda: PoissonDataLoader(records(), sample_rate=0.5, rank=2, world_size=2), "rank"),
        (lambda: PoissonDataLoader(records(), sample_rate=0.5, world_size=0), "world_size"),
        (lambda: poisson_loader(records(), batch_size=2, randomness=1), "randomness"),
        (lambda: poisson_loader(records(), batch_size=0), "batch_size"),
        (lambda: PoissonDataLoader.from_data_loader([1, 2]), "DataLoader"),
    ],
)
def test_bad_arguments(build, match):
    with pytest.raises(InvalidInputError, match=match):
        build()


def test_data_package_exports_resolve_lazily():
    import maskdp.data

    for name in maskdp.data.__all__:
        assert getattr(maskdp.data, name).__name__ == name
    with pytest.raises(AttributeError):
        maskdp.data.Nope  # noqa: B018
