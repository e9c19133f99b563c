"""Shared fixtures of the maskdp tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Small models gain nothing from intra-op threads; on a shared 2-core machine extra
    threads oversubscribe it and make these tests up to 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
