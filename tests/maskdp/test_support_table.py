"""The support table (tests/maskdp/support.py) holds, both ways, for every engine and model:
each listed engine computes the model's masked gradient, each other engine refuses it (at
``check_support`` or, for run-time refusals such as in-place residuals, during the call)."""

from __future__ import annotations

import pytest
import torch
from support import ENGINES, TABLE, build, supported_engines
from torch import nn

from maskdp.engines.base import engine_names, resolve_engine
from maskdp.errors import UnsupportedModelError
from maskdp.mechanism.gradient import MaskedGradient, masked_gradient

TORCHVISION = {"r3d_18", "r2plus1d_18", "swin3d_t"}


def test_the_table_names_every_registered_engine():
    assert set(ENGINES) == set(engine_names()) - {"auto"}


def _clip(n: int = 1):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 4, 16, 16, generator=gen)
    m = torch.zeros(n, 4, 16, 16, dtype=torch.bool)
    m[..., 4:12, 4:12] = True
    return x, m, torch.zeros(n, dtype=torch.long)


@pytest.mark.parametrize(
    "model",
    [pytest.param(m, marks=pytest.mark.slow) if m in TORCHVISION else m for m in TABLE],
)
def test_each_engine_supports_exactly_what_the_table_says(model):
    net = build(model).eval()
    x, m, y = _clip()

    def run(engine: str) -> MaskedGradient:
        return masked_gradient(
            net, nn.CrossEntropyLoss(), x, m, y, max_grad_norm=1.0, engine=engine,
            public=_clip(1),
        )  # fmt: skip

    for engine in ENGINES:
        if engine in supported_engines(model):
            assert run(engine).norms.shape == (1,)
        else:
            with pytest.raises(UnsupportedModelError, match="engine"):
                run(engine)
    assert resolve_engine("auto", net).name == TABLE[model][2]
