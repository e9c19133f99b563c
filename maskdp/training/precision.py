r"""Mixed precision for MaskDP-SGD: low-precision forward passes, fp32 privacy arithmetic.

``MaskDPOptimizer(..., autocast=torch.bfloat16)`` runs each engine call (the forward
passes of both views and the backward that follows) under
``torch.autocast(device_type, dtype)``: matmuls and convolutions run in bf16/fp16, while

- the clipped sums an engine returns are taken in float32 or wider (the parameter dtype
  promoted to float32) and the optimizer accumulates micro-batches in that dtype;
- per-sample norms are accumulated and returned in float64 by every engine (autocast never
  touches float64), and so are the clip factors :math:`c_i = \min(1, C/\lVert \Delta_i
  \rVert)`;
- the noise :math:`N(0, \sigma^2 C^2 I)` is drawn in float32 or wider (from secret
  randomness) after the engine call, outside the autocast region, and so are the divisions
  by the expected batch sizes; only the released gradient is cast to the parameter dtype.

The privacy argument needs :math:`\lVert c_i \Delta_i \rVert \le C` for the contribution
that is actually summed, and a sum whose rounding does not depend on the other records
more than fp32's does. Under autocast the per-sample rows an engine materialises may be
bf16 (vmap's gradients, Opacus's grad samplers): the norm is then the exact norm of those
rounded rows, and :func:`maskdp.engines.persample.clipped_result` upcasts them and sums
:math:`\sum_i c_i \Delta_i` in fp32 with autocast off, so each contribution is
:math:`C` up to fp32 rounding. The ghost engine likewise upcasts the captured activations
and output gradients and reduces with autocast off. Engines declare this with
``autocast_safe``; the optimizer refuses ``autocast`` with any engine that does not.
``tests/maskdp/test_precision.py`` checks every engine under CPU bf16 autocast for :math:`\lVert c_i \Delta_i\rVert \le
C(1 + 10^{-5})`, measured as the change of the released sum when one record is erased.
Wrapping ``optimizer.backward`` in ``torch.autocast`` yourself bypasses that check: use
the option.

``torch.amp.GradScaler`` does not fit and is not needed: it scales a loss before
``backward()`` and unscales ``param.grad`` before ``step()``, but MaskDP's gradients exist
only inside the engine (per-sample rows or ghost norms) and in the noisy sum the optimizer
writes at ``step()``; a scaled loss would scale :math:`\Delta_i` and so the clipping. bf16
has fp32's exponent range and needs no loss scaling, so it is the recommended dtype; with
fp16, gradients that underflow are zero (those records are merely clipped harder), and an
overflow gives an infinite norm (the record's clip factor becomes 0) or NaN: prefer bf16.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from maskdp.errors import InvalidInputError

AUTOCAST_DTYPES = (torch.float16, torch.bfloat16)


def check_autocast(dtype: torch.dtype | None) -> torch.dtype | None:
    """``None`` (full precision), ``torch.float16`` or ``torch.bfloat16``."""
    if dtype is not None and dtype not in AUTOCAST_DTYPES:
        raise InvalidInputError(
            f"autocast must be None, torch.float16 or torch.bfloat16, got {dtype!r}"
        )
    return dtype


def autocast(dtype: torch.dtype | None, device: torch.device) -> AbstractContextManager:
    """``torch.autocast`` on ``device``'s type with ``dtype``; a no-op for ``None``."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
