r"""Dominating pairs of one MaskDP step, and the law of their privacy loss.

One step releases :math:`S + Z`, :math:`Z \sim N(0, \sigma^2 I)`, where :math:`S` sums the
clipped contributions (L2 norm at most 1, in units of the clipping norm) of the records that
Poisson sampling at rate :math:`q` drew. Conditioned on everything but record :math:`i`, the
two neighbouring outputs are, up to a common shift (docs/privacy.md, "Substitute: the
antipodal pair"):

* ``erase`` (the record's sensitive content present or absent; the same curve as
  add/remove-one): :math:`P = (1-q)N(0, \sigma^2) + q N(1, \sigma^2)` against
  :math:`Q = N(0, \sigma^2)`. This ordering dominates the reverse one (Zhu, Dong, Wang 2022,
  Sec. 5; prv-accountant and Opacus use it).
* ``substitute`` (the sensitive content replaced by other content): the antipodal pair
  :math:`P = (1-q)N(0, \sigma^2) + q N(1, \sigma^2)` against
  :math:`Q = (1-q)N(0, \sigma^2) + q N(-1, \sigma^2)`, dp_accounting's REPLACE_ONE pair.
  It is symmetric (reflecting :math:`x \to -x` swaps P and Q), so one ordering suffices.

Both privacy losses :math:`\ell(x) = \log(p(x)/q(x))` are increasing in :math:`x`, so the
privacy loss random variable :math:`Y = \ell(X)`, :math:`X \sim P` (Gopi, Lee, Wutschitz
2021) has the CDF :math:`F(t) = P(X \le \ell^{-1}(t))`, which :class:`LossPair` evaluates
from the closed-form inverse. The survival function is evaluated directly (not as
:math:`1 - F`) so that the upper tail, which decides delta, keeps its relative precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from maskdp.accounting.relations import Relation, parse_relation

# Gauss-Legendre nodes for the truncated mean: panels of width sigma / 4, 16 nodes each.
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(16)
_PANEL = 0.25
_TAIL = 40.0  # the mean integral runs over [-40 sigma, 1 + 40 sigma]: e^-800 is dropped


@dataclass(frozen=True)
class LossPair:
    """The dominating pair of one step at sampling rate ``q`` and noise ``sigma``.

    Attributes:
        q: sampling rate in (0, 1].
        sigma: noise multiplier > 0 (noise standard deviation over the clipping norm).
        relation: ``Relation.ERASE`` (remove pair) or ``Relation.SUBSTITUTE`` (antipodal).
    """

    q: float
    sigma: float
    relation: Relation = Relation.ERASE

    def __post_init__(self) -> None:
        object.__setattr__(self, "relation", parse_relation(self.relation))

    # ------------------------------------------------------------------ the privacy loss

    @property
    def loss_min(self) -> float:
        """Infimum of the privacy loss: :math:`\\log(1-q)` for erase, :math:`-\\infty` else."""
        if self.relation is Relation.ERASE:
            return math.log1p(-self.q) if self.q < 1.0 else -math.inf
        return -math.inf

    def loss(self, x: np.ndarray) -> np.ndarray:
        r""":math:`\ell(x) = \log(p(x) / q(x))` (stable: ``log1p`` where the loss is small)."""
        x = np.asarray(x, dtype=float)
        s2 = self.sigma * self.sigma
        up = _log_mix(self.q, (2.0 * x - 1.0) / (2.0 * s2))
        if self.relation is Relation.ERASE:
            return up
        return up - _log_mix(self.q, (-2.0 * x - 1.0) / (2.0 * s2))

    def inverse_loss(self, t: np.ndarray) -> np.ndarray:
        r""":math:`x` with :math:`\ell(x) = t` (:math:`-\infty` below the loss's infimum).

        Erase: :math:`x = \sigma^2 \log((e^t - 1 + q)/q) + 1/2`. Substitute, with
        :math:`v = e^{x/\sigma^2}`, :math:`c = e^{-1/(2\sigma^2)}`: :math:`q c v^2 -
        (1-q)(e^t - 1) v - q c e^t = 0`, whose positive root for :math:`t \ge 0` is
        :math:`v = (A + \sqrt{A^2 + B^2}) / (2qc)`, :math:`A = (1-q)(e^t - 1)`,
        :math:`B = 2qc\,e^{t/2}`; :math:`\ell` is odd, so :math:`x(-t) = -x(t)`.
        """
        t = np.asarray(t, dtype=float)
        q, s2 = self.q, self.sigma * self.sigma
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.relation is Relation.ERASE and q == 1.0:
                return s2 * t + 0.5  # the Gaussian's loss is linear
            if self.relation is Relation.ERASE:
                inside = np.expm1(t) + q
                out = s2 * (np.log(np.where(inside > 0, inside, 1.0)) - math.log(q)) + 0.5
                return np.where(inside > 0, out, -np.inf)
            abs_t = np.abs(t)
            log_a = (math.log1p(-q) if q < 1.0 else -math.inf) + np.log(np.expm1(abs_t))
            log_b = math.log(2.0 * q) - 1.0 / (2.0 * s2) + 0.5 * abs_t
            log_root = np.logaddexp(log_a, 0.5 * np.logaddexp(2.0 * log_a, 2.0 * log_b))
            x = s2 * (log_root - (math.log(2.0 * q) - 1.0 / (2.0 * s2)))
            return np.sign(t) * x

    # ------------------------------------------------------------ law of Y = l(X), X ~ P

    def at(self, x: np.ndarray, *, upper: bool) -> np.ndarray:
        """:math:`P(X \\le x)`, or :math:`P(X > x)` when ``upper``, for :math:`X \\sim P`."""
        from scipy.special import ndtr  # lazily: the rdp path must not load scipy

        s = self.sigma
        sign = -1.0 if upper else 1.0
        return (1.0 - self.q) * ndtr(sign * x / s) + self.q * ndtr(sign * (x - 1.0) / s)

    def cdf(self, t: np.ndarray) -> np.ndarray:
        """:math:`P(Y \\le t)`."""
        return self.at(self.inverse_loss(t), upper=False)

    def sf(self, t: np.ndarray) -> np.ndarray:
        """:math:`P(Y > t)`, computed from the upper tails (full relative precision there)."""
        return self.at(self.inverse_loss(t), upper=True)

    def median(self) -> float:
        """A split point of the law (the loss at x = q/2, near its middle): discretisation
        takes masses from CDF differences below it and survival differences above it, so
        that no small mass is a difference of two numbers near 1."""
        return float(self.loss(np.array([0.5 * self.q]))[0])

    def truncated_mean(self, t_lo: float, t_hi: float) -> float:
        r""":math:`E[Y \mid t_{lo} < Y \le t_{hi}]` by Gauss-Legendre in :math:`x` (the
        integrand :math:`\ell(x) p(x)` is analytic, so 16 nodes per quarter sigma reach
        double precision)."""
        s = self.sigma
        x_lo = max(float(self.inverse_loss(np.array([t_lo]))[0]), -_TAIL * s)
        x_hi = min(float(self.inverse_loss(np.array([t_hi]))[0]), 1.0 + _TAIL * s)
        if not x_hi > x_lo:
            return 0.5 * (t_lo + t_hi)
        panels = max(1, math.ceil((x_hi - x_lo) / (_PANEL * s)))
        edges = np.linspace(x_lo, x_hi, panels + 1)
        half = 0.5 * (edges[1:] - edges[:-1])
        mid = 0.5 * (edges[1:] + edges[:-1])
        x = (mid[:, None] + half[:, None] * _GL_NODES[None, :]).ravel()
        w = (half[:, None] * _GL_WEIGHTS[None, :]).ravel()
        density = (1.0 - self.q) * _phi(x / s) / s + self.q * _phi((x - 1.0) / s) / s
        total = float(np.dot(w, density))
        return float(np.dot(w, density * self.loss(x))) / total


def _phi(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def _log_mix(q: float, u: np.ndarray) -> np.ndarray:
    """``log(1 - q + q e^u)``: log1p where that is exact and cannot overflow, else logaddexp."""
    if q == 1.0:
        return u
    big = u > 700.0
    small = np.log1p(q * np.expm1(np.minimum(u, 700.0)))
    return np.where(big, np.logaddexp(math.log1p(-q), math.log(q) + u), small)
