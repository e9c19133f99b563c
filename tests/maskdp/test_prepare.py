"""``prepare``: BatchNorm to GroupNorm, in-place activations off, on a copy of the model.

A prepared model also passes the behaviour probe of ``maskdp.engines.validate`` (no buffer changes
in a train-mode forward), which the original fails."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from maskdp.engines.probe import probe_model
from maskdp.engines.validate import validate_model
from maskdp.errors import InvalidInputError
from maskdp.mechanism.views import ModelInput
from maskdp.models import SmallVideoCNN, prepare
from maskdp.models.preparation import group_count


def test_r3d18_is_made_safe_and_the_original_is_untouched():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    original = torchvision.models.video.r3d_18(num_classes=3)
    for m in original.modules():
        if isinstance(m, nn.BatchNorm3d):
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    keys = list(original.state_dict())
    n_bn = sum(isinstance(m, nn.BatchNorm3d) for m in original.modules())

    model, changes = prepare(original)

    validate_model(model)
    assert model is not original and list(original.state_dict()) == keys
    assert sum(isinstance(m, nn.BatchNorm3d) for m in original.modules()) == n_bn
    assert not any(isinstance(m, nn.BatchNorm3d) for m in model.modules())
    assert sum("-> GroupNorm(" in c for c in changes) == n_bn
    assert any(c.startswith("stem.1: BatchNorm3d(64") and "GroupNorm(32, 64" in c for c in changes)
    bn, gn = original.layer1[0].conv1[1], model.layer1[0].conv1[1]
    assert torch.equal(gn.weight, bn.weight) and torch.equal(gn.bias, bn.bias)
    assert gn.num_groups == 32 and gn.eps == bn.eps
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert any("ReLU(inplace=True) -> ReLU()" in c for c in changes)
    x = torch.rand(2, 3, 2, 16, 16)
    assert model(x).shape == (2, 3)
    assert probe_model(model.train(), ModelInput(x)).changed_state == ()
    changed = probe_model(original.train(), ModelInput(x)).changed_state
    assert "stem.1.running_mean" in changed and "layer1.0.conv1.1.num_batches_tracked" in changed


def test_model_without_batchnorm_is_returned_unchanged():
    torch.manual_seed(0)
    model = SmallVideoCNN(num_classes=2, width=4)
    report = prepare(model)
    assert report.changes == ()
    assert report.model is not model
    before, after = model.state_dict(), report.model.state_dict()
    assert list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert repr(report.model) == repr(model)


def test_groups_argument_shared_modules_and_non_affine():
    shared = nn.BatchNorm2d(8)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 1), shared, nn.Conv2d(8, 8, 1), shared, nn.BatchNorm1d(6, affine=False)
    )
    prepared, changes = prepare(model, groups=2)
    assert isinstance(prepared[1], nn.GroupNorm) and prepared[1].num_groups == 2
    assert prepared[1] is prepared[3]  # a shared BatchNorm becomes one shared GroupNorm
    assert not prepared[4].affine and prepared[4].num_groups == 2
    assert len(changes) == 2
    with pytest.raises(InvalidInputError, match="does not divide"):
        prepare(nn.Sequential(nn.BatchNorm1d(6)), groups=4)
    with pytest.raises(InvalidInputError, match="groups must be an int >= 1"):
        prepare(model, groups=0)


def test_root_batchnorm_and_instance_norm_with_running_stats():
    prepared, changes = prepare(nn.BatchNorm3d(12))
    assert isinstance(prepared, nn.GroupNorm) and prepared.num_groups == 12
    assert changes[0].startswith("BatchNorm3d: ")
    inorm = nn.Sequential(
        nn.Conv3d(3, 4, 1), nn.InstanceNorm3d(4, affine=True, track_running_stats=True)
    )
    prepared, changes = prepare(inorm)
    validate_model(prepared)
    assert not prepared[1].track_running_stats and "running_mean" not in prepared.state_dict()
    assert len(changes) == 1
    x = ModelInput(torch.rand(2, 3, 2, 4, 4))
    assert probe_model(prepared.train(), x).changed_state == ()
    assert "1.running_mean" in probe_model(inorm.train(), x).changed_state


@pytest.mark.parametrize(
    "channels, groups", [(64, 32), (48, 24), (20, 20), (7, 7), (96, 32), (33, 11), (1, 1)]
)
def test_group_count_is_the_largest_divisor_up_to_32(channels, groups):
    assert group_count(channels) == groups


def test_an_in_place_container_is_switched_and_named_on_one_line():
    """A container with an ``inplace`` flag (pytorchvideo's MultiPathWayWithFuse): its change
    line names the type, not a multi-line repr of its children."""

    class Fuse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inplace = True
            self.blocks = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])

    model, changes = prepare(nn.Sequential(Fuse()))
    assert model[0].inplace is False
    assert list(changes) == ["0: Fuse(inplace=True) -> Fuse(inplace=False)"]
