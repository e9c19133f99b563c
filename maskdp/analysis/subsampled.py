r"""The subsampled one-step audit: can a release show whether a record was sampled?

Under Poisson subsampling at rate :math:`q` the accountant's epsilon is amplified: it
assumes the release does not show whether a record was in the private batch. MaskDP 0.1's
mechanism summed the public term over the private batch, so a record with a large public
gradient :math:`h` moved the update by :math:`h/B_{pub}` exactly when it was sampled. This
audit gives the canary record such a gradient (``public_scale``) and reads the gated score
(:class:`~maskdp.analysis.config.AuditConfig`); with the independent public batch it must
stay below the accountant's epsilon, with the old mechanism (``same_batch=True``) it does
not (benchmarks/audit_subsampled.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from maskdp.analysis.config import AuditConfig, audit_settings
from maskdp.analysis.runs import step_batches
from maskdp.data.poisson import MaskDPDataLoader, StepBatches
from maskdp.engines.base import PerSampleLoss

if TYPE_CHECKING:
    from maskdp.analysis.audit import AuditResult


class _LinearProbe(nn.Module):
    """A linear classifier on flattened clips: the smallest model a canary can steer."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(features, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.flatten(1))


def _squared_output(outputs: Tensor, targets: Tensor) -> Tensor:
    r""":math:`\lVert f(x) \rVert^2 / 2` per sample: a loss whose gradient never saturates."""
    return outputs.pow(2).sum(1) / 2


def subsampled_target(
    records: int = 10,
) -> tuple[Callable[[], nn.Module], tuple[Tensor, Tensor, Tensor], PerSampleLoss]:
    """``(model_fn, dataset, loss_fn)`` for a subsampled audit that can see the public term.

    ``records`` tiny clips (1 x 2 x 2 x 2, first frame sensitive) of small content, a linear
    model and a loss whose gradient grows with the input (no softmax saturation), so that
    with ``public_scale`` the canary record's public gradient dominates the update: a
    mechanism that released it only when the record is in the private batch shows it.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(records, 1, 2, 2, 2, generator=gen) * 0.1
    m = torch.zeros(records, 2, 2, 2, dtype=torch.bool)
    m[:, 0] = True
    y = torch.randint(0, 2, (records,), generator=gen)
    return (lambda: _LinearProbe(8, 2)), (x, m, y), _squared_output


def private_batch_twice(loader: MaskDPDataLoader) -> Iterator[StepBatches]:
    """MaskDP 0.1's broken batches: a copy of the private batch as the public one.

    The independent public batch is still drawn (and dropped), so that every other draw is
    the library mechanism's; the copy passes the optimizer's same-storage check on purpose.
    """
    for private, _ in loader:
        inputs, mask, targets, _present = private
        yield StepBatches(private, (inputs.clone(), mask.clone(), targets.clone()))


def subsampled_audit(
    trials: int, noise_multiplier: float, *, same_batch: bool = False, seed: int = 0
) -> AuditResult:
    """The one-step audit at ``q = 0.1`` whose gated score can see the public term.

    On :func:`subsampled_target` with ``public_scale=3`` (the canary record's public
    gradient dominates the update), ``trials`` runs per world, the PRV accountant's
    epsilon as theory. ``same_batch=True`` audits, for comparison, MaskDP 0.1's broken
    mechanism: the private batch reused as the public one (:func:`private_batch_twice` in
    place of :func:`~maskdp.analysis.runs.step_batches`), whose release shows whether the
    record was sampled.
    """
    from maskdp.analysis.audit import run_audit  # audit re-exports this module's names

    model_fn, data, loss_fn = subsampled_target()
    settings = audit_settings(
        len(data[0]),
        noise_multiplier=noise_multiplier,
        max_grad_norm=1.0,
        sample_rate=0.1,
        engine="reference",
        accountant="prv",
    )
    config = AuditConfig(
        steps=1,
        trials=trials,
        loss_fn=loss_fn,
        canary_scale=3.0,
        public_scale=3.0,
        learning_rate=1.0,
        seed=seed,
    )
    batches = private_batch_twice if same_batch else step_batches
    return run_audit(model_fn, data, settings, config, batches=batches)
