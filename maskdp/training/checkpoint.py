"""One checkpoint file for a MaskDP training setup: model, optimizer (ledger, view), loader.

``save_checkpoint`` writes atomically (a reader sees the old file or the new one, never a
torn one); ``load_checkpoint`` reads with ``torch.load(weights_only=True)`` (no pickled code
runs) and checks everything against the live objects *before* changing any of them, so a
refused checkpoint leaves the model, optimizer and view as they were.

Nothing in the file replays the private randomness: secret noise and the Poisson sampler
have no state, and a resumed run draws fresh batches and noise (docs/privacy.md). The
loader is recorded by its sampling rates only, which must match on load: a checkpoint
resumed at another rate would account the wrong mechanism.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from maskdp.errors import InvalidInputError
from maskdp.io import atomic_torch_save
from maskdp.training.distributed import unwrap_ddp
from maskdp.training.optimizer import MaskDPOptimizer

FORMAT = "maskdp-checkpoint"
FORMAT_VERSION = 1


def _loader_record(loader: Any) -> dict[str, float | None] | None:
    if loader is None:
        return None
    rate = getattr(loader, "sample_rate", None)
    if not isinstance(rate, float):
        raise InvalidInputError(
            f"loader must be a MaskDPDataLoader or PoissonDataLoader, got {type(loader).__name__}"
        )
    return {"sample_rate": rate, "public_sample_rate": getattr(loader, "public_sample_rate", None)}


def _view_of(optimizer: Optimizer) -> Any:
    view = optimizer.view if isinstance(optimizer, MaskDPOptimizer) else None
    return view if hasattr(view, "state_dict") and hasattr(view, "load_state_dict") else None


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: Optimizer,
    loader: Any = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write ``model``, ``optimizer`` (a :class:`MaskDPOptimizer` keeps its ledger and step
    counts; its view's state too), the loader's rates and ``extra`` (plain values, e.g. the
    step of a training loop) to ``path`` atomically."""
    state: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": unwrap_ddp(model)[0].state_dict(),
        "optimizer": optimizer.state_dict(),
        "loader": _loader_record(loader),
        "extra": dict(extra or {}),
    }
    view = _view_of(optimizer)
    if view is not None:
        state["view"] = view.state_dict()
    atomic_torch_save(state, path)


def _read(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InvalidInputError(f"checkpoint {os.fspath(path)} does not exist") from None
    except Exception as err:  # a torn or foreign file: refuse, never guess
        raise InvalidInputError(f"checkpoint {os.fspath(path)} cannot be read: {err}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InvalidInputError(f"checkpoint {os.fspath(path)} is not a MaskDP checkpoint")
    if state.get("version") != FORMAT_VERSION:
        raise InvalidInputError(
            f"checkpoint version must be {FORMAT_VERSION}, got {state.get('version')!r}"
        )
    return state


def _check_model_state(model: nn.Module, saved: Any) -> None:
    """Same keys, shapes and dtypes as the live model (``load_state_dict`` would otherwise
    copy some tensors before raising on the others)."""
    live = model.state_dict()
    if not isinstance(saved, Mapping) or set(saved) != set(live):
        extra = sorted(set(saved) - set(live)) if isinstance(saved, Mapping) else []
        missing = sorted(set(live) - set(saved)) if isinstance(saved, Mapping) else sorted(live)
        raise InvalidInputError(
            f"checkpoint model does not match: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for key, tensor in live.items():
        other = saved[key]
        if not isinstance(other, torch.Tensor) or other.shape != tensor.shape:
            raise InvalidInputError(f"checkpoint model tensor {key!r} has the wrong shape")


def _check_loader(loader: Any, saved: Any) -> None:
    live = _loader_record(loader)
    if live is None or saved is None:
        return
    for name in ("sample_rate", "public_sample_rate"):
        a, b = live[name], saved.get(name)
        if (a is None) != (b is None) or (a is not None and not math.isclose(a, b, rel_tol=1e-12)):
            raise InvalidInputError(
                f"checkpoint was written with loader {name}={b}, the loader has {a}: "
                "resuming at another rate would account the wrong mechanism"
            )


def _load_optimizer(optimizer: Optimizer, saved: Mapping[str, Any]) -> None:
    """A MaskDPOptimizer validates its whole state before changing anything; torch's
    optimizers check group sizes first."""
    try:
        optimizer.load_state_dict(saved)  # type: ignore[arg-type]
    except (ValueError, KeyError, TypeError) as err:
        raise InvalidInputError(f"checkpoint optimizer state is invalid: {err}") from None


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: Optimizer,
    loader: Any = None,
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into the live objects; return ``extra``.

    Raises :class:`~maskdp.errors.InvalidInputError` (changing nothing) on a file that is not
    a MaskDP checkpoint, a model whose keys or shapes differ, an optimizer state of the other
    kind, or a loader whose sampling rates differ.
    """
    state = _read(path)
    module = unwrap_ddp(model)[0]
    _check_model_state(module, state.get("model"))
    _check_loader(loader, state.get("loader"))
    saved_optimizer = state.get("optimizer")
    if not isinstance(saved_optimizer, Mapping) or (
        isinstance(optimizer, MaskDPOptimizer) != (saved_optimizer.get("format") is not None)
    ):
        raise InvalidInputError("checkpoint optimizer state is of another kind of optimizer")
    view = _view_of(optimizer)
    if (view is None) != ("view" not in state):
        raise InvalidInputError("checkpoint view state does not match the optimizer's view")
    view_before = None if view is None else view.state_dict()
    try:
        if view is not None:
            view.load_state_dict(state["view"])
        _load_optimizer(optimizer, saved_optimizer)
    except Exception as err:
        if view is not None:
            view.load_state_dict(view_before)
        if isinstance(err, InvalidInputError):
            raise
        raise InvalidInputError(f"checkpoint optimizer or view state is invalid: {err}") from None
    module.load_state_dict(state["model"])
    extra = state.get("extra")
    return dict(extra) if isinstance(extra, Mapping) else {}
