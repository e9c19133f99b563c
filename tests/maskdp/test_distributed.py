"""Distributed data parallel MaskDP-SGD equals the single-process step (2 gloo ranks on CPU).

- For every engine, 2 ranks (each its shard ``i % 2 == rank`` of the global Poisson batch,
  the model wrapped in DistributedDataParallel) take the same parameters, gradients and
  ledgers as one process on the global batch with the same noise seed (1e-6): the noise is
  added exactly once at scale sigma C, the division is by the global expected batch size,
  and each logical step is accounted once. Steps with an empty local batch and an empty
  global batch are included.
- DDP's own reducer is untouched: a plain DDP forward/backward still works afterwards.
- ``maskdp.train.train`` under a torchrun-like environment (RANK, WORLD_SIZE, MASTER_*):
  2 ranks give the metrics, ledger and parameters of a single-process run, and only rank 0
  writes the run directory. ``torchrun --nproc_per_node 2`` itself runs in the slow tier.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from maskdp.distributed import DistributedContext, env_world, shard_indices, sum_gradients
from maskdp.errors import InvalidInputError
from maskdp.models import VideoViT
from maskdp.optimizer import MaskDPOptimizer
from maskdp.views import FillView

ENGINES = ("reference", "ghost")  # the oracle and the default; vmap and hooks: slow tier
WORLD = 2
# The global Poisson batches of three steps: mixed, only even indices (rank 1 empty), none.
STEPS = ([0, 1, 2, 3, 4, 5, 6], [2, 4, 8], [])
DATASET_SIZE = 12
TINY = dict(
    train_size=32,
    test_size=16,
    epochs=1.0,
    batch_size=8,
    frames=4,
    image_size=16,
    public_epochs=0.0,
    noise_multiplier=1.0,
    view="fill",
    lr=2e-3,
)
# Public warm-up steps (gradients summed over ranks by sum_gradients) then one private step.
# Without noise, AdamW turns rounding-level gradients (e.g. the attention key bias, whose
# exact gradient is 0) into updates of +-lr whatever their size, so a few such entries may
# differ by about lr; a missing or doubled reduction moves most entries by about lr. This
# run allows 1% of the entries to differ by more than lr / 8.
WARMUP = {**TINY, "public_epochs": 1.0, "epochs": 0.25}
RUNS = {"private": (TINY, 1e-5, 0.0), "warmup": (WARMUP, 2e-3 / 8, 0.01)}
# view="fill": RandomFillView draws its fill per call from one generator, so a rank's shard
# gets other (equally data-independent) fill values than in the global batch; private, but
# not bit-comparable with one process.


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dataset() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(DATASET_SIZE, 3, 4, 16, 16, generator=gen)
    m = torch.rand(DATASET_SIZE, 4, 16, 16, generator=gen) < 0.4
    y = torch.randint(0, 3, (DATASET_SIZE,), generator=gen)
    return x, m, y


def run_steps(engine: str, *, rank: int = 0, world: int | None = None) -> dict:
    """Three MaskDP steps on this rank's shards (everything when ``world`` is None)."""
    torch.manual_seed(0 if world is None else 100 + rank)  # DDP must broadcast rank 0's init
    model = VideoViT(num_classes=3, frames=4, image_size=16, dim=16, depth=1, heads=2)
    if world is not None and rank == 0:
        torch.manual_seed(0)
        model.load_state_dict(
            VideoViT(num_classes=3, frames=4, image_size=16, dim=16, depth=1, heads=2).state_dict()
        )
    wrapped = nn.parallel.DistributedDataParallel(model) if world is not None else model
    optimizer = MaskDPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5),
        model=wrapped,
        loss_fn=nn.CrossEntropyLoss(),
        noise_multiplier=0.8,
        max_grad_norm=0.05,  # small: most records are clipped
        expected_batch_size=3,  # the GLOBAL expected batch size
        sample_rate=0.25,
        view=FillView(0.0),
        engine=engine,
        noise_generator=torch.Generator().manual_seed(7),  # same seed on every rank
    )
    x, m, y = dataset()
    for indices in STEPS:
        idx = torch.tensor(indices, dtype=torch.long)
        if world is not None:
            idx = shard_indices(idx, rank=rank, world_size=world)
        optimizer.zero_grad()
        optimizer.backward(x[idx], m[idx], y[idx])
        optimizer.step()
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


def _worker(
    rank: int, world: int, ports: list[int], out: str, engines: tuple[str, ...], full: bool
) -> None:
    """One spawn for the whole module (starting processes costs more than the tests)."""
    torch.set_num_threads(1)
    if full:
        _train_runs(rank, world, ports[1:], out)  # maskdp.train joins and leaves its group
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{ports[0]}", rank=rank, world_size=world
    )
    try:
        results = {engine: run_steps(engine, rank=rank, world=world) for engine in engines}
        if full:
            results["gradients"] = _sum_gradients_case(rank, world)
            results["mismatch"] = _mismatch_case(rank)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(out: Path, engines: tuple[str, ...], full: bool) -> list[dict]:
    ports = [free_port() for _ in range(1 + len(RUNS))]
    mp.spawn(_worker, args=(WORLD, ports, str(out), engines, full), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _mismatch_case(rank: int) -> str | None:
    """Ranks passing different settings are refused on every rank (ledgers would differ)."""
    model = VideoViT(num_classes=3, frames=4, image_size=16, dim=16, depth=1, heads=2)
    try:
        MaskDPOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            model=nn.parallel.DistributedDataParallel(model),
            loss_fn=nn.CrossEntropyLoss(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=3 + rank,  # a rank-local batch size: wrong
            sample_rate=0.25,
            engine="reference",
        )
    except InvalidInputError as err:
        return str(err)
    return None


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


def test_noise_enters_once_not_per_rank(two_ranks) -> None:
    """If each rank added sigma C noise, the 2-rank update would differ from one process's
    by a fresh Gaussian; the single-process run with noise 0 shows the noise is there."""
    single = run_steps("ghost")
    got = two_ranks[0]["ghost"]["grads"]
    gap = max(float((got[n] - single["grads"][n]).abs().max()) for n in got)
    assert gap < 1e-6
    # and the noise is not negligible: it dominates the clipped mean (C = 0.05, B = 3)
    noise_std = 0.8 * 0.05 / 3
    spread = torch.cat([g.flatten() for g in got.values()]).std()
    assert spread > 0.5 * noise_std


def test_sum_gradients_over_ranks(two_ranks) -> None:
    for result in two_ranks:
        case = result["gradients"]
        assert case["total"] == 2 + 3
        assert case["empty"] == 0
        assert case["a"] is None and case["b"] is None  # cleared for the empty global batch


def test_settings_that_differ_between_ranks_are_refused(two_ranks) -> None:
    for result in two_ranks:
        assert result["mismatch"] is not None
        assert result["mismatch"].startswith("expected_batch_size differ between ranks")


def test_shard_indices_partition_a_poisson_sample() -> None:
    idx = torch.tensor([0, 3, 4, 7, 8, 10])
    parts = [shard_indices(idx, rank=r, world_size=3) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == idx.tolist()
    assert all(((p % 3) == r).all() for r, p in enumerate(parts))
    with pytest.raises(InvalidInputError, match="rank"):
        shard_indices(idx, rank=3, world_size=3)


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
    from maskdp.train import train
    from maskdp.train_config import build_config

    for (name, (options, *_)), port in zip(RUNS.items(), ports, strict=True):
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        metrics = train(build_config(**options), Path(out) / f"ddp-{name}")
        torch.save(metrics, Path(out) / f"metrics-{name}-{rank}.pt")
        assert not dist.is_initialized()  # train() destroys the group it created
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name)


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)


def _assert_same_run(got: Path, ref: Path, atol: float, outliers: float = 0.0) -> None:
    """Same step, ledger and metrics; parameters within ``atol`` except a fraction
    ``outliers`` of the entries."""
    a, b = _checkpoint(got), _checkpoint(ref)
    assert a["step"] == b["step"]
    assert a["optimizer"]["ledger"] == b["optimizer"]["ledger"]
    gaps = torch.cat([(a["model"][n] - v).abs().flatten() for n, v in b["model"].items()])
    assert (gaps > atol).float().mean() <= outliers, (float(gaps.max()), atol)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (got, ref))
    for key in ("epsilon", "delta", "steps", "private_steps", "noise_multiplier"):
        assert ma[key] == mb[key], key


def test_train_with_two_gloo_ranks_equals_one_process(spawned: Path, tmp_path: Path) -> None:
    from maskdp.train import train
    from maskdp.train_config import build_config

    for name, (options, atol, outliers) in RUNS.items():
        single = train(build_config(**options), tmp_path / f"single-{name}")
        run_dir = spawned / f"ddp-{name}"
        for rank in range(WORLD):
            got = torch.load(spawned / f"metrics-{name}-{rank}.pt")
            assert got["epsilon"] == single["epsilon"]
            assert got["steps"] == single["steps"]
            assert got["run_dir"] == str(run_dir)
        # rank 0 alone wrote: exactly the three files, no stray temporaries
        assert sorted(p.name for p in run_dir.iterdir()) == [
            "checkpoint.pt",
            "config.json",
            "metrics.json",
        ]
        _assert_same_run(run_dir, tmp_path / f"single-{name}", atol=atol, outliers=outliers)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun not installed",
)
def test_torchrun_two_processes_equals_one_process(tmp_path: Path) -> None:
    from maskdp.train import train
    from maskdp.train_config import build_config

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
            "maskdp.cli",
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
    _assert_same_run(tmp_path / "ddp", tmp_path / "single", atol=1e-5)
