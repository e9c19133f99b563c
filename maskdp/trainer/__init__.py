"""The ``maskdp train`` application, built on the public API (``make_private`` and friends).

- :mod:`~maskdp.trainer.config`: :class:`TrainConfig`, the validated options (torch-free);
- :mod:`~maskdp.trainer.build`: datasets, model, view, device and plan of a config;
- :mod:`~maskdp.trainer.run`: :class:`Run` and :func:`~maskdp.trainer.run.train`;
- :mod:`~maskdp.trainer.result`: :class:`TrainResult`, what ``train`` returns (torch-free);
- :mod:`~maskdp.trainer.rundir`: the files of a run directory (torch-free);
- :mod:`~maskdp.trainer.artifacts`: ``evaluate`` and ``export`` of a stored run.

The CLI (:mod:`maskdp.cli.train`) is a thin layer over :func:`~maskdp.trainer.run.train`.
"""
