r"""The noise phase of a MaskDP-SGD step: Gaussian noise on the clipped private sum.

For every released parameter ``p`` the step releases (DESIGN.md section 3)

.. math::
    \tilde G_p = \frac{1}{B_{pub}} \sum_{j \in U} h_{j,p} + \frac{1}{B}\Big(\sum_{i \in P}
        c_i \Delta_{i,p} + N(0, \sigma^2 C^2 I)\Big),

with :math:`B = qN` and :math:`B_{pub}` the *expected* batch sizes, fixed before training
(the division is :func:`maskdp.mechanism.postprocess.release`).

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
- **Secret, full-precision noise.** The draws come from :mod:`maskdp.mechanism.randomness` (OS
  entropy by default: no seed replays them) in float32 or wider, whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from maskdp.mechanism.randomness import Randomness


def add_noise(
    private_sum: Mapping[str, Tensor], *, std: float, randomness: Randomness
) -> dict[str, Tensor]:
    r""":math:`\sum_i c_i \Delta_i + N(0, \mathrm{std}^2 I)` per parameter, in the sum's dtype
    (float32 or wider). ``std = 0`` (tests; no privacy) adds nothing and draws nothing."""
    if std == 0.0:
        return dict(private_sum)
    return {
        name: s + std * randomness.gaussian(tuple(s.shape), device=s.device).to(s.dtype)
        for name, s in private_sum.items()
    }
