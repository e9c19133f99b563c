"""Lazy package exports (PEP 562), shared by every package ``__init__`` of maskdp.

A package lists ``name -> module`` and gets ``__getattr__``/``__dir__`` that import the
module on first use, so ``import maskdp`` and ``maskdp epsilon`` never import torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package`` exporting ``exports`` lazily.

    A name resolves to the attribute of its module; a name that is a submodule of
    ``package`` (``maskdp.mechanism`` under ``maskdp``) resolves to the submodule. Each
    resolved value is cached in ``namespace`` (the package's globals).
    """
    names = sorted(exports)

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        loaded = importlib.import_module(module)
        value = loaded if module == f"{package}.{name}" else getattr(loaded, name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return names

    return __getattr__, __dir__, names
