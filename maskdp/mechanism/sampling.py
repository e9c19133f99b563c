r"""The one Poisson sampler: every record joins a step's batch independently with probability q.

Used by the data loaders of :func:`maskdp.training.private.make_private`, ``maskdp train``, the
audit and distributed training. The accountant charges each step as the
Poisson-subsampled Gaussian mechanism, so the realised rate must be exactly :math:`q`:

- **Exact rate.** Instead of comparing one uniform per record with :math:`q` (a float32
  uniform lives on a :math:`2^{-24}` grid: at :math:`q = 10^{-7}` the real rate is 19%
  higher), the sampler draws the gaps between sampled records, each a geometric variable
  :math:`G = \lfloor \ln u / \ln(1 - q) \rfloor` with :math:`u` a float64 uniform on
  :math:`(0, 1]`, so that :math:`P(G \ge k) = P(u \le (1-q)^k) = (1-q)^k` up to the
  :math:`2^{-53}` grid of :math:`u`. It costs :math:`O(qN)` draws, not :math:`O(N)`.
- **Secret.** The uniforms come from a :class:`~maskdp.mechanism.randomness.Randomness`, by default
  the OS entropy pool: no seed determines the batches.
- **Split across processes.** Rank :math:`r` of :math:`W` samples only the records
  :math:`i \equiv r \pmod W` of its shard; the shards partition the dataset and each
  record is still included independently with probability :math:`q`, so the union over
  ranks is one Poisson sample of the whole dataset: each sampled record enters the global
  batch exactly once.
- **Resumable without saved state.** Steps are independent; a resumed run draws fresh ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from maskdp.checks import check_count, check_finite, check_int_in, check_sample_rate
from maskdp.mechanism.randomness import Randomness, check_randomness


def steps_per_epoch(sample_rate: float) -> int:
    r"""The one definition of an epoch: :math:`\lceil 1/q \rceil` Poisson steps (each record
    is expected to be seen at least once). ``1/q`` within 1e-12 of an integer counts as it,
    so ``q = B/N`` with ``B`` dividing ``N`` gives exactly ``N/B`` steps."""
    inverse = 1.0 / check_sample_rate(sample_rate)
    nearest = round(inverse)
    return nearest if math.isclose(inverse, nearest, rel_tol=1e-12) else math.ceil(inverse)


def epochs_to_steps(epochs: float, sample_rate: float) -> int:
    """Steps of ``epochs`` epochs (fractional epochs allowed): at least one step."""
    check_finite("epochs", epochs, positive=True)
    exact = epochs * steps_per_epoch(sample_rate)
    nearest = round(exact)
    return max(1, nearest if math.isclose(exact, nearest, rel_tol=1e-12) else math.ceil(exact))


def _check_shard(num_records: int, rank: int, world_size: int) -> None:
    check_count("num_records", num_records, 1)
    check_int_in("rank", rank, 0, check_count("world_size", world_size, 1) - 1)


def bernoulli_positions(count: int, sample_rate: float, randomness: Randomness) -> Tensor:
    """Sorted positions in ``range(count)``, each included independently with prob. ``q``."""
    if count == 0:
        return torch.zeros(0, dtype=torch.int64)
    if sample_rate >= 1.0:
        return torch.arange(count)
    log_keep = math.log1p(-sample_rate)
    found: list[Tensor] = []
    start = 0  # the first position not yet decided
    while start < count:
        expected = (count - start) * sample_rate
        draws = int(expected + 6 * math.sqrt(expected) + 16)
        u = randomness.uniform(draws)
        gaps = torch.floor(torch.log(u) / log_keep).clamp_(max=count).to(torch.int64)
        positions = start + torch.cumsum(gaps + 1, 0) - 1
        found.append(positions[positions < count])
        start = int(positions[-1]) + 1
    return torch.cat(found)


def poisson_sample(
    num_records: int,
    sample_rate: float,
    *,
    randomness: Randomness | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Tensor:
    """Indices of one step's Poisson batch, restricted to shard ``rank`` of ``world_size``.

    Record ``i`` is in the shard iff ``i % world_size == rank``; each record of the shard is
    included independently with probability ``sample_rate``.
    """
    sampler = PoissonSampler(
        num_records, sample_rate, steps=1, randomness=randomness, rank=rank, world_size=world_size
    )
    return sampler.sample()


class PoissonSampler:
    """A batch sampler yielding ``steps`` Poisson batches (lists of indices) per pass."""

    def __init__(
        self,
        num_records: int,
        sample_rate: float,
        *,
        steps: int,
        randomness: Randomness | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.sample_rate = check_sample_rate(sample_rate)
        _check_shard(num_records, rank, world_size)
        check_count("steps", steps, 1)
        self.num_records, self.steps = num_records, steps
        self.rank, self.world_size = rank, world_size
        self.randomness = check_randomness(randomness)
        self._shard_size = len(range(rank, num_records, world_size))

    def sample(self) -> Tensor:
        """One step's indices in this rank's shard: record ``rank + world_size * j`` for each
        position ``j`` of the shard drawn by :func:`bernoulli_positions`."""
        positions = bernoulli_positions(self._shard_size, self.sample_rate, self.randomness)
        return self.rank + self.world_size * positions

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield self.sample().tolist()

    def __len__(self) -> int:
        return self.steps
