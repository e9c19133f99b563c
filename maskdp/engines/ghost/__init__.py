"""The ghost engine (DESIGN.md section 4): per-sample norms without per-sample gradients.

- :mod:`~maskdp.engines.ghost.engine`: the engine, its layer plan and its two schedules;
- :mod:`~maskdp.engines.ghost.capture`: the hooks that capture ``(A, G)`` per layer;
- :mod:`~maskdp.engines.ghost.reducer`: each layer reduced inside the backward;
- :mod:`~maskdp.engines.ghost.rules`: what a layer rule is (``Pass``, ``Pair``,
  ``LayerResult``, ``LayerRule``) and the choice between its ghost and instantiate branches;
- :mod:`~maskdp.engines.ghost.registry`: which rule each module type gets (``RULES``);
- one module per layer family: :mod:`~maskdp.engines.ghost.linear` (``G^T A`` layers,
  ``nn.Linear``), :mod:`~maskdp.engines.ghost.conv`, :mod:`~maskdp.engines.ghost.norm`,
  :mod:`~maskdp.engines.ghost.embedding` (``nn.Embedding``, ``PositionalEmbedding``);
- :mod:`~maskdp.engines.ghost.ghost_norm`: float64 Gram norms and their rounding slack.

To add a layer rule: write it in its family's module (or a new module for a new family)
and register its module type in ``RULES`` in :mod:`~maskdp.engines.ghost.registry`.
"""
