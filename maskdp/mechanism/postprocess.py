r"""Post-processing of the released noisy private sum: weighting and shrinkage.

A MaskDP-SGD step releases two things (DESIGN.md section 3): the public sum
:math:`P = \sum_{j \in U} h_j` over the public batch, a function of public content and of
sampling randomness independent of the private batch only, and the noisy private sum

.. math::
    Z = \sum_{i \in \mathcal{P}} c_i \Delta_i + N(0, \sigma^2 C^2 I),

the subsampled Gaussian mechanism with sensitivity :math:`C` under the ``erase`` relation.
The pair :math:`(P, Z)` is :math:`(\epsilon, \delta)`-MaskDP: :math:`P` has the same
distribution in both worlds of a masked-adjacent pair and is independent of :math:`Z`, and
:math:`Z` carries the guarantee. By the post-processing property of differential privacy (Dwork and Roth 2014,
Prop. 2.1), any function :math:`F(P, Z)` whose other inputs are data-independent constants
(:math:`\sigma`, :math:`C`, :math:`B`, the dimension, a weight fixed before training) has
the same guarantee. The update used is

.. math::
    G = \frac{P}{B_{pub}} + \frac{w}{B} \cdot s(Z), \qquad s(Z) = Z \text{ (no shrinkage) or }
    \Big(1 - \frac{(d - 2)\, \sigma^2 C^2}{\lVert Z \rVert^2}\Big)_+ Z

per parameter tensor of dimension :math:`d \ge 3` (positive-part James-Stein shrinkage
toward zero, James and Stein 1961; Baranchik 1964): an estimator of the clipped private sum
with lower mean squared error than :math:`Z` when :math:`d \ge 3`, which shrinks a tensor's
private term to zero when its norm is explained by the noise alone. :math:`w = 1` without
shrinkage is plain MaskDP-SGD.

What must *not* happen for the argument to hold: noise added after weighting (then the
released quantity would be :math:`wZ'` with noise :math:`w\sigma C`, a weaker mechanism), or a
weight or shrinkage that reads the clipped (noiseless) private sum, the per-sample norms, or
anything else computed from sensitive content.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from maskdp.checks import check_finite
from maskdp.errors import InvalidInputError

SHRINKAGE = ("james-stein",)


def check_private_weight(value: float) -> float:
    """A finite weight ``>= 0`` of the noisy private sum."""
    return check_finite("private_weight", value, note=" (1 = plain MaskDP-SGD)")


def check_shrinkage(value: str | None) -> str | None:
    """``None`` or one of :data:`SHRINKAGE`."""
    if value is not None and value not in SHRINKAGE:
        raise InvalidInputError(
            f"shrinkage must be None or one of {list(SHRINKAGE)}, got {value!r}"
        )
    return value


def james_stein_factor(noisy: Tensor, noise_std: float) -> Tensor:
    r""":math:`(1 - (d - 2)\,\mathrm{std}^2 / \lVert Z \rVert^2)_+` of one tensor ``Z``.

    Reads only the released noisy tensor and constants. ``1`` for :math:`d < 3` (James-Stein
    dominates only from dimension 3) and for ``noise_std = 0``; ``0`` for a zero tensor.
    """
    d = noisy.numel()
    one = torch.ones((), dtype=noisy.dtype, device=noisy.device)
    if d < 3 or noise_std == 0.0:
        return one
    squared = torch.linalg.vector_norm(noisy.double()) ** 2
    factor = 1.0 - (d - 2) * noise_std**2 / squared.clamp_min(torch.finfo(torch.float64).tiny)
    return factor.clamp_min(0.0).to(noisy.dtype)


def release(
    public: Mapping[str, Tensor],
    noisy_private: Mapping[str, Tensor],
    *,
    public_batch_size: int,
    expected_batch_size: int,
    private_weight: float,
    shrinkage: str | None,
    noise_std: float,
) -> dict[str, Tensor]:
    r""":math:`P / B_{pub} + w\, s(Z) / B` per parameter (module docstring); a parameter
    without an entry in ``noisy_private`` gets :math:`P / B_{pub}` alone.

    ``noise_std`` is :math:`\sigma C`; both divisors are expected batch sizes fixed before
    training, never realised ones.
    """
    out = {}
    for name, p in public.items():
        out[name] = p / public_batch_size
        z = noisy_private.get(name)
        if z is None:  # outside the private subset (maskdp.mechanism.subset): public only
            continue
        if shrinkage == "james-stein":
            z = james_stein_factor(z, noise_std) * z
        out[name] = out[name] + (private_weight / expected_batch_size) * z
    return out
