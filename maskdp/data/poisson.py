r"""Poisson sampling: the batches the privacy accounting assumes.

The accountant (:mod:`maskdp.accounting.rdp`, :mod:`maskdp.accounting.prv`) charges each step as the
*Poisson-subsampled* Gaussian mechanism: every record joins the batch independently with
probability :math:`q`, so batch sizes vary (Binomial(N, q); sometimes zero) and the batch
composition is hidden by the sampling randomness. **Shuffled fixed-size batches are not
Poisson**: their privacy amplification is different (sampling without replacement, and a
shuffled epoch visits every record exactly once), so reporting Poisson accounting for them
is wrong. :func:`maskdp.training.private.make_private` therefore always replaces the loader's sampler
with this one, whatever the user's loader did.

The sampler is :class:`maskdp.mechanism.sampling.PoissonSampler` (exact rate, secret randomness,
split across processes); the collate wrapper here returns zero-length batches
for an empty sample, shaped like a real batch: ``(0, C, T, H, W)``, ``(0, T, H, W)``,
``(0,)`` for ``(x, m, y)`` records. Unlike Opacus's ``DPDataLoader`` wrapper it keeps no
copy of a real batch (the template is built once from ``dataset[0]`` and holds zero
elements), and an empty first batch has the right dtypes and shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data._utils.collate import default_collate

from maskdp.checks import check_count, check_sample_rate
from maskdp.errors import InvalidInputError
from maskdp.mechanism.randomness import Randomness
from maskdp.mechanism.sampling import PoissonSampler, steps_per_epoch

_REFUSED = ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last", "generator")


def _empty_like_batch(batch: Any) -> Any:
    """The same structure with every tensor's batch dimension set to zero."""
    if isinstance(batch, Tensor):
        if batch.dim() == 0:
            raise InvalidInputError("collate_fn returned a 0-d tensor: no batch dimension")
        return batch.new_empty((0, *batch.shape[1:]))
    if isinstance(batch, Mapping):
        return {k: _empty_like_batch(v) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_empty_like_batch(v) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_empty_like_batch(v) for v in batch)
    raise InvalidInputError(
        f"collate_fn returned a {type(batch).__name__}; an empty Poisson batch can only be "
        "built for tensors, dicts, lists and tuples of tensors"
    )


class EmptyBatchCollate:
    """Wrap ``collate_fn`` so that an empty list of records gives a zero-length batch.

    The template is the collated ``dataset[0]`` with batch dimension 0 (built once, holds no
    data). Non-empty batches go to ``collate_fn`` unchanged.
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any], dataset: Dataset) -> None:
        self.collate_fn = collate_fn
        self.template = _empty_like_batch(collate_fn([dataset[0]]))

    def __call__(self, batch: list[Any]) -> Any:
        if len(batch) > 0:
            return self.collate_fn(batch)
        return _empty_like_batch(self.template)


def _process_group(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)``: as given, else the default process group's, else ``(0, 1)``."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if rank is not None or world_size is not None:
        raise InvalidInputError("pass both rank and world_size, or neither")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_dataset(dataset: Any) -> int:
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise InvalidInputError(
            "Poisson sampling needs a map-style dataset with __len__ (not an IterableDataset)"
        )
    n = len(dataset)
    if n < 1:
        raise InvalidInputError("Poisson sampling needs a non-empty dataset")
    return n


class PoissonDataLoader(DataLoader):
    r"""A DataLoader whose every batch is a Poisson sample at rate ``sample_rate``.

    One pass yields ``steps`` batches (default :math:`\lceil 1/q \rceil`, about one epoch);
    each record is in each batch independently with probability ``q``, drawn from
    ``randomness`` (default: secret OS entropy, :mod:`maskdp.mechanism.randomness`). With
    ``world_size > 1`` it yields this ``rank``'s part of each step's global sample
    (:mod:`maskdp.mechanism.sampling`); by default both come from ``torch.distributed`` when a process
    group is initialised (each rank its shard, so that no record is sampled W times over),
    and are ``(0, 1)`` otherwise. Other keyword arguments go to
    :class:`~torch.utils.data.DataLoader`, except those that define batches
    (``batch_size``, ``shuffle``, ``sampler``, ``batch_sampler``, ``drop_last``,
    ``generator``).
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        sample_rate: float,
        steps: int | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        randomness: Randomness | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        n = _check_dataset(dataset)
        rank, world_size = _process_group(rank, world_size)
        q = check_sample_rate(sample_rate)
        if steps is None:
            steps = steps_per_epoch(q)
        refused = [k for k in _REFUSED if k in kwargs]
        if refused:
            raise InvalidInputError(
                f"PoissonDataLoader draws its own batches; do not pass {', '.join(refused)}"
            )
        if isinstance(collate_fn, EmptyBatchCollate):
            collate_fn = collate_fn.collate_fn
        sampler = PoissonSampler(
            n, q, steps=steps, randomness=randomness, rank=rank, world_size=world_size
        )
        super().__init__(
            dataset,
            batch_sampler=sampler,
            collate_fn=EmptyBatchCollate(collate_fn or default_collate, dataset),
            **kwargs,
        )
        self.sample_rate = q
        #: The expected size of the *global* batch, :math:`qN` (every rank's divisor).
        self.expected_batch_size = q * n

    @classmethod
    def from_data_loader(
        cls,
        data_loader: DataLoader,
        *,
        sample_rate: float | None = None,
        steps: int | None = None,
        randomness: Randomness | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> PoissonDataLoader:
        """A Poisson loader over ``data_loader``'s dataset, keeping its other settings.

        Defaults: ``sample_rate = batch_size / len(dataset)`` (so the expected batch size is
        the loader's ``batch_size``; capped at 1), ``steps``: a Poisson loader's own, else
        one epoch (:func:`~maskdp.mechanism.sampling.steps_per_epoch` of the rate).
        """
        n = _check_dataset(check_data_loader(data_loader).dataset)
        if sample_rate is None:
            if isinstance(data_loader, PoissonDataLoader):
                sample_rate = data_loader.sample_rate
            elif data_loader.batch_size is None:
                raise InvalidInputError(
                    "data_loader has no batch_size (it uses a batch_sampler); pass sample_rate="
                )
            else:
                sample_rate = min(1.0, data_loader.batch_size / n)
        return cls(
            data_loader.dataset,
            sample_rate=sample_rate,
            steps=len(data_loader)
            if steps is None and isinstance(data_loader, PoissonDataLoader)
            else steps,
            collate_fn=data_loader.collate_fn,
            randomness=randomness,
            rank=rank,
            world_size=world_size,
            num_workers=data_loader.num_workers,
            pin_memory=data_loader.pin_memory,
            timeout=data_loader.timeout,
            worker_init_fn=data_loader.worker_init_fn,
            multiprocessing_context=data_loader.multiprocessing_context,
            prefetch_factor=data_loader.prefetch_factor,
            persistent_workers=data_loader.persistent_workers,
        )


def check_data_loader(data_loader: Any) -> DataLoader:
    """``data_loader`` if it is a torch DataLoader; a one-line error otherwise."""
    if not isinstance(data_loader, DataLoader):
        raise InvalidInputError(
            f"data_loader must be a torch DataLoader, got {type(data_loader).__name__}"
        )
    return data_loader


def poisson_loader(
    dataset: Dataset | Sequence[Any],
    *,
    batch_size: int,
    steps: int | None = None,
    randomness: Randomness | None = None,
    **kwargs: Any,
) -> PoissonDataLoader:
    """A :class:`PoissonDataLoader` with expected batch size ``batch_size`` (q = B / N)."""
    n = _check_dataset(dataset)
    check_count("batch_size", batch_size, 1)
    return PoissonDataLoader(
        dataset,  # type: ignore[arg-type]
        sample_rate=min(1.0, batch_size / n),
        steps=steps,
        randomness=randomness,
        **kwargs,
    )


class StepBatches(NamedTuple):
    """What one MaskDP-SGD step consumes: the private Poisson batch and the public batch.

    ``public`` is drawn independently of ``private`` (DESIGN.md section 3); it is ``None``
    when labels are protected (plain DP-SGD has no public term).
    """

    private: Any
    public: Any


class MaskDPDataLoader:
    """Yields :class:`StepBatches`: a private Poisson batch and an independent public batch.

    ``for private, public in loader: optimizer.backward(*private, public=public);
    optimizer.step()``. Both loaders have the same number of steps per pass.
    """

    def __init__(self, private: PoissonDataLoader, public: PoissonDataLoader | None) -> None:
        if public is not None and len(public) != len(private):
            raise InvalidInputError(
                f"the public loader has {len(public)} steps per pass, the private one "
                f"{len(private)}; give both the same steps"
            )
        self.private = private
        self.public = public

    @property
    def dataset(self) -> Dataset:
        return self.private.dataset

    @property
    def sample_rate(self) -> float:
        return self.private.sample_rate

    @property
    def expected_batch_size(self) -> float:
        return self.private.expected_batch_size

    @property
    def public_sample_rate(self) -> float | None:
        return None if self.public is None else self.public.sample_rate

    def __len__(self) -> int:
        return len(self.private)

    def __iter__(self) -> Iterator[StepBatches]:
        if self.public is None:
            for batch in self.private:
                yield StepBatches(batch, None)
            return
        for batch, public in zip(self.private, self.public, strict=True):
            yield StepBatches(batch, public)
