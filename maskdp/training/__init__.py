"""The training API on top of the mechanism.

``make_private`` (:mod:`~maskdp.training.private`) builds a
:class:`~maskdp.training.optimizer.MaskDPOptimizer` from one frozen
:class:`~maskdp.settings.PrivacySettings` and a loader of (private, public) batches;
checkpoints (:mod:`~maskdp.training.checkpoint`), the privacy budget, virtual batches,
mixed precision and DDP live beside it.
"""
