"""Engines computing the masked gradient: reference (oracle), vmap, hooks, ghost."""
