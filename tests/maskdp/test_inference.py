"""Masked inference (maskdp.inference) against by-hand loops, and the trainer's two accuracies."""

from __future__ import annotations

import torch
from helpers import TINY_TRAIN, random_clips, tiny_vit
from torch import nn

from maskdp.inference import accuracy, predict
from maskdp.mechanism.views import FillView
from maskdp.trainer.config import build_config
from maskdp.trainer.run import Run, train


class Items(torch.utils.data.Dataset):
    def __init__(self, x, m, y) -> None:
        self.x, self.m, self.y = x, m, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.m[i], self.y[i]


def test_predict_on_full_clips_and_through_the_view_keeps_the_mode():
    model = nn.Sequential(tiny_vit(), nn.Dropout(0.5)).train()
    x, m, _ = random_clips(5, seed=1, dtype=torch.float64)
    full, masked = predict(model, x), predict(model, x, m, view=FillView(0.25))
    assert model.training, "the caller's mode is restored"
    model.eval()
    torch.testing.assert_close(full, model(x), rtol=0, atol=0)
    hand = model(torch.where(m[:, None], torch.full_like(x, 0.25), x))
    torch.testing.assert_close(masked, hand, rtol=0, atol=0)
    assert not torch.equal(full, masked)


def test_accuracy_matches_a_loop_over_items():
    model = tiny_vit()
    x, m, y = random_clips(9, seed=2, dtype=torch.float64)
    data = Items(x, m, y)
    view = FillView(0.0)
    for masked in (False, True):
        hits = 0
        for i in range(len(y)):
            clip = torch.where(m[i][None], 0.0, x[i]) if masked else x[i]
            hits += int(model(clip[None]).argmax(1).item() == y[i].item())
        assert accuracy(model, data, masked=masked, view=view, batch_size=4) == hits / len(y)


def test_a_maskdp_run_reports_both_accuracies(tmp_path):
    config = build_config(**TINY_TRAIN, view="fill")
    result = train(config, tmp_path / "run")
    run = Run(config, tmp_path / "run")
    run.load()
    assert result.accuracy == accuracy(run.model, run.test_set)
    assert result.masked_accuracy == accuracy(
        run.model, run.test_set, masked=True, view=FillView(0.5)
    )
    plain = train(build_config(**TINY_TRAIN, mode="nonprivate"), tmp_path / "plain")
    assert plain.masked_accuracy is None
