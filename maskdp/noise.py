r"""The noise phase of a MaskDP-SGD step: Gaussian noise on the clipped sum, then the mean.

For every released parameter ``p`` the step releases (DESIGN.md section 3)

.. math::
    \tilde G_p = \frac{1}{B}\Big(\sum_i h_{i,p} + \sum_i c_i \Delta_{i,p}
        + N(0, \sigma^2 C^2 I)\Big),

with :math:`B` the *expected* batch size :math:`qN`, fixed before training.

Why each detail matters for privacy (each one is an input of the RDP of the
Poisson-subsampled Gaussian mechanism, Mironov et al. 2019; Abadi et al. 2016):

- **Noise on every step, empty batches included.** The accountant charges every step as one
  subsampled Gaussian release. Whether a batch is empty, or holds no sensitive token, is a
  function of the (secret) Poisson sample and of the data: skipping or shrinking the noise
  in that case would make the released quantity's distribution reveal it, and the analysis
  would no longer apply. The noise is drawn unconditionally, with the same standard
  deviation :math:`\sigma C` on every step.
- **Division by the expected batch size, never the realised one.** The realised batch
  size :math:`|S|` depends on which records were sampled; dividing by it makes the release
  depend on the presence of the differing record in a way the sensitivity-:math:`C`
  analysis does not cover (and is undefined for an empty batch). :math:`B` is a constant, so
  dividing by it is post-processing.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def gaussian_noise(like: Tensor, std: float, generator: torch.Generator | None) -> Tensor:
    r"""A sample of :math:`N(0, \mathrm{std}^2 I)` with the shape, dtype and device of ``like``.

    ``generator`` may live on another device than ``like`` (e.g. a CPU generator shared with
    the Poisson sampler and CUDA parameters): the noise is then drawn on the generator's
    device and moved. ``std = 0`` returns zeros without drawing (the generator does not
    advance). The default generator (``None``) is torch's global one, which is not
    cryptographically secure; like Opacus without ``secure_mode``, this protects against
    the mechanism's adversary only up to the quality of that PRNG.
    """
    if std == 0.0:
        return torch.zeros_like(like)
    device = like.device if generator is None else generator.device
    noise = torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype)
    return (noise * std).to(like.device)


def add_noise(
    clipped_sum: Mapping[str, Tensor],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    generator: torch.Generator | None,
) -> dict[str, Tensor]:
    r""":math:`\sum_i h_i + \sum_i c_i \Delta_i + N(0, \sigma^2 C^2 I)` per parameter.

    Drawn in the mapping's order (deterministic given the generator), on every step: an
    empty batch is a zero ``clipped_sum`` and still gets the full noise (module docstring).
    """
    std = noise_multiplier * max_grad_norm
    return {name: s + gaussian_noise(s, std, generator) for name, s in clipped_sum.items()}


def scale(noisy_sum: Mapping[str, Tensor], *, expected_batch_size: int) -> dict[str, Tensor]:
    r"""Divide by the expected batch size :math:`B = qN`, never by the realised one."""
    return {name: s / expected_batch_size for name, s in noisy_sum.items()}
