r"""Distributed data parallel MaskDP-SGD over ``torch.distributed`` (one logical step, W ranks).

Usage (every rank runs the same script, e.g. under ``torchrun``)::

    torch.distributed.init_process_group("gloo")          # or "nccl"
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    _, optimizer, loader = maskdp.make_private(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1),
        DataLoader(dataset, batch_size=B_global), noise_multiplier=1.0, max_grad_norm=1.0,
        loss_fn=torch.nn.CrossEntropyLoss())
    for private, public in loader:                       # this rank's shards of both batches
        optimizer.backward(*private, public=public)
        optimizer.step()

What one logical step releases (DESIGN.md section 3), and why it is the single-process
mechanism:

- **Sampling.** Rank ``r`` Poisson-samples, at the global rate :math:`q` and from its own
  secret randomness, the records of its shard (record ``i`` belongs to rank ``i mod W``,
  :func:`maskdp.mechanism.sampling.poisson_sample`). The shards partition the data and every record
  is included independently with probability :math:`q`, so the union over ranks is exactly
  one Poisson sample of the whole dataset at rate :math:`q`: each sampled record enters the
  global batch once, and the accountant's subsampling step is unchanged. The public batch
  is split the same way, and its sums are all-reduced too.
- **Clipped sums.** Each rank computes :math:`S_r = \sum_{i \in B_r} (h_i + c_i\Delta_i)`
  with its engine; the ranks' sums are added by one ``all_reduce(SUM)``, so every rank holds
  :math:`\sum_r S_r`, the clipped sum of the global batch.
- **Noise exactly once.** Only rank 0 adds :math:`N(0, \sigma^2 C^2 I)`, to its own
  :math:`S_0`, *before* the all-reduce; the other ranks add nothing and do not draw. The
  reduced buffer is the same on every rank, so every rank ends with
  :math:`\sum_r S_r + N(0, \sigma^2 C^2 I)`: one Gaussian draw of the right scale, as in the
  single-process step (the sensitivity of the global sum to one record is still :math:`C`).
  This is Opacus's ``DistributedDPOptimizer`` choice. Alternatives rejected: every rank
  adding :math:`N(0, \sigma^2 C^2 / W)` is private too but makes the update depend on W
  generators and differ from a single-process run; every rank adding the *same* noise from
  a synchronised generator after the all-reduce is correct only while all W generator
  states stay identical (a mis-seeded rank, or a resume that restores per-rank states,
  silently desynchronises the models, and a synchronised secret stream would have to be
  shared). With noise on rank 0 only, rank 0's secret randomness alone determines the noise.
- **Scale and account.** Every rank divides by the *global* expected batch size
  :math:`B = qN` (pass it as ``expected_batch_size``) and records one step in its ledger,
  so all ledgers are identical and a budget guard stops every rank at the same step.

Trust model: the un-noised per-rank sums travel between ranks during the all-reduce, so all
ranks must be trusted (one operator's machines), as in Opacus; the guarantee is about what
leaves the training job (the model), not about the ranks seeing each other.

DDP is used only for what it does at construction (broadcasting rank 0's parameters and
buffers so every replica starts equal) and as the marker that the model is replicated:
engines run on ``ddp.module`` and compute gradients with ``torch.autograd.grad``, never
``.backward()`` into ``param.grad``, and DDP's own forward is never called, so its reducer
never expects a gradient and never all-reduces anything (no double counting, no
``no_sync()`` needed). Buffers are therefore not re-broadcast each step; models with
running statistics are refused anyway (:func:`maskdp.engines.validate.validate_model`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from maskdp.errors import InvalidInputError

if TYPE_CHECKING:
    from torch.optim import Optimizer

    from maskdp.settings import PrivacySettings


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a process group: ``rank`` of ``world_size`` in ``group``."""

    rank: int
    world_size: int
    group: Any = None  # a ProcessGroup, None for the default group

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that adds the noise and writes files."""
        return self.rank == 0

    def all_reduce_sum(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Elementwise sum over ranks of each tensor (same keys, order and shapes everywhere).

        Tensors are flattened into one buffer per (dtype, device) so a step costs one
        collective per buffer; the result is identical on every rank.
        """
        out = dict(tensors)
        buckets: dict[tuple[torch.dtype, torch.device], list[str]] = {}
        for name, t in tensors.items():
            buckets.setdefault((t.dtype, t.device), []).append(name)
        for names in buckets.values():
            flat = torch.cat([tensors[n].detach().reshape(-1) for n in names])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            offset = 0
            for n in names:
                size = tensors[n].numel()
                out[n] = flat[offset : offset + size].view_as(tensors[n])
                offset += size
        return out

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def check_same(self, settings: dict[str, float]) -> None:
        """Raise :class:`InvalidInputError` on every rank unless all ranks pass equal values.

        The noise is drawn by rank 0 but every rank scales and accounts with its own
        settings: a difference would make the ledgers disagree with what was released.
        """
        values = torch.tensor(list(settings.values()), dtype=torch.float64)
        high, low = values.clone(), values.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=self.group)
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=self.group)
        differ = [name for name, h, lo in zip(settings, high, low, strict=True) if h != lo]
        if differ:
            raise InvalidInputError(
                f"{', '.join(differ)} differ between ranks; pass the same (global) values on "
                "every rank"
            )

    def check_same_settings(self, settings: PrivacySettings, optimizer: Optimizer) -> None:
        """:meth:`check_same` on every setting that changes the release or the accounting.

        A difference in ``protect_labels``, ``shrinkage`` or ``autocast`` would pair
        different all-reduces across ranks; the released sizes must match for the same
        reason.
        """
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.check_same(
            {
                "noise_multiplier": settings.noise_multiplier,
                "max_grad_norm": settings.max_grad_norm,
                "expected_batch_size": settings.expected_batch_size,
                "expected_public_batch_size": float(settings.expected_public_batch_size or 0),
                "sample_rate": settings.sample_rate,
                "protect_labels": float(settings.protect_labels),
                "private_weight": settings.private_weight,
                "shrinkage": float(settings.shrinkage is not None),
                "private_term": float(settings.private_term == "full"),
                "autocast": float((None, torch.float16, torch.bfloat16).index(settings.autocast)),
                "released tensors": float(len(params)),
                "released values": float(sum(p.numel() for p in params)),
            }
        )


def is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def unwrap_ddp(model: nn.Module) -> tuple[nn.Module, DistributedContext | None]:
    """``(ddp.module, context)`` for a ``DistributedDataParallel`` model, else ``(model, None)``.

    A plain model is treated as single-process even when a process group exists: W ranks
    each training their own model (a sweep) is legitimate and each accounts for itself.
    """
    if not is_ddp(model):
        return model, None
    if not dist.is_initialized():  # pragma: no cover - DDP cannot be built without one
        raise InvalidInputError(
            "a DistributedDataParallel model needs an initialised process group"
        )
    group = getattr(model, "process_group", None)
    context = DistributedContext(
        rank=dist.get_rank(group), world_size=dist.get_world_size(group), group=group
    )
    return model.module, context


def env_world() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from torchrun's environment, None when absent.

    A ``WORLD_SIZE`` of 1 is returned too (a one-process torchrun); a partial or invalid
    set of variables raises :class:`InvalidInputError`.
    """
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise InvalidInputError(
            "RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)"
        ) from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise InvalidInputError(
            f"invalid torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}"
        )
    return rank, world, local


@contextmanager
def from_env(device: str = "cpu") -> Iterator[DistributedContext | None]:
    """Join the process group described by torchrun's variables for the block (None if not
    distributed); a group this function initialised is destroyed on exit.

    ``gloo`` on CPU; for a CUDA device ``nccl`` for CUDA tensors and ``gloo`` for CPU ones;
    ``MASTER_ADDR``/``MASTER_PORT`` come from the environment (``env://``). A group
    initialised already by the caller is reused and left alone. On CUDA the process uses
    device ``cuda:LOCAL_RANK``.
    """
    world = env_world()
    if world is None or world[1] == 1:
        yield None
        return
    rank, size, local = world
    created = not dist.is_initialized()
    if created:
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(local)
        # CUDA: nccl for CUDA tensors and gloo for any CPU tensor (e.g. a CPU model).
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=size)
    try:
        yield DistributedContext(rank=dist.get_rank(), world_size=dist.get_world_size())
    finally:
        if created:
            dist.destroy_process_group()


def sum_gradients(params: list[Tensor], context: DistributedContext | None, count: int) -> int:
    """Sum ``p.grad`` over ranks (a missing gradient counts as zeros) for a non-private step.

    Returns the number of samples of the global batch (``count`` summed over ranks). When it
    is 0 every ``p.grad`` is set to None, so the caller can skip the step exactly as a
    single process does on an empty batch. Without a context, returns ``count`` unchanged.
    """
    if context is None:
        return count
    tensors = {
        str(i): p.grad if p.grad is not None else torch.zeros_like(p) for i, p in enumerate(params)
    }
    device = params[0].device if params else torch.device("cpu")
    tensors["count"] = torch.tensor([float(count)], dtype=torch.float64, device=device)
    summed = context.all_reduce_sum(tensors)
    total = int(round(float(summed.pop("count"))))
    for i, p in enumerate(params):
        p.grad = summed[str(i)] if total else None
    return total
