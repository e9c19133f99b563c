"""Distributed data parallel MaskDP-SGD equals the single-process step (2 gloo ranks on CPU).

- For every engine, 2 ranks (each its shard ``i % 2 == rank`` of the global private and
  public batches, the model wrapped in DistributedDataParallel) take the same parameters,
  gradients and ledgers as one process on the global batches with the same (test-only,
  seeded) noise (1e-6): the noise is added exactly once at scale sigma C, by rank 0 alone
  (rank 1's randomness is another seed and must not matter), the division is by the global
  expected batch sizes, and each logical step is accounted once. Steps with an empty local
  batch and an empty global batch (private and public) are included.
- ``make_private`` on a DistributedDataParallel model gives each rank its shard of both
  batches (record ``i`` on rank ``i % W``), and its loop keeps the replicas identical.
- DDP's own reducer is untouched: a plain DDP forward/backward still works afterwards.
- ``maskdp.trainer.run.train`` under a torchrun-like environment (RANK, WORLD_SIZE, MASTER_*):
  2 ranks keep identical replicas and give the step count, ledger and epsilon of a
  single-process run (noise and sampling are secret, so the weights are not comparable
  with it), and only rank 0 writes the run directory. ``torchrun --nproc_per_node 2``
  itself runs in the slow tier.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import TINY_TRAIN, random_clips
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from maskdp.errors import InvalidInputError
from maskdp.mechanism.randomness import InsecureRandomnessWarning, InsecureSeededRandomness
from maskdp.mechanism.sampling import poisson_sample
from maskdp.mechanism.views import FillView
from maskdp.models import VideoViT
from maskdp.training.distributed import DistributedContext, env_world, sum_gradients
from maskdp.training.optimizer import MaskDPOptimizer
from maskdp.training.private import make_private

ENGINES = ("reference", "ghost")  # the oracle and the default; vmap and hooks: slow tier
WORLD = 2
# The global batches of three steps. Private: mixed, only even indices (rank 1 empty), none.
# Public (drawn independently): mixed, only odd indices (rank 0 empty), none.
STEPS = ([0, 1, 2, 3, 4, 5, 6], [2, 4, 8], [])
PUBLIC_STEPS = ([1, 3, 4, 9, 10], [1, 7], [])
DATASET_SIZE = 12
TINY = {**TINY_TRAIN, "noise_multiplier": 1.0, "view": "fill", "lr": 2e-3}
# Public warm-up steps (gradients summed over ranks by sum_gradients) then private steps.
WARMUP = {**TINY, "public_epochs": 1.0, "epochs": 0.5}
RUNS = {"private": TINY, "warmup": WARMUP}


def shard(indices: list[int], rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s part of a global batch: record ``i`` belongs to rank ``i % world``."""
    idx = torch.tensor(indices, dtype=torch.long)
    return idx[idx % world == rank]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dataset() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return random_clips(DATASET_SIZE, seed=3)


def tiny_vit() -> VideoViT:
    return VideoViT(num_classes=3, frames=4, image_size=16, dim=16, depth=1, heads=2)


def run_steps(engine: str, *, rank: int = 0, world: int | None = None) -> dict:
    """Three MaskDP steps on this rank's shards (everything when ``world`` is None)."""
    torch.manual_seed(0 if world is None else 100 + rank)  # DDP must broadcast rank 0's init
    model = tiny_vit()
    if world is not None and rank == 0:
        torch.manual_seed(0)
        model.load_state_dict(tiny_vit().state_dict())
    wrapped = nn.parallel.DistributedDataParallel(model) if world is not None else model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureRandomnessWarning)
        # Replayable noise (tests only): rank 0's seed is the single process's; rank 1 gets
        # another one, which must not matter since rank 0 alone draws the noise.
        randomness = InsecureSeededRandomness(7 if rank == 0 else 107)
    optimizer = MaskDPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5),
        model=wrapped,
        loss_fn=nn.CrossEntropyLoss(),
        noise_multiplier=0.8,
        max_grad_norm=0.05,  # small: most records are clipped
        expected_batch_size=3,  # the GLOBAL expected batch sizes
        expected_public_batch_size=4,
        sample_rate=0.25,
        view=FillView(0.0),
        engine=engine,
        randomness=randomness,
    )
    x, m, y = dataset()
    for private, public in zip(STEPS, PUBLIC_STEPS, strict=True):
        idx = shard(private, rank, world or 1)
        pub = shard(public, rank, world or 1)
        optimizer.backward(x[idx], m[idx], y[idx], public=(x[pub], m[pub], y[pub]))
        optimizer.step()  # no zero_grad: a step consumes its sums
    out = {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
        "ledger": optimizer.ledger.to_dict(),
        "steps": optimizer.steps,
        "epsilon": optimizer.epsilon(1e-5),
        "distributed": None
        if optimizer.distributed is None
        else (optimizer.distributed.rank, optimizer.distributed.world_size),
    }
    if world is not None:
        # DDP's reducer was never engaged: an ordinary DDP step still works and averages.
        optimizer.original_optimizer.zero_grad()
        wrapped(x[:2]).sum().backward()
        out["ddp_grad_ok"] = all(p.grad is not None for p in model.parameters())
    optimizer.close()
    return out


def _record_ids(batch, x_all: torch.Tensor) -> list[int]:
    """Dataset indices of the records of a collated batch (their first pixels are unique)."""
    keys = x_all[:, 0, 0, 0, 0]
    return [int((keys == v).nonzero()) for v in batch[0][:, 0, 0, 0, 0]]


def _make_private_case(rank: int, world: int) -> dict:
    """make_private on a DDP model: the batches each rank's loader yields, then two steps."""
    x, m, y = dataset()
    data = TensorDataset(x, m, y)
    torch.manual_seed(100 + rank)  # other initial weights: DDP broadcasts rank 0's
    model = tiny_vit()
    ddp = nn.parallel.DistributedDataParallel(model)
    # Full batches (q = 1): each rank gets exactly its shard, private and public.
    _, full_optimizer, full = make_private(
        ddp,
        torch.optim.SGD(ddp.parameters(), lr=0.1),
        DataLoader(data, batch_size=DATASET_SIZE),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        loss_fn=nn.CrossEntropyLoss(),
        engine="ghost",
    )
    full_ids = [(_record_ids(a, x), _record_ids(b, x)) for a, b in full]
    full_optimizer.close()
    # q = 1/2: 30 steps of secret Poisson batches (each rank its own randomness).
    _, optimizer, loader = make_private(
        ddp,
        torch.optim.SGD(ddp.parameters(), lr=0.1),
        DataLoader(data, batch_size=DATASET_SIZE // 2),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        loss_fn=nn.CrossEntropyLoss(),
        engine="ghost",
    )
    sampled = []
    for _ in range(15):
        sampled += [(_record_ids(a, x), _record_ids(b, x)) for a, b in loader]
    for private, public in loader:  # the documented loop, one pass (2 steps)
        optimizer.backward(*private, public=public)
        optimizer.step()
    out = {
        "full": full_ids,
        "sampled": sampled,
        "steps_per_pass": len(loader),
        "sample_rate": loader.sample_rate,
        "expected_batch_size": optimizer.expected_batch_size,
        "expected_public_batch_size": optimizer.expected_public_batch_size,
        "distributed": (optimizer.distributed.rank, optimizer.distributed.world_size),
        "steps": optimizer.steps,
        "ledger": optimizer.ledger.to_dict(),
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }
    optimizer.close()
    return out


def _worker(
    rank: int, world: int, ports: list[int], out: str, engines: tuple[str, ...], full: bool
) -> None:
    """One spawn for the whole module (starting processes costs more than the tests)."""
    torch.set_num_threads(1)
    if full:
        _train_runs(rank, world, ports[1:], out)  # maskdp.trainer.run joins and leaves its group
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{ports[0]}", rank=rank, world_size=world
    )
    try:
        results = {engine: run_steps(engine, rank=rank, world=world) for engine in engines}
        if full:
            results["gradients"] = _sum_gradients_case(rank, world)
            results["mismatch"] = _mismatch_case(rank)
            results["user_loader"] = _user_loader_case()
            results["make_private"] = _make_private_case(rank, world)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(out: Path, engines: tuple[str, ...], full: bool) -> list[dict]:
    ports = [free_port() for _ in range(1 + len(RUNS))]
    mp.spawn(_worker, args=(WORLD, ports, str(out), engines, full), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _mismatch_case(rank: int) -> dict[str, str | None]:
    """Ranks passing different settings are refused on every rank (ledgers would differ)."""
    errors: dict[str, str | None] = {}
    base = {"expected_batch_size": 3, "expected_public_batch_size": 4}
    for name, sizes in (
        ("private", {**base, "expected_batch_size": 3 + rank}),
        ("public", {**base, "expected_public_batch_size": 4 + rank}),
        # Would pair one rank's public all-reduce with another's private one.
        ("protect_labels", {**base, "protect_labels": rank == 1}),
    ):
        model = tiny_vit()
        errors[name] = None
        try:
            MaskDPOptimizer(
                torch.optim.SGD(model.parameters(), lr=0.1),
                model=nn.parallel.DistributedDataParallel(model),
                loss_fn=nn.CrossEntropyLoss(),
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                sample_rate=0.25,
                engine="reference",
                **sizes,  # a rank-local batch size: wrong
            )
        except InvalidInputError as err:
            errors[name] = str(err)
    return errors


def _user_loader_case() -> list[int]:
    """A PoissonDataLoader built without rank/world_size inside a process group samples
    this rank's shard only (else every rank would sample every record)."""
    from maskdp.data import PoissonDataLoader

    loader = PoissonDataLoader(list(range(40)), sample_rate=1.0, steps=1)
    return [int(i) for batch in loader for i in batch]


def _sum_gradients_case(rank: int, world: int) -> dict:
    """sum_gradients: sums over ranks, counts the global batch, clears grads when empty."""
    context = DistributedContext(rank=rank, world_size=world)
    a = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.zeros(2))
    a.grad = torch.full((3,), float(rank + 1))  # b has no gradient on any rank
    total = sum_gradients([a, b], context, count=rank + 2)
    empty = sum_gradients([a, b], context, count=0)
    return {"total": total, "a": a.grad, "b": b.grad, "empty": empty}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    spawn(out, ENGINES, full=True)
    return out


@pytest.fixture(scope="module")
def two_ranks(spawned: Path) -> list[dict]:
    return [torch.load(spawned / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.slow  # spawns two processes
@pytest.mark.parametrize("engine", ENGINES)
def test_ddp_update_equals_the_single_process_update(two_ranks, engine: str) -> None:
    assert_equals_single_process(two_ranks, engine)


@pytest.mark.slow
def test_ddp_update_with_the_other_engines(tmp_path: Path) -> None:
    ranks = spawn(tmp_path, ("vmap", "hooks"), full=False)
    for engine in ("vmap", "hooks"):
        assert_equals_single_process(ranks, engine)


def assert_equals_single_process(two_ranks: list[dict], engine: str) -> None:
    single = run_steps(engine)
    assert single["distributed"] is None
    for rank, result in enumerate(two_ranks):
        got = result[engine]
        assert got["distributed"] == (rank, WORLD)
        for kind in ("params", "grads"):
            for name, ref in single[kind].items():
                torch.testing.assert_close(got[kind][name], ref, atol=1e-6, rtol=0, msg=name)
        # One ledger step per logical step, the same ledger on every rank.
        assert got["ledger"] == single["ledger"]
        assert got["steps"] == single["steps"] == len(STEPS)
        assert got["epsilon"] == single["epsilon"]
        assert got["ddp_grad_ok"]
    # The all-reduced update is bit-identical across ranks (one noisy sum, broadcast).
    for name, p in two_ranks[0][engine]["params"].items():
        assert torch.equal(p, two_ranks[1][engine]["params"][name])


@pytest.mark.slow  # spawns two processes
def test_noise_enters_once_not_per_rank(two_ranks) -> None:
    """If each rank added sigma C noise (rank 1 from another seed), the 2-rank update would
    differ from one process's by a fresh Gaussian; the spread shows the noise is there."""
    single = run_steps("ghost")
    got = two_ranks[0]["ghost"]["grads"]
    gap = max(float((got[n] - single["grads"][n]).abs().max()) for n in got)
    assert gap < 1e-6
    # and the noise is not negligible: it dominates the clipped mean (C = 0.05, B = 3)
    noise_std = 0.8 * 0.05 / 3
    spread = torch.cat([g.flatten() for g in got.values()]).std()
    assert spread > 0.5 * noise_std


@pytest.mark.slow  # spawns two processes
def test_make_private_gives_each_rank_its_shard(two_ranks) -> None:
    cases = [result["make_private"] for result in two_ranks]
    for rank, case in enumerate(cases):
        shard_ids = list(range(rank, DATASET_SIZE, WORLD))
        # q = 1: exactly the shard, in both batches of the step.
        assert case["full"] == [(shard_ids, shard_ids)]
        # q = 1/2: only records of the shard, each sampled at some step (30 steps: a record
        # of the shard is missed with probability 2^-30).
        assert len(case["sampled"]) == 30
        for kind in (0, 1):  # private, public
            seen = [i for step in case["sampled"] for i in step[kind]]
            assert all(i % WORLD == rank for i in seen), (rank, kind, seen)
            assert sorted(set(seen)) == shard_ids
        # Divisors are the global expected sizes; one ledger step per logical step.
        assert case["distributed"] == (rank, WORLD)
        assert case["steps_per_pass"] == 2 and case["sample_rate"] == 0.5
        assert case["expected_batch_size"] == case["expected_public_batch_size"] == 6
        assert case["steps"] == 2
    assert cases[0]["ledger"] == cases[1]["ledger"]
    # Secret sampling: the ranks' shards are drawn independently, yet the replicas (rank 1
    # started from other weights) hold the same parameters after the documented loop.
    for name, p in cases[0]["params"].items():
        assert torch.equal(p, cases[1]["params"][name]), name


@pytest.mark.slow  # spawns two processes
def test_sum_gradients_over_ranks(two_ranks) -> None:
    for result in two_ranks:
        case = result["gradients"]
        assert case["total"] == 2 + 3
        assert case["empty"] == 0
        assert case["a"] is None and case["b"] is None  # cleared for the empty global batch


@pytest.mark.slow  # spawns two processes
def test_settings_that_differ_between_ranks_are_refused(two_ranks) -> None:
    for result in two_ranks:
        errors = result["mismatch"]
        assert errors["private"] is not None and errors["public"] is not None
        assert errors["private"].startswith("expected_batch_size differ between ranks")
        assert errors["public"].startswith("expected_public_batch_size differ between ranks")
        assert errors["protect_labels"] is not None
        assert errors["protect_labels"].startswith("protect_labels differ between ranks")
    for rank, result in enumerate(two_ranks):  # a loader built by hand inside the group
        assert result["user_loader"] and all(i % WORLD == rank for i in result["user_loader"])


def test_poisson_shards_partition_the_dataset() -> None:
    """Rank r samples only records i = r (mod W); at q = 1 the shards cover the dataset."""
    parts = [poisson_sample(10, 1.0, rank=r, world_size=3) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    assert all(((p % 3) == r).all() for r, p in enumerate(parts))
    sampled = poisson_sample(1000, 0.3, rank=1, world_size=3)
    assert len(sampled) and ((sampled % 3) == 1).all()
    with pytest.raises(InvalidInputError, match="rank"):
        poisson_sample(10, 0.5, rank=3, world_size=3)


def test_env_world(monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert env_world() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert env_world() == (1, 2, 1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(InvalidInputError, match="torchrun"):
        env_world()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(InvalidInputError, match="integers"):
        env_world()


# ------------------------------------------------------------------- maskdp train, 2 ranks


def _train_runs(rank: int, world: int, ports: list[int], out: str) -> None:
    from maskdp.trainer.config import build_config
    from maskdp.trainer.run import train

    for (name, options), port in zip(RUNS.items(), ports, strict=True):
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        final: dict[str, torch.Tensor] = {}

        def keep_final(step: int, total: int, loss: float, run, final=final) -> None:
            if step == total:  # this rank's replica after the last step
                final.update({k: v.detach().clone() for k, v in run.model.state_dict().items()})

        metrics = train(build_config(**options), Path(out) / f"ddp-{name}", on_step=keep_final)
        torch.save(metrics.to_dict(), Path(out) / f"metrics-{name}-{rank}.pt")
        torch.save(final, Path(out) / f"model-{name}-{rank}.pt")
        assert not dist.is_initialized()  # train() destroys the group it created
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name)


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)


def _assert_same_accounting(got: Path, ref: Path) -> None:
    """Same step, ledger and privacy metrics (the weights depend on secret draws)."""
    a, b = _checkpoint(got), _checkpoint(ref)
    assert a["extra"]["step"] == b["extra"]["step"]
    assert a["optimizer"]["ledger"] == b["optimizer"]["ledger"]
    assert a["optimizer"]["steps"] == b["optimizer"]["steps"]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.isfinite(v).all() for v in a["model"].values())
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (got, ref))
    for key in ("epsilon", "delta", "steps", "private_steps", "noise_multiplier", "sample_rate"):
        assert ma[key] == mb[key], key


@pytest.mark.slow  # spawns two processes
def test_train_with_two_gloo_ranks_matches_one_process(spawned: Path, tmp_path: Path) -> None:
    from maskdp.trainer.config import build_config
    from maskdp.trainer.run import train

    for name, options in RUNS.items():
        single = train(build_config(**options), tmp_path / f"single-{name}")
        run_dir = spawned / f"ddp-{name}"
        metrics = [torch.load(spawned / f"metrics-{name}-{r}.pt") for r in range(WORLD)]
        for got in metrics:
            assert got["epsilon"] == single.epsilon
            assert got["steps"] == single.steps
            assert got["private_steps"] == single.private_steps
            assert got["run_dir"] == str(run_dir)
        assert metrics[0]["accuracy"] == metrics[1]["accuracy"]  # one model, evaluated twice
        # The replicas stayed identical, and rank 0 saved that model.
        models = [torch.load(spawned / f"model-{name}-{r}.pt") for r in range(WORLD)]
        saved = _checkpoint(run_dir)["model"]
        assert models[0].keys() == models[1].keys() == saved.keys()
        for key, value in saved.items():
            assert torch.equal(models[0][key], value), key
            assert torch.equal(models[1][key], value), key
        # rank 0 alone wrote: exactly the three files, no stray temporaries
        assert sorted(p.name for p in run_dir.iterdir()) == [
            "checkpoint.pt",
            "config.json",
            "metrics.json",
        ]
        _assert_same_accounting(run_dir, tmp_path / f"single-{name}")
    # The warm-up run took public steps, then private ones; only the latter are charged.
    warmup = json.loads((spawned / "ddp-warmup" / "metrics.json").read_text())
    assert 0 < warmup["private_steps"] < warmup["steps"]
    assert _checkpoint(spawned / "ddp-warmup")["optimizer"]["steps"] == warmup["private_steps"]


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun not installed",
)
def test_torchrun_two_processes_matches_one_process(tmp_path: Path) -> None:
    from maskdp.trainer.config import build_config
    from maskdp.trainer.run import train

    train(build_config(**TINY), tmp_path / "single")
    torchrun = Path(sys.executable).with_name("torchrun")
    options = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            str(torchrun) if torchrun.exists() else "torchrun",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "-m",
            "maskdp.cli.app",
            "train",
            "--run-dir",
            str(tmp_path / "ddp"),
            "--json",
            "--no-progress",
            *options,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    reports = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1  # rank 0 alone prints the metrics
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        "checkpoint.pt",
        "config.json",
        "metrics.json",
    ]
    _assert_same_accounting(tmp_path / "ddp", tmp_path / "single")
