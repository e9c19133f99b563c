"""The validated configuration of ``maskdp train`` (pydantic; shared by the CLI and the API).

Kept free of torch so that ``maskdp train --help`` and config errors answer fast.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from maskdp.errors import InvalidInputError

Mode = Literal["maskdp", "dpsgd", "nonprivate"]
DEFAULT_TARGET_EPSILON = 1.0


class TrainConfig(BaseModel):
    """Everything that defines a training run; written to ``config.json`` in the run directory.

    ``mode``: ``maskdp`` (the sensitive region is private), ``dpsgd`` (the whole clip and
    its label are private: all-sensitive masks and ``protect_labels``), ``nonprivate``.
    Exactly one of ``target_epsilon`` and ``noise_multiplier`` sets the noise of a private run.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Mode = "maskdp"
    model: Literal["vit", "cnn"] = "vit"
    dataset: str = Field("synthetic", description="'synthetic' or the path of a ClipFolder")
    scenario: Literal["avatar", "person"] = "avatar"
    train_size: int = Field(1024, ge=1)
    test_size: int = Field(512, ge=1)
    frames: int = Field(8, ge=1)
    image_size: int = Field(32, ge=1)
    view: Literal["fill", "random", "inpaint", "drop"] = "fill"
    temporal_centering: bool = Field(
        True, description="vit: subtract each pixel's mean over frames (static-camera clips)"
    )
    engine: str = "auto"
    target_epsilon: float | None = Field(None, gt=0, description="default 1.0 for private runs")
    noise_multiplier: float | None = Field(None, ge=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "prv"] = "rdp"
    epochs: float = Field(2.0, gt=0, description="private epochs")
    public_epochs: float = Field(5.0, ge=0, description="warm-up epochs on public views only")
    batch_size: int = Field(64, ge=1, description="expected (Poisson) batch size")
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    private_weight: float = Field(
        1.0, ge=0, description="weight of the noisy private sum (post-processing, free)"
    )
    shrinkage: Literal["none", "james-stein"] = "none"
    device: str = "cpu"
    seed: int = Field(
        0,
        description="seeds public things only (synthetic data, initial weights, random fill); "
        "noise and sampling always draw secret OS entropy",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_target(cls, values: object) -> object:
        if (
            isinstance(values, dict)
            and values.get("mode", "maskdp") != "nonprivate"
            and values.get("target_epsilon") is None
            and values.get("noise_multiplier") is None
        ):
            return {**values, "target_epsilon": DEFAULT_TARGET_EPSILON}
        return values

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        for name in (
            "target_epsilon",
            "noise_multiplier",
            "delta",
            "epochs",
            "lr",
            "max_grad_norm",
            "public_epochs",
            "weight_decay",
            "private_weight",
        ):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        if self.mode != "nonprivate":
            if self.target_epsilon is not None and self.noise_multiplier is not None:
                raise ValueError("give either target_epsilon or noise_multiplier, not both")
        if self.batch_size > self.train_size and self.dataset == "synthetic":
            raise ValueError(f"batch_size {self.batch_size} exceeds train_size {self.train_size}")
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        return f"unknown option {where!r}"
    return f"{where}: {message}" if where else message


def build_config(**values: object) -> TrainConfig:
    """Validate ``values`` into a :class:`TrainConfig`; one-line :class:`InvalidInputError`."""
    try:
        return TrainConfig(**values)
    except ValidationError as err:
        raise InvalidInputError(f"invalid training config: {_first_error(err)}") from None


def load_config_file(path: str | Path) -> dict:
    """Options from a JSON config file (keys are TrainConfig fields)."""
    source = Path(path)
    try:
        data = json.loads(source.read_text())
    except FileNotFoundError:
        raise InvalidInputError(f"config file {source} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"config file {source} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise InvalidInputError(f"config file {source} must hold a JSON object")
    return data
