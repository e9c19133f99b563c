"""The ``maskdp train`` application: a config model, datasets and models, and the run loop.

Built on the public API only (``make_private``, ``save_checkpoint``); the CLI is a thin layer
over :func:`~maskdp.trainer.run.train`.
"""
