r"""Secret randomness for the noise and the Poisson sampling of MaskDP-SGD.

The guarantee holds only if nobody else can know the noise or which records were sampled:
a seed written to a config file makes the noise replayable, and a replayed run under the
true content reproduces the released weights bit for bit (epsilon is infinite). So, by
default, both draw straight from the operating system's entropy pool (``os.urandom``, the
kernel's cryptographically secure generator): there is no seed and no state to save, leak
or restore. A resumed run simply keeps drawing fresh secret randomness, which is exactly
what a run that was never interrupted does.

- Uniforms: 53 random bits per value, :math:`u = (k + 1) 2^{-53} \in (0, 1]`, exact in
  float64.
- Gaussians: Box-Muller on two such uniforms in float64,
  :math:`z = \sqrt{-2\ln u_1}\,\cos(2\pi u_2)` (and :math:`\sin`), cast to float32 or wider.

Cost: about 8 bytes of entropy per noise coordinate (measured here: 0.13 s for 2M
coordinates on one CPU core; a step of the default model takes far longer).

:class:`InsecureSeededRandomness` replays a seed, for tests only: it warns when built, its
name says what it is, and a checkpoint that saves its state says so in its format.
"""

from __future__ import annotations

import contextvars
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from maskdp.errors import InvalidInputError

_MANTISSA = (1 << 53) - 1
_SCALE = 2.0**-53


@runtime_checkable
class Randomness(Protocol):
    """A source of the two secret draws of a step: uniforms (sampling) and Gaussians (noise)."""

    def uniform(self, count: int) -> Tensor:
        """``count`` float64 uniforms on :math:`(0, 1]` (CPU)."""
        ...

    def gaussian(self, shape: tuple[int, ...], *, device: torch.device) -> Tensor:
        """Standard normals of ``shape`` in float32 on ``device``."""
        ...

    def stream_seed(self) -> int:
        """A 63-bit seed for the private side's own random stream (:func:`private_scope`),
        drawn without moving the uniform and Gaussian draws."""
        ...


def _uniform_from_bits(bits: Tensor) -> Tensor:
    r""":math:`((k \,\&\, (2^{53} - 1)) + 1)\, 2^{-53}`: exact float64 uniforms on (0, 1]."""
    return ((bits & _MANTISSA) + 1).double() * _SCALE


def box_muller(u1: Tensor, u2: Tensor) -> Tensor:
    r"""Standard normals from uniforms on (0, 1] (Box and Muller 1958), float64, ``2 len(u1)``."""
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = (2.0 * math.pi) * u2
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])


class SecretRandomness:
    """Draws from ``os.urandom`` (the default of every MaskDP component). Holds no state."""

    def uniform(self, count: int) -> Tensor:
        if count <= 0:
            return torch.zeros(0, dtype=torch.float64)
        raw = bytearray(os.urandom(8 * count))
        return _uniform_from_bits(torch.frombuffer(raw, dtype=torch.int64))

    def gaussian(self, shape: tuple[int, ...], *, device: torch.device) -> Tensor:
        count = math.prod(shape)
        half = (count + 1) // 2
        u = self.uniform(2 * half)
        z = box_muller(u[:half], u[half:])[:count]
        return z.to(dtype=torch.float32).reshape(shape).to(device)

    def stream_seed(self) -> int:
        return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)

    def __repr__(self) -> str:
        return "SecretRandomness()"


class InsecureSeededRandomness:
    """A seeded, replayable generator: **for tests only**, it voids the privacy guarantee.

    Anyone who knows ``seed`` can replay the noise and the sampling. It warns when built;
    :meth:`state_dict` lets a test resume it bit for bit.
    """

    def __init__(self, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InvalidInputError(f"seed must be an int >= 0, got {seed!r}")
        warnings.warn(
            "InsecureSeededRandomness: noise and sampling are replayable from the seed; the "
            "privacy guarantee does not hold (tests only)",
            InsecureRandomnessWarning,
            stacklevel=2,
        )
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        self._streams = torch.Generator().manual_seed(seed ^ 0x5EED)

    def uniform(self, count: int) -> Tensor:
        if count <= 0:
            return torch.zeros(0, dtype=torch.float64)
        bits = torch.randint(0, 1 << 62, (count,), generator=self._generator, dtype=torch.int64)
        return _uniform_from_bits(bits)

    def gaussian(self, shape: tuple[int, ...], *, device: torch.device) -> Tensor:
        z = torch.randn(shape, generator=self._generator, dtype=torch.float32)
        return z.to(device)

    def stream_seed(self) -> int:
        return int(torch.randint(0, 1 << 62, (1,), generator=self._streams))

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "state": self._generator.get_state(),
            "streams": self._streams.get_state(),
        }

    @staticmethod
    def check_state(state: Any) -> None:
        """Raise :class:`InvalidInputError` unless ``state`` is a :meth:`state_dict` output."""
        try:
            torch.Generator().set_state(state["state"])
            torch.Generator().set_state(state["streams"])
        except (KeyError, TypeError, RuntimeError) as err:
            raise InvalidInputError(f"insecure_randomness state is invalid: {err}") from None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self._generator.set_state(state["state"])
        self._streams.set_state(state["streams"])

    def __repr__(self) -> str:
        return f"InsecureSeededRandomness(seed={self.seed})"


class InsecureRandomnessWarning(UserWarning):
    """Warned when replayable (seeded) randomness drives noise or sampling."""


def check_randomness(value: Randomness | None) -> Randomness:
    """``value``, or a fresh :class:`SecretRandomness` for ``None``."""
    if value is None:
        return SecretRandomness()
    if isinstance(value, torch.Generator):
        raise InvalidInputError(
            "a torch.Generator cannot drive noise or sampling: its seed makes them replayable; "
            "leave the default (secret OS entropy) or, in tests only, pass "
            "maskdp.mechanism.randomness.InsecureSeededRandomness(seed)"
        )
    if not isinstance(value, Randomness):
        raise InvalidInputError(
            f"randomness must be a maskdp.mechanism.randomness.Randomness or None, got {type(value).__name__}"
        )
    return value


def is_replayable(value: Randomness) -> bool:
    """Whether ``value`` can be replayed (a seeded generator with a state to save)."""
    return hasattr(value, "state_dict")


_PRIVATE_SCOPE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "maskdp_private_scope", default=False
)


@contextmanager
def private_scope(randomness: Randomness, device: torch.device) -> Iterator[None]:
    r"""Run the private side of a step on a random stream of its own.

    Everything computed from the private batch (its public views, the model probe, the two
    passes of every record with their dropout draws) may consume random numbers in an
    amount that depends on the private batch (its size). If it consumed them from the
    streams the public batch uses next (torch's global generator, a random-fill view's
    generator), the public term would depend on the private batch and step 1 of the proof
    (docs/privacy.md) would fail. Inside this scope torch's generator (CPU, and ``device``'s
    CUDA generator) is forked and seeded from ``randomness`` (secret by default), views draw
    from it instead of their own generators (:func:`in_private_scope`), and on exit the
    outer streams are exactly as they were.
    """
    seed = randomness.stream_seed()
    devices = [device] if device.type == "cuda" else []
    token = _PRIVATE_SCOPE.set(True)
    try:
        with torch.random.fork_rng(devices=devices):
            torch.default_generator.manual_seed(seed)
            if devices:
                torch.cuda.default_generators[device.index or 0].manual_seed(seed)
            yield
    finally:
        _PRIVATE_SCOPE.reset(token)


def in_private_scope() -> bool:
    """Whether the caller runs inside :func:`private_scope` (views then draw from torch's
    forked generator, not from their own)."""
    return _PRIVATE_SCOPE.get()


def check_replay_state(randomness: Randomness, state: Any) -> None:
    """Refuse a saved seeded-randomness ``state`` unless ``randomness`` can replay it (a
    secret source never takes a replayable state); ``None`` (nothing saved) always passes."""
    if state is None:
        return
    if not is_replayable(randomness):
        raise InvalidInputError(
            "state_dict holds an insecure (seeded) randomness state; this optimizer "
            "draws secret randomness and will not replay it"
        )
    randomness.check_state(state)  # type: ignore[attr-defined]
