"""The Poisson loader: Binomial batch sizes, per-record rate q, empty batches shaped like real ones."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from maskdp.data import PoissonDataLoader, poisson_loader
from maskdp.errors import InvalidInputError


def records(n: int = 20) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 2, 4, 4, generator=gen)
    m = torch.rand(n, 2, 4, 4, generator=gen) < 0.5
    y = torch.randint(0, 3, (n,), generator=gen)
    return TensorDataset(x, m, y)


class IndexDataset(Dataset):
    """Records whose x is their index, to count inclusions (python int labels)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.full((1,), float(i)), torch.zeros(1, dtype=torch.bool), i % 3


def test_batch_sizes_are_binomial_and_records_are_included_at_rate_q():
    n, q, steps = 20, 0.1, 3000
    loader = PoissonDataLoader(
        IndexDataset(n), sample_rate=q, steps=steps, generator=torch.Generator().manual_seed(0)
    )
    assert len(loader) == steps
    sizes, counts = [], torch.zeros(n)
    for x, _, _ in loader:
        sizes.append(len(x))
        counts += torch.bincount(x.flatten().long(), minlength=n)
    sizes = torch.tensor(sizes, dtype=torch.float64)
    mean, var = n * q, n * q * (1 - q)
    assert abs(float(sizes.mean()) - mean) < 5 * (var / steps) ** 0.5
    assert abs(float(sizes.var()) / var - 1) < 0.15
    assert (sizes == 0).any(), "P(empty) = 0.9^20 = 0.12: empty batches must occur"
    # each record's inclusion count is Binomial(steps, q)
    sd = (steps * q * (1 - q)) ** 0.5
    assert float((counts - steps * q).abs().max()) < 5 * sd


@pytest.mark.parametrize("first_empty", [True, False])
def test_empty_batches_are_shaped_like_real_ones(first_empty):
    data = records(8)
    loader = PoissonDataLoader(
        data,
        sample_rate=1e-9 if first_empty else 0.2,
        steps=50,
        generator=torch.Generator().manual_seed(1),
    )
    batches = list(loader)
    empties = [b for b in batches if len(b[0]) == 0]
    assert empties and (first_empty or len(batches[0][0]) > 0)
    x, m, y = empties[0]
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


def test_sampling_is_seedable():
    def draw(seed):
        loader = PoissonDataLoader(
            IndexDataset(30),
            sample_rate=0.2,
            steps=10,
            generator=torch.Generator().manual_seed(seed),
        )
        return [x.flatten().tolist() for x, _, _ in loader]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_from_data_loader_replaces_shuffled_fixed_size_batches():
    data = records(20)
    shuffled = DataLoader(data, batch_size=4, shuffle=True, drop_last=True)
    loader = PoissonDataLoader.from_data_loader(
        shuffled, generator=torch.Generator().manual_seed(0)
    )
    assert loader.sample_rate == pytest.approx(4 / 20)
    assert loader.expected_batch_size == pytest.approx(4)
    assert len(loader) == len(shuffled) == 5
    sizes = {len(b[0]) for _ in range(20) for b in loader}
    assert len(sizes) > 3, "Poisson batch sizes vary"
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
