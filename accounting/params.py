"""Validated inputs of the accounting commands, shared by the CLI and the Python API.

Every rule on user input lives here, once. The CLI and :mod:`maskdp.accounting.api` build one of
the models below through :func:`parse`, which turns a pydantic ``ValidationError`` into an
:class:`~maskdp.accounting.errors.InvalidParameterError` with one line naming the parameter (in
Python or CLI spelling) and the rule it broke, e.g. ``--sample-rate must be a number in
(0, 1], got 1.5``.

Sampling takes two choices, each in one of two forms (giving both forms is an error):

- ``sample_rate`` (the Poisson sampling rate ``q``), or ``dataset_size`` ``N`` with
  ``batch_size`` ``B`` (the expected batch size), giving ``q = B / N``;
- ``steps``, or ``epochs`` ``E`` (may be fractional), giving ``steps = ceil(E / q)``.

Under Poisson sampling one epoch is ``1 / q`` steps in expectation; the step count is rounded
up so that the privacy cost of ``E`` epochs is never under-reported (Opacus counts
``E * len(data_loader) = E * floor(1 / q)`` steps, which can be fewer). The arithmetic is
exact (rational), so ``N = 60000, B = 600, E = 3`` gives exactly 300 steps and
``sample_rate = 0.001, E = 3`` exactly 3000.
"""

import math
from collections.abc import Mapping
from fractions import Fraction
from typing import Annotated, Any, Literal, TypeVar, get_args

from maskdp.accounting.choices import (
    ACCOUNTANTS,
    CONVERSIONS,
    RELATIONS,
    Accountant,
    Conversion,
    RelationName,
)
from maskdp.accounting.errors import InvalidParameterError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

DEFAULT_DELTA = 1e-5
"""Default target delta: the usual choice for datasets of up to ~10^5 records (delta < 1/N)."""

AccountantChoice = Literal[Accountant, Literal["all"]]
"""An accountant, or ``"all"`` for every one of them (resolved by ``_Choice.accountants``)."""
Spelling = Literal["python", "cli"]

# The rule each field obeys, as shown to the user after its name.
_RULES: dict[str, str] = {
    "sample_rate": "must be a number in (0, 1]",
    "steps": "must be an integer >= 1",
    "dataset_size": "must be an integer >= 1",
    "batch_size": "must be an integer >= 1",
    "epochs": "must be a finite number > 0",
    "noise_multiplier": "must be a finite number > 0",
    "target_epsilon": "must be a finite number > 0",
    "delta": "must be a number in (0, 1)",
    "fpr": "must be a number in (0, 1)",
    "accountant": "must be one of " + ", ".join(get_args(AccountantChoice)),
    "conversion": "must be one of " + ", ".join(CONVERSIONS),
    "relation": "must be one of " + ", ".join(RELATIONS),
}


def _reject_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError("bool_not_number", "a boolean is not a number")
    return value


_NoBool = BeforeValidator(_reject_bool)
PositiveInt = Annotated[int, _NoBool, Field(ge=1)]
PositiveFloat = Annotated[float, _NoBool, Field(gt=0)]
Probability = Annotated[float, _NoBool, Field(gt=0, lt=1)]
Rate = Annotated[float, _NoBool, Field(gt=0, le=1)]


def _combination_error(template: str, **context: Any) -> PydanticCustomError:
    """An error about several fields; ``template`` names fields as ``{field_name}``."""
    return PydanticCustomError("combination", "{template}", {"template": template, **context})


class _Params(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, defer_build=True)


class _Rate(_Params):
    """Sampling rate: ``sample_rate`` or ``dataset_size`` with ``batch_size``."""

    sample_rate: Rate | None = None
    dataset_size: PositiveInt | None = None
    batch_size: PositiveInt | None = None

    @model_validator(mode="after")
    def _check_rate(self) -> "_Rate":
        by_size = self.dataset_size is not None or self.batch_size is not None
        if self.sample_rate is not None and by_size:
            raise _combination_error(
                "give {sample_rate} or {dataset_size} with {batch_size}, not both"
            )
        if self.sample_rate is None and not by_size:
            raise _combination_error(
                "give the sampling rate: {sample_rate}, or {dataset_size} with {batch_size}"
            )
        if by_size and (self.dataset_size is None or self.batch_size is None):
            raise _combination_error("{dataset_size} and {batch_size} must be given together")
        if by_size and self.batch_size > self.dataset_size:  # type: ignore[operator]
            raise _combination_error(
                "{batch_size} must not exceed {dataset_size}, got {b} > {n}",
                b=self.batch_size,
                n=self.dataset_size,
            )
        return self

    @property
    def q(self) -> float:
        """The Poisson sampling rate: ``sample_rate`` or ``batch_size / dataset_size``."""
        return float(self._q_exact())

    def _q_exact(self) -> Fraction:
        if self.sample_rate is not None:
            return Fraction(repr(self.sample_rate))
        return Fraction(self.batch_size, self.dataset_size)  # type: ignore[arg-type]


class _Sampling(_Rate):
    """Sampling rate plus the training length: ``steps`` or ``epochs``."""

    steps: PositiveInt | None = None
    epochs: PositiveFloat | None = None

    @model_validator(mode="after")
    def _check_length(self) -> "_Sampling":
        if self.steps is not None and self.epochs is not None:
            raise _combination_error("give {steps} or {epochs}, not both")
        if self.steps is None and self.epochs is None:
            raise _combination_error("give the training length: {steps} or {epochs}")
        return self

    @property
    def num_steps(self) -> int:
        """``steps``, or ``ceil(epochs / q)`` computed exactly (see the module docstring)."""
        if self.steps is not None:
            return self.steps
        return math.ceil(Fraction(repr(self.epochs)) / self._q_exact())


class _Choice(_Params):
    accountant: AccountantChoice = "rdp"

    @property
    def accountants(self) -> tuple[Accountant, ...]:
        """The accountants to run: the one place where ``"all"`` is resolved."""
        return ACCOUNTANTS if self.accountant == "all" else (self.accountant,)


class _Conversion(_Params):
    delta: Probability = DEFAULT_DELTA
    conversion: Conversion = "hypothesis-test"
    relation: RelationName = "erase"


class EpsilonParams(_Sampling, _Choice, _Conversion):
    """Inputs of ``epsilon``: the (eps, delta) guarantee of a DP-SGD run."""

    noise_multiplier: PositiveFloat


class NoiseParams(_Sampling, _Choice, _Conversion):
    """Inputs of ``noise``: the smallest noise multiplier meeting ``target_epsilon``."""

    target_epsilon: PositiveFloat


class StepsParams(_Rate, _Choice, _Conversion):
    """Inputs of ``steps``: the largest number of steps meeting ``target_epsilon``."""

    noise_multiplier: PositiveFloat
    target_epsilon: PositiveFloat


class RiskParams(_Sampling, _Choice):
    """Inputs of ``risk``: the bound on a membership attacker's TPR at a given FPR.

    ``delta`` is optional: the bounds use the whole privacy curve; with ``delta`` the epsilon
    at that delta is reported too.
    """

    noise_multiplier: PositiveFloat
    fpr: Probability
    delta: Probability | None = None
    relation: RelationName = "erase"


P = TypeVar("P", bound=_Params)


def option_name(field: str, *, spelling: Spelling = "python") -> str:
    """``sample_rate`` in Python spelling, ``--sample-rate`` in CLI spelling."""
    return "--" + field.replace("_", "-") if spelling == "cli" else field


def _show(value: Any, spelling: Spelling) -> str:
    return str(value) if spelling == "cli" or isinstance(value, int | float) else repr(value)


def error_message(error: ValidationError, *, spelling: Spelling = "python") -> str:
    """One line naming the parameter and the rule it broke (the first error only)."""
    first = error.errors(include_url=False)[0]
    kind, loc, value = first["type"], first["loc"], first.get("input")
    if kind == "combination":
        context = dict(first["ctx"])
        template = context.pop("template")
        names = {f: option_name(f, spelling=spelling) for f in _all_fields()}
        return template.format(**names, **context)
    field = str(loc[0]) if loc else "?"
    name = option_name(field, spelling=spelling)
    if kind == "missing":
        return f"{name} is required"
    if kind == "extra_forbidden":
        return f"unknown parameter {name}"
    rule = _RULES.get(field, "is invalid")
    return f"{name} {rule}, got {_show(value, spelling)}"


def _all_fields() -> set[str]:
    return set(_RULES)


def parse(model: type[P], values: Mapping[str, Any], *, spelling: Spelling = "python") -> P:
    """Validate ``values`` (``None`` means "not given") into ``model``.

    Raises:
        InvalidParameterError: one line naming the parameter and the rule it broke.
    """
    given = {key: value for key, value in values.items() if value is not None}
    try:
        return model(**given)
    except ValidationError as error:
        raise InvalidParameterError(error_message(error, spelling=spelling)) from None
