"""Training-step benchmark: MaskDP's engines side by side with non-private training and Opacus.

One run, one model, one batch, one thread. Configurations:

(a) ``non-private``: a plain step on the full view (forward, backward, AdamW step);
(b) ``two-pass floor``: a plain step on the full and the public view stacked (2B clips in
    one forward/backward, one AdamW step): the two passes of the private batch;
(b2) ``three-pass floor``: the same with the public view of an independent public batch
    of B more clips (3B clips): the three passes of DESIGN.md section 3;
(c) ``Opacus hooks``: Opacus DP-SGD (``PrivacyEngine.make_private``,
    ``grad_sample_mode="hooks"``) on a copy of the model;
(d) ``Opacus ghost``: Opacus ghost clipping (``grad_sample_mode="ghost"``);
(e) ``MaskDP <engine>``: ``MaskDPOptimizer`` with each registered engine except the
    reference loop (FillView(0.0) by default, ``--view drop`` for the token-drop view), with
    an independent public batch of B clips;
(f) the same step with an empty public batch: the cost of MaskDP 0.1's same-batch step
    (its public sum came free out of the private batch's two passes; that mechanism is not
    private and no longer exists, so this is its cost, not its code).

Step times: after warm-up rounds, the configurations run round-robin (one step each per
round) and each reports the median over rounds, so slow drifts of a shared machine hit
all of them alike. Peak memory: each configuration runs again alone in a fresh subprocess;
after its setup (model, optimizer, batch, hooks) the peak-RSS counter is reset (``5`` into
``/proc/self/clear_refs``) and we report ``VmHWM`` after a few steps minus the RSS at the
reset: the extra memory a training step needs (activations, per-sample quantities,
optimizer state), not the model or the interpreter. On CUDA: ``max_memory_allocated``
after ``reset_peak_memory_stats`` minus the allocated memory after setup.

Usage::

    python benchmarks/training_step.py                                # ViT, batch 16, CPU
    python benchmarks/training_step.py --model cnn --reps 10
    python benchmarks/training_step.py --write benchmarks/RESULTS.md  # replace its section
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import _common

_common.setup()  # before torch: one thread; the repository's packages first

import torch  # noqa: E402
from results_file import replace_section  # noqa: E402
from torch import Tensor, nn  # noqa: E402

SECTION = "## Training step"
DATASET_SIZE = 10_000  # only sets the sample rate B / N of the MaskDP optimizer
Step = Callable[[], None]


# ------------------------------------------------------------------------------ problem


@dataclass
class Problem:
    model: nn.Module
    inputs: Tensor
    mask: Tensor
    targets: Tensor
    public: Tensor
    view: object
    description: str


def build_problem(args: argparse.Namespace, model_name: str) -> Problem:
    from maskdp.mechanism.views import DropView, FillView
    from maskdp.models import SmallVideoCNN, VideoViT

    torch.manual_seed(0)
    if model_name == "vit":
        model = VideoViT(
            num_classes=10,
            frames=8,
            image_size=32,
            tubelet_size=(2, 8, 8),
            dim=64,
            depth=2,
            heads=4,
        )
        desc = "VideoViT(num_classes=10, frames=8, image_size=32, tubelet (2,8,8), dim=64, depth=2, heads=4)"
    else:
        model = SmallVideoCNN(num_classes=10)
        desc = "SmallVideoCNN(num_classes=10, width=16, groups=4)"
    device = torch.device(args.device)
    model = model.to(device)
    n = args.batch_size
    gen = torch.Generator().manual_seed(1)
    inputs = torch.rand(n, 3, 8, 32, 32, generator=gen)
    # One box per clip (all frames), 8 to 16 pixels wide: about 15% of the pixels.
    mask = torch.zeros(n, 8, 32, 32, dtype=torch.bool)
    for i in range(n):
        h, w = (int(v) for v in torch.randint(8, 17, (2,), generator=gen))
        top, left = (int(torch.randint(0, 32 - s + 1, (1,), generator=gen)) for s in (h, w))
        mask[i, :, top : top + h, left : left + w] = True
    targets = torch.randint(0, 10, (n,), generator=gen)
    inputs, mask, targets = inputs.to(device), mask.to(device), targets.to(device)
    view = DropView.for_model(model) if args.view == "drop" else FillView(0.0)
    public = FillView(0.0).public(inputs, mask).inputs
    params = sum(p.numel() for p in model.parameters())
    desc += f", {params / 1e6:.2f}M parameters"
    return Problem(model, inputs, mask, targets, public, view, desc)


# ------------------------------------------------------------------------ configurations


def _plain(problem: Problem, *, passes: int) -> Step:
    model = copy.deepcopy(problem.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    x, y = problem.inputs, problem.targets
    x = torch.cat([problem.inputs, problem.public, problem.public][:passes])
    y = torch.cat([y] * passes)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def _opacus(problem: Problem, mode: str) -> Step:
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    model = copy.deepcopy(problem.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = problem.inputs, problem.targets
    loader = DataLoader(TensorDataset(x.cpu(), y.cpu()), batch_size=len(x))
    engine = PrivacyEngine()
    loss_fn = nn.CrossEntropyLoss()
    # Ghost clipping wraps the loss too (and returns it): it takes the criterion.
    criterion = {"criterion": loss_fn} if mode == "ghost" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = engine.make_private(
            module=model,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            grad_sample_mode=mode,
            **criterion,
        )
    if mode == "ghost":
        model, opt, loss_fn, _ = made
    else:
        model, opt, _ = made

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def _maskdp(problem: Problem, engine: str, *, public_batch: bool = True) -> Step:
    from maskdp.training.optimizer import MaskDPOptimizer

    model = copy.deepcopy(problem.model)
    n = len(problem.inputs)
    opt = MaskDPOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=n,
        sample_rate=n / DATASET_SIZE,
        view=problem.view,
        engine=engine,
    )
    # The independent public batch: B other clips (here copies of the same clips, which
    # cost exactly what B other clips would). Without it (an empty public batch) the step
    # costs what MaskDP 0.1's same-batch step cost, whose public sum came out of the
    # private batch's own passes.
    public = tuple(t.clone() for t in (problem.inputs, problem.mask, problem.targets))
    if not public_batch:
        public = tuple(t[:0] for t in public)

    def step() -> None:
        opt.backward(problem.inputs, problem.mask, problem.targets, public=public)
        opt.step()

    return step


def configurations() -> dict[str, tuple[str, Callable[[Problem], Step]]]:
    """key -> (label, setup). The order is the table's."""
    from maskdp.engines.base import ENGINES, engine_names

    configs: dict[str, tuple[str, Callable[[Problem], Step]]] = {
        "plain": ("(a) non-private, full view", lambda p: _plain(p, passes=1)),
        "floor": ("(b) two-pass floor, full + public view", lambda p: _plain(p, passes=2)),
        "floor3": (
            "(b2) three-pass floor, + public view of the public batch",
            lambda p: _plain(p, passes=3),
        ),
        "opacus-hooks": ("(c) Opacus DP-SGD, hooks", lambda p: _opacus(p, "hooks")),
        "opacus-ghost": ("(d) Opacus DP-SGD, ghost clipping", lambda p: _opacus(p, "ghost")),
    }
    names = [n for n in engine_names() if n not in ("auto", "reference")]
    for name in sorted(names, key=lambda n: ENGINES[n].priority):
        configs[f"maskdp-{name}"] = (f"(e) MaskDP, {name} engine", lambda p, n=name: _maskdp(p, n))
        configs[f"maskdp-{name}-same-batch"] = (
            f"(f) MaskDP 0.1 same-batch step (no public batch), {name} engine",
            lambda p, n=name: _maskdp(p, n, public_batch=False),
        )
    return configs


def register_positional_embedding() -> None:
    """Give Opacus a grad sampler for maskdp's PositionalEmbedding (it has none)."""
    from maskdp.engines.hooks import _opacus

    _opacus()


def stock_opacus_note(problem: Problem) -> str:
    """What stock Opacus makes of the model, before maskdp registers anything in it."""
    from opacus import GradSampleModule

    try:
        gsm = GradSampleModule(copy.deepcopy(problem.model))
    except Exception as err:  # noqa: BLE001 - the text is the result
        return f"Stock Opacus refuses this model: `{_error(err)}`."
    missing = sorted(
        {
            type(m).__name__
            for m in gsm._module.modules()
            if any(p.requires_grad for p in m.parameters(recurse=False))
            and type(m) not in gsm.GRAD_SAMPLERS
        }
    )
    gsm._close()
    if not missing:
        return "Stock Opacus has a grad sampler for every layer of this model."
    return (
        f"Stock Opacus has no grad sampler for {', '.join(missing)} (it would fall back to "
        "functorch there); rows (c) and (d) use the PositionalEmbedding sampler that maskdp's "
        "hooks engine registers in Opacus's global registry, in the timing run and in the "
        "memory subprocesses alike."
    )


# ------------------------------------------------------------------------------ measures


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:300]


def time_steps(
    steps: dict[str, Step], *, reps: int, warmup: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Round-robin repetitions; a configuration failing at a step is dropped with its error."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    errors: dict[str, str] = {}
    for rnd in range(warmup + reps):
        for key, step in steps.items():
            if key in errors:
                continue
            try:
                _sync(device)
                start = time.perf_counter()
                step()
                _sync(device)
            except Exception as err:  # noqa: BLE001
                errors[key] = _error(err)
                continue
            if rnd >= warmup:
                times[key].append(time.perf_counter() - start)
    return times, errors


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure_memory(problem: Problem, setup: Callable[[Problem], Step], steps: int) -> dict:
    """Peak extra memory of ``steps`` training steps after setup (this process only)."""
    device = problem.inputs.device
    step = setup(problem)
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            step()
        _sync(device)
        return {"bytes": torch.cuda.max_memory_allocated(device) - base, "method": "cuda"}
    base = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM"
    except OSError:
        method = "ru_maxrss"
    for _ in range(steps):
        step()
    peak = (
        _status_kib("VmHWM")
        if method == "VmHWM"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    )
    return {"bytes": max(peak - base, 0) * 1024, "method": method}


def memory_in_subprocess(key: str, args: argparse.Namespace, model_name: str) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child-memory",
        key,
        "--model",
        model_name,
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
        "--view",
        args.view,
        "--memory-steps",
        str(args.memory_steps),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:300]}
    return json.loads(lines[-1])


def child_memory(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    problem = build_problem(args, args.model[0])
    configs = configurations()
    register_positional_embedding()
    try:
        result = measure_memory(problem, configs[args.child_memory][1], args.memory_steps)
    except Exception as err:  # noqa: BLE001
        result = {"error": _error(err)}
    print(json.dumps(result))


# ------------------------------------------------------------------------------- report


@dataclass
class Row:
    key: str
    label: str
    ms: float | None = None
    memory: float | None = None
    note: str = ""
    times: list[float] = field(default_factory=list)


def table(rows: list[Row]) -> list[str]:
    base = rows[0]
    out = [
        "| configuration | step ms (median) | IQR ms | time / (a) | peak extra MiB | memory / (a) | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        t = "-" if r.ms is None else f"{r.ms:.1f}"
        iqr = "-"
        if len(r.times) >= 2:
            q1, _, q3 = statistics.quantiles(r.times, n=4)
            iqr = f"{1e3 * q1:.1f}-{1e3 * q3:.1f}"
        tr = "-" if r.ms is None or base.ms is None else f"{r.ms / base.ms:.2f}x"
        m = "-" if r.memory is None else f"{r.memory / 2**20:.1f}"
        mr = "-" if r.memory is None or not base.memory else f"{r.memory / base.memory:.2f}x"
        note = r.note.replace("|", "\\|")
        out.append(f"| {r.label} | {t} | {iqr} | {tr} | {m} | {mr} | {note} |")
    return out


def report(args: argparse.Namespace, results: list[tuple[Problem, list[Row], str]]) -> str:
    command = "python benchmarks/training_step.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    mem = "CUDA max_memory_allocated" if args.device == "cuda" else "VmHWM after clear_refs"
    lines = [
        SECTION,
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Machine: {platform.machine()}, {platform.python_implementation()} "
        f"{platform.python_version()}, torch {torch.__version__}, opacus {version('opacus')}, "
        f"device {args.device}, {args.threads} thread(s). The CPU was shared with other jobs: "
        "ratios measured side by side are the result, absolute times are indicative.",
        "",
        f"Batch: {args.batch_size} clips (3, 8, 32, 32), one sensitive box per clip; every "
        "private configuration: noise multiplier 1, clipping norm 1, AdamW. Step time: median "
        f"(and interquartile range) of {args.reps} round-robin rounds after {args.warmup} "
        "warm-up rounds, a step being zero_grad, forward, backward, clipping, noise and the "
        "optimizer step. Peak extra memory: a fresh subprocess per configuration, "
        f"{args.memory_steps} steps, {mem} minus the memory after setup (see the script's "
        "docstring).",
    ]
    for problem, rows, note in results:
        share = 100 * float(problem.mask.float().mean())
        lines += [
            "",
            f"### {problem.description}",
            "",
            f"Sensitive pixels: {share:.0f}%; view {problem.view!r}.",
            "",
            *table(rows),
            "",
            note,
        ]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------- main


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", choices=("vit", "cnn"), default=["vit"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=15, help="timed round-robin rounds")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--view", choices=("fill", "drop"), default="fill")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="*", help="configuration keys to run (default: all)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--write", type=Path, help="replace the '## Training step' section of this file")
    p.add_argument("--child-memory", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_model(args: argparse.Namespace, model_name: str) -> tuple[Problem, list[Row], str]:
    """Time every configuration round-robin, then measure each one's memory alone."""
    device = torch.device(args.device)
    problem = build_problem(args, model_name)
    configs = configurations()
    keys = [k for k in configs if not args.only or k in args.only]
    rows = {k: Row(k, configs[k][0]) for k in keys}
    note = stock_opacus_note(problem)
    register_positional_embedding()
    steps: dict[str, Step] = {}
    for key in keys:
        try:
            steps[key] = configs[key][1](problem)
        except Exception as err:  # noqa: BLE001
            rows[key].note = f"setup failed: {_error(err)}"
    times, errors = time_steps(steps, reps=args.reps, warmup=args.warmup, device=device)
    for key, ts in times.items():
        if key in errors:
            rows[key].note = f"step failed: {errors[key]}"
        elif ts:
            rows[key].ms = 1e3 * statistics.median(ts)
            rows[key].times = ts
    del steps
    gc.collect()
    if not args.no_memory:
        for key in keys:
            if rows[key].ms is None:
                continue
            result = memory_in_subprocess(key, args, model_name)
            if "error" in result:
                rows[key].note = f"{rows[key].note} memory run failed: {result['error']}".strip()
            else:
                rows[key].memory = result["bytes"]
    return problem, [rows[k] for k in keys], note


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    if args.child_memory:
        child_memory(args)
        return
    torch.set_num_threads(args.threads)
    results = [run_model(args, name) for name in args.model]
    text = report(args, results)
    print(text)
    if args.write:
        replace_section(args.write, SECTION, text)
        print(f"wrote the '{SECTION}' section of {args.write}")


if __name__ == "__main__":
    main()
