"""Measure which engine computes MaskDP gradients for which video model: docs/models.md's table.

For each model (MaskDP's own, torchvision's, Hugging Face's and pytorchvideo's video
classifiers, and three hand-written transformers, randomly initialised), at the smallest
input of a short list that the model accepts, the script

1. runs :func:`maskdp.models.prepare` (BatchNorm -> GroupNorm, in-place activations off)
   and puts the model in eval mode (dropout and stochastic depth would make every call,
   and so every engine, compute a different random function);
2. calls :func:`maskdp.mechanism.gradient.masked_gradient` on a batch of two clips with a central
   sensitive box (the same clips serve as the public batch), once per engine: the engine either computes the gradient (``ok``, timed,
   and compared with the ``reference`` engine's per-sample loop) or refuses the model with
   :class:`~maskdp.errors.UnsupportedModelError` (its one-line reason is recorded);
3. records which engine ``engine="auto"`` ends on after the first batch, and the time of the
   non-private floor (three plain forward and backward passes: full clips, public view,
   public batch) to compare it with.

Models listed in ``CHECK_ONLY`` are too slow for one CPU thread at the only input they
accept (``s3d`` and ``mvit_v2_s``: 16 x 224 x 224): only each engine's ``check_support``
is run (``--full`` runs them too).

Usage::

    python docs/support_table.py            # print the table
    python docs/support_table.py --write    # also replace the table in docs/models.md

Times depend on the machine and its load: they are indicative, the ok/refused pattern is
the result.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

MODELS_MD = Path(__file__).resolve().parent / "models.md"
ROOT = MODELS_MD.parent.parent
if str(ROOT) not in sys.path:  # measure this checkout, whatever is installed
    sys.path.insert(0, str(ROOT))
START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"
BATCH = 2
NUM_CLASSES = 10
REPS = 3
CANDIDATE_INPUTS = ((4, 16, 16), (8, 32, 32), (8, 64, 64), (16, 112, 112), (16, 224, 224))
FLOAT64_RECHECK = 1e-4  # an ok engine further than this from the reference is rechecked
CHECK_ONLY = ("s3d", "mvit_v2_s")


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision.models import video

        return getattr(video, name)(weights=None, num_classes=NUM_CLASSES)

    return build


def _maskdp(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from maskdp import models

        return getattr(models, name)(num_classes=NUM_CLASSES)

    return build


def _huggingface(name: str) -> Callable[[], nn.Module]:
    """A small random-init Hugging Face classifier (2 layers, width 64) for 8 x 32 x 32 clips."""

    def build() -> nn.Module:
        import transformers

        from maskdp.models import from_huggingface

        small = dict(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_labels=NUM_CLASSES
        )
        mlp = dict(intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        configs = {
            "VideoMAE": lambda: transformers.VideoMAEConfig(
                image_size=32, patch_size=8, num_frames=8, tubelet_size=2, **small, **mlp
            ),
            "Vivit": lambda: transformers.VivitConfig(
                image_size=32, tubelet_size=[2, 8, 8], num_frames=8, **small, **mlp
            ),
            "Timesformer": lambda: transformers.TimesformerConfig(
                image_size=32, patch_size=8, num_frames=8, **small, **mlp
            ),
            "VJEPA2": lambda: transformers.VJEPA2Config(
                patch_size=8,
                crop_size=32,
                frames_per_clip=8,
                tubelet_size=2,
                mlp_ratio=2.0,
                num_pooler_layers=1,
                pred_hidden_size=64,
                pred_num_attention_heads=4,
                pred_num_hidden_layers=1,
                **small,
            ),  # fmt: skip
        }
        model_class = getattr(transformers, f"{name}ForVideoClassification")
        return from_huggingface(model_class(configs[name]()))

    return build


def _pytorchvideo(name: str) -> Callable[[], nn.Module]:
    """pytorchvideo's X3D (its default softmax head and Swish) or SlowFast-R18 (alpha 4),
    random init, for 8 x 32 x 32 clips, through :func:`maskdp.models.from_pytorchvideo`."""

    def build() -> nn.Module:
        from maskdp.models import from_pytorchvideo

        if name == "x3d":
            from pytorchvideo.models.x3d import create_x3d

            model = create_x3d(input_clip_length=8, input_crop_size=32, model_num_class=NUM_CLASSES)
            return from_pytorchvideo(model)
        from pytorchvideo.models.slowfast import create_slowfast

        model = create_slowfast(
            model_num_class=NUM_CLASSES,
            model_depth=18,
            head_pool_kernel_sizes=((2, 1, 1), (8, 1, 1)),
        )
        return from_pytorchvideo(model, alpha=4)

    return build


class _Tokens(nn.Module):
    """Tubelet tokens (8 x 8 x 2) of width 64 with a learnt positional table added."""

    def __init__(self, tokens: int = 64, dim: int = 64) -> None:
        super().__init__()
        self.embed = nn.Conv3d(3, dim, (2, 8, 8), stride=(2, 8, 8))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x).flatten(2).transpose(1, 2) + self.pos


class EncoderClassifier(nn.Module):
    """Conv3d tubelets + nn.TransformerEncoder (2 layers) + mean pooling."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.tokens = _Tokens()
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.tokens(x)).mean(1))


class AttentionClassifier(nn.Module):
    """nn.MultiheadAttention called directly (sequence first, its default), one block."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.tokens = _Tokens()
        self.attn = nn.MultiheadAttention(64, 4)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        s = t.transpose(0, 1)  # the attention alone runs sequence first
        t = t + self.attn(s, s, s, need_weights=False)[0].transpose(0, 1)
        return self.head(self.norm(t).mean(1))


class RootTokenClassifier(nn.Module):
    """A raw cls token concatenated in the model's own forward (the root)."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.tokens = _Tokens()
        self.cls = nn.Parameter(torch.zeros(1, 1, 64))
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1)
        return self.head(self.encoder(t)[:, 0])


EIGHT = ((8, 32, 32),)  # the transformers above are built for 8 x 32 x 32 clips

MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[tuple[int, int, int], ...]]] = {
    # VideoViT's positional embedding fixes its input at frames=8, image_size=32 (defaults).
    "VideoViT": (_maskdp("VideoViT"), ((8, 32, 32),)),
    "SmallVideoCNN": (_maskdp("SmallVideoCNN"), CANDIDATE_INPUTS),
    "r3d_18": (_torchvision("r3d_18"), CANDIDATE_INPUTS),
    "mc3_18": (_torchvision("mc3_18"), CANDIDATE_INPUTS),
    "r2plus1d_18": (_torchvision("r2plus1d_18"), CANDIDATE_INPUTS),
    # s3d (final AvgPool3d(2, 7, 7)) and mvit_v2_s (fixed positional grid) need 16 x 224 x 224.
    "s3d": (_torchvision("s3d"), ((16, 224, 224),)),
    "swin3d_t": (_torchvision("swin3d_t"), CANDIDATE_INPUTS),
    "mvit_v2_s": (_torchvision("mvit_v2_s"), ((16, 224, 224),)),
    "VideoMAE (HF)": (_huggingface("VideoMAE"), EIGHT),
    "ViViT (HF)": (_huggingface("Vivit"), EIGHT),
    "TimeSformer (HF)": (_huggingface("Timesformer"), EIGHT),
    "V-JEPA 2 (HF)": (_huggingface("VJEPA2"), EIGHT),
    "X3D (pytorchvideo)": (_pytorchvideo("x3d"), EIGHT),
    "SlowFast-R18 (pytorchvideo)": (_pytorchvideo("slowfast"), EIGHT),
    "Conv3d + nn.TransformerEncoder": (EncoderClassifier, EIGHT),
    "nn.MultiheadAttention": (AttentionClassifier, EIGHT),
    "raw cls token in the root": (RootTokenClassifier, EIGHT),
}


@dataclass
class Cell:
    """One engine on one model: ``ok`` (time, error vs reference), ``refused`` or ``failed``."""

    status: str
    seconds: float | None = None
    error: float | None = None
    reason: str = ""

    def text(self) -> str:
        if self.status == "ok":
            shown = f"ok, {_ms(self.seconds)}" if self.seconds is not None else "ok"
            return shown
        if self.status == "supported":
            return "supported (not run)"
        return self.status


@dataclass
class Row:
    model: str
    shape: tuple[int, ...] | None
    parameters: int
    changes: int
    auto: str
    cells: dict[str, Cell] = field(default_factory=dict)
    note: str = ""
    floor: float | None = None  # seconds of three plain forward and backward passes


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.0f} ms" if seconds < 10 else f"{seconds:.0f} s"


def _one_line(error: BaseException, limit: int = 400) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def smallest_input(model: nn.Module, candidates: tuple[tuple[int, int, int], ...]):
    """The first (T, H, W) of ``candidates`` on which a forward pass of 1 clip succeeds."""
    for shape in candidates:
        try:
            with torch.no_grad():
                model(torch.rand(1, 3, *shape))
            return shape
        except Exception:  # noqa: BLE001 - too small for this architecture: try the next
            continue
    return None


def batch(shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two clips with a sensitive box over the central half of every frame."""
    generator = torch.Generator().manual_seed(0)
    t, h, w = shape
    x = torch.rand(BATCH, 3, t, h, w, generator=generator)
    mask = torch.zeros(BATCH, t, h, w, dtype=torch.bool)
    mask[:, :, h // 4 : h - h // 4, w // 4 : w - w // 4] = True
    y = torch.arange(BATCH) % NUM_CLASSES
    return x, mask, y


def _relative_error(result, reference) -> float:
    worst = 0.0
    for part in ("public", "private"):
        got, want = getattr(result, part), getattr(reference, part)
        num = sum(float((got[k].double() - want[k].double()).norm() ** 2) for k in want) ** 0.5
        den = sum(float(want[k].double().norm() ** 2) for k in want) ** 0.5
        worst = max(worst, num / max(den, 1e-12))
    return worst


def measure(name: str, *, reps: int = REPS, full: bool = False) -> Row:
    from maskdp.engines.base import ENGINES, engine_names, resolve_engine
    from maskdp.errors import UnsupportedModelError
    from maskdp.mechanism.gradient import masked_gradient
    from maskdp.models import prepare

    build, candidates = MODELS[name]
    torch.manual_seed(0)
    try:
        built = build()
    except ImportError as err:
        row = Row(name, None, 0, 0, "-")
        row.note = f"not measured: {err} (pip install 'maskdp[test]')"
        return row
    model, changes = prepare(built)
    changes = [*getattr(built, "changes", ()), *changes]  # an adapter's own changes count too
    model.eval()  # dropout and stochastic depth off: every engine must see the same function
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    try:
        auto = resolve_engine("auto", model).name
    except UnsupportedModelError:
        auto = "none"
    engines = [e for e in engine_names() if e != "auto"]
    check_only = name in CHECK_ONLY and not full
    shape = candidates[0] if check_only else smallest_input(model, candidates)
    row = Row(name, shape, parameters, len(changes), auto)
    if shape is None:
        row.note = "no candidate input accepted"
        return row
    if check_only:
        row.note = "check_support only (too slow for one CPU thread at this size)"
        for engine in engines:
            try:
                ENGINES[engine].check_support(model)
                row.cells[engine] = Cell("supported")
            except UnsupportedModelError as err:
                row.cells[engine] = Cell("refused", reason=_one_line(err))
        return row

    x, mask, y = batch(shape)
    loss = nn.CrossEntropyLoss()

    def run(engine: str):
        return masked_gradient(
            model, loss, x, mask, y, max_grad_norm=1.0, public=(x, mask, y), engine=engine
        )

    reference = None
    for engine in ["reference", *[e for e in engines if e != "reference"]]:
        try:
            result = run(engine)  # warm-up, and the numbers checked against the reference
            times = _step_times(engine, model, loss, x, mask, y, reps)
        except UnsupportedModelError as err:
            row.cells[engine] = Cell("refused", reason=_one_line(err))
            continue
        except Exception as err:  # noqa: BLE001 - a bug to report, not a refusal
            row.cells[engine] = Cell("failed", reason=f"{type(err).__name__}: {_one_line(err)}")
            continue
        if reference is None and engine == "reference":
            reference = result
        error = _relative_error(result, reference) if reference is not None else None
        row.cells[engine] = Cell("ok", statistics.median(times), error)
        if error is not None and error > FLOAT64_RECHECK:
            row.cells[engine].reason = _float64_recheck(model, loss, x, mask, y, engine, error)
    row.auto = _auto_choice(model, loss, x, mask, y)
    row.floor = _floor(model, loss, x, reps)
    return row


def _step_times(engine: str, model: nn.Module, loss: nn.Module, x, mask, y, reps: int) -> list:
    """Seconds of ``reps`` steps of one built engine: the view, the private batch's clipped
    sum and the public batch's gradient (what ``masked_gradient`` does after set-up)."""
    from maskdp.engines.base import build_engine
    from maskdp.mechanism.gradient import make_batch, public_gradient
    from maskdp.mechanism.views import FillView

    view, impl = FillView(0.0), build_engine(engine, model, loss)
    times = []
    try:
        for _ in range(reps):
            start = time.perf_counter()
            impl.compute(make_batch(view, x, mask, y), max_grad_norm=1.0)
            public_gradient(model, impl.loss_fn, view, (x, mask, y))
            times.append(time.perf_counter() - start)
    finally:
        impl.close()
    return times


def _auto_choice(model: nn.Module, loss: nn.Module, x, mask, y) -> str:
    """The engine ``engine="auto"`` ends on once it has computed a first batch."""
    from maskdp.engines.base import build_engine
    from maskdp.errors import UnsupportedModelError
    from maskdp.mechanism.gradient import make_batch
    from maskdp.mechanism.views import FillView

    try:
        engine = build_engine("auto", model, loss)
        try:
            engine.compute(make_batch(FillView(0.0), x, mask, y), max_grad_norm=1.0)
        finally:
            engine.close()
    except UnsupportedModelError:
        return "none"
    return engine.name


def _floor(model: nn.Module, loss: nn.Module, x, reps: int) -> float:
    """Median seconds of the non-private floor: three plain forward and backward passes of
    the batch (full clips, public view, public batch), as one MaskDP step has."""
    y = torch.arange(len(x)) % NUM_CLASSES
    params = [p for p in model.parameters() if p.requires_grad]

    def plain() -> None:
        for _ in range(3):
            torch.autograd.grad(loss(model(x), y), params, allow_unused=True)

    plain()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        plain()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _float64_recheck(model, loss, x, mask, y, engine: str, error: float) -> str:
    """Tell float32 rounding from a wrong gradient: redo ``engine`` and the reference in
    float64 (on a copy of the model)."""
    import copy

    from maskdp.mechanism.gradient import masked_gradient

    double = copy.deepcopy(model).double()
    results = [
        masked_gradient(
            double,
            loss,
            x.double(),
            mask,
            y,
            max_grad_norm=1.0,
            public=(x.double(), mask, y),
            engine=name,
        )
        for name in (engine, "reference")
    ]
    error64 = _relative_error(*results)
    verdict = "float32 rounding" if error64 < 1e-9 else "a real disagreement: a bug to report"
    return (
        f"relative difference from the reference {error:.0e} in float32, {error64:.0e} in "
        f"float64 ({verdict})"
    )


def render(rows: list[Row], *, reps: int) -> str:
    import opacus
    import torchvision

    engines = sorted({e for row in rows for e in row.cells}, key=lambda e: (e == "reference", e))
    today = datetime.date.today().isoformat()
    lines = [
        f"Measured by `python docs/support_table.py --write` on {today}: torch "
        f"{torch.__version__}, torchvision {torchvision.__version__}, opacus "
        f"{opacus.__version__}, Python {platform.python_version()}, CPU, "
        f"{torch.get_num_threads()} thread. Each model is randomly initialised, passed "
        "through `maskdp.models.prepare` and put in eval mode (no dropout or stochastic "
        f"depth, so that every engine computes the same function); a batch of {BATCH} clips (3 channels) with a "
        "sensitive box over the central half of every frame, `FillView(0.0)`, clipping norm 1. "
        f"Time: median of {reps} steps of a built engine (the view, the private batch's "
        "clipped sum, the public batch's gradient; set-up excluded) on a "
        "shared CPU: compare within a row, not across machines; the non-private floor is "
        "three plain forward and backward passes of the same batch (what one step computes "
        "without privacy), and `auto` / floor is the chosen engine's time over it. `auto` "
        "ends on the engine that computed a probe of the first batch (docs/models.md, "
        "above). Hugging Face models: 2 layers of width 64 through `from_huggingface`; "
        "pytorchvideo models through `from_pytorchvideo` (its changes are counted with "
        "`prepare`'s). "
        "Every `ok` engine matches "
        "the `reference` per-sample loop (largest relative difference of the public and "
        "private sums in the last column; above 1e-4 the engine is rerun in float64 to tell "
        "rounding from a wrong gradient, see the notes).",
        "",
        "| model | input T x H x W | parameters | `prepare` changes | `auto` ends on | "
        + " | ".join(engines)
        + " | non-private floor | `auto` / floor | max rel. diff vs reference |",
        "|---|---|---:|---:|---|" + "---|" * len(engines) + "---:|---:|---:|",
    ]
    notes = []
    for row in rows:
        shape = " x ".join(map(str, row.shape)) if row.shape else "-"
        errors = [c.error for e, c in row.cells.items() if c.error is not None and e != "reference"]
        worst = f"{max(errors):.0e}" if errors else "-"
        cells = []
        for engine in engines:
            cell = row.cells.get(engine)
            cells.append(cell.text() if cell else "-")
            if cell and cell.reason:
                status = "" if cell.status == "ok" else f" {cell.status}"
                notes.append(f"- `{row.model}` / `{engine}`{status}: {cell.reason}")
        if row.note:
            notes.append(f"- `{row.model}`: {row.note}.")
        chosen = row.cells.get(row.auto)
        ratio = "-"
        if row.floor and chosen is not None and chosen.seconds is not None:
            ratio = f"{chosen.seconds / row.floor:.2f}x"
        lines.append(
            f"| `{row.model}` | {shape} | {row.parameters / 1e6:.2f}M | {row.changes} | "
            f"`{row.auto}` | " + " | ".join(cells) + f" | {_ms(row.floor)} | {ratio} | {worst} |"
        )
    if notes:
        lines += [
            "",
            "Refusals, failures and notes (one line each, as the library words them):",
            "",
        ]
        lines += notes
    return "\n".join(lines)


def write(table: str, path: Path = MODELS_MD) -> None:
    text = path.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{path} lacks the markers {START} and {END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{table}\n{END}{tail}", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="replace the table in docs/models.md")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--reps", type=int, default=REPS, help="timed calls per engine")
    parser.add_argument(
        "--full", action="store_true", help="also run the CHECK_ONLY models (very slow on CPU)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        start = time.perf_counter()
        rows.append(measure(name, reps=args.reps, full=args.full))
        cells = ", ".join(f"{e}: {c.text()}" for e, c in rows[-1].cells.items())
        print(f"{name} ({time.perf_counter() - start:.0f} s): {cells}", flush=True)
    table = render(rows, reps=args.reps)
    print(table)
    if args.write:
        write(table)
        print(f"wrote {MODELS_MD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
