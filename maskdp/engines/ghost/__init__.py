"""The ghost engine (DESIGN.md section 4): per-sample norms without per-sample gradients.

- :mod:`~maskdp.engines.ghost.engine`: the engine and its two schedules;
- :mod:`~maskdp.engines.ghost.capture`: the hooks that capture ``(A, G)`` per layer;
- :mod:`~maskdp.engines.ghost.layers`: the rule registry; one module per layer family
  (add a layer rule there).
"""
