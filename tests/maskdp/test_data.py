"""Tests of maskdp.data.synthetic (SyntheticPrivateActions) and maskdp.data.folder (ClipFolder)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from maskdp.data.folder import ClipFolder
from maskdp.data.folder_writer import write_clip_folder
from maskdp.data.synthetic import ACTIONS, SyntheticPrivateActions
from maskdp.errors import InvalidInputError

KINDS = [("avatar", "exact"), ("avatar", "box"), ("person", "exact"), ("person", "box")]
KINDS += [("person", "track")]


# ---------------------------------------------------------------------------------------
# SyntheticPrivateActions: shapes, determinism, speed
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("scenario", "mask_kind"), KINDS)
def test_items_have_the_documented_shapes_and_dtypes(scenario: str, mask_kind: str) -> None:
    data = SyntheticPrivateActions(
        size=12, scenario=scenario, mask_kind=mask_kind, num_classes=6, frames=8, image_size=32
    )
    assert len(data) == 12 and data.num_classes == 6 and data.num_identities == 8
    assert data.identities.shape == (12,) and data.identities.dtype == torch.int64
    for i in range(len(data)):
        clip, mask, label = data[i]
        assert clip.shape == (3, 8, 32, 32) and clip.dtype == torch.float32
        assert mask.shape == (8, 32, 32) and mask.dtype == torch.bool
        assert label.dtype == torch.int64 and label.shape == ()
        assert 0 <= int(label) < 6 and int(label) == int(data.labels[i])
        assert 0.0 <= float(clip.min()) and float(clip.max()) <= 1.0
        assert 0 <= data.identity(i) < 8 and data.identity(i) == int(data.identities[i])
        # Every frame has both sensitive and public pixels.
        assert mask.flatten(1).any(1).all() and (~mask).flatten(1).any(1).all()


def test_other_sizes_and_channels() -> None:
    data = SyntheticPrivateActions(size=3, frames=16, image_size=48, channels=1, num_classes=2)
    clip, mask, _ = data[2]
    assert clip.shape == (1, 16, 48, 48) and mask.shape == (16, 48, 48)
    assert data[-1][0].equal(clip)
    with pytest.raises(IndexError):
        data[3]


def test_same_seed_gives_bit_identical_data_and_other_seeds_differ() -> None:
    a = SyntheticPrivateActions(size=20, seed=3).tensors()
    b = SyntheticPrivateActions(size=20, seed=3).tensors()
    for x, y in zip(a, b, strict=True):
        assert x.equal(y)
    other = SyntheticPrivateActions(size=20, seed=4).tensors()
    assert not a[0].equal(other[0])
    # Lazy per-index generation: an item does not depend on the dataset size or on order.
    big = SyntheticPrivateActions(size=40, seed=3)
    assert big.render(7).clip.equal(SyntheticPrivateActions(size=40, seed=3).render(7).clip)
    assert SyntheticPrivateActions(size=20, seed=3, noise=0.0)[5][0].equal(
        SyntheticPrivateActions(size=20, seed=3, noise=0.0)[5][0]
    )


def test_train_and_test_sets_are_disjoint_and_identically_built() -> None:
    train, test = SyntheticPrivateActions.train_test(train_size=32, test_size=32, seed=1)
    assert train.train and not test.train
    x_train, x_test = train.tensors()[0].flatten(1), test.tensors()[0].flatten(1)
    # No test clip equals (or is even close to) a train clip.
    assert torch.cdist(x_test, x_train).min() > 1.0
    for a, b in zip(test.textures, train.textures, strict=True):  # shared prototypes
        assert np.array_equal(a.colour, b.colour) and (a.theta, a.frequency) == (
            b.theta,
            b.frequency,
        )
    with pytest.raises(InvalidInputError):
        SyntheticPrivateActions.train_test(train_size=4, test_size=4, train=False)


def test_batched_generation_equals_per_item_rendering() -> None:
    """``tensors()`` (the fast batched path) renders exactly what ``data[i]`` renders."""
    data = SyntheticPrivateActions(size=200)
    clips, masks, labels = data.tensors()
    assert clips.shape == (200, 3, 8, 32, 32) and labels.shape == (200,)
    for i in (0, 57, 199):
        x, m, y = data[i]
        assert torch.equal(clips[i], x) and torch.equal(masks[i], m) and int(labels[i]) == int(y)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scenario": "crowd"},
        {"num_classes": 7},
        {"num_classes": 1},
        {"num_identities": 0},
        {"noise": -0.1},
        {"noise": float("nan")},
        {"mask_kind": "blob"},
        {"mask_kind": "track", "scenario": "avatar"},
        {"seed": -1},
        {"image_size": 8},
        {"frames": 1},
        {"train": 1},
    ],
)
def test_invalid_arguments_are_refused(kwargs: dict) -> None:
    with pytest.raises(InvalidInputError):
        SyntheticPrivateActions(size=4, **kwargs)
    with pytest.raises(InvalidInputError):
        SyntheticPrivateActions(size="4")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# Scenario semantics: what is sensitive, and the identity lies inside the mask
# ---------------------------------------------------------------------------------------


def test_avatar_actor_is_public_and_background_sensitive() -> None:
    exact = SyntheticPrivateActions(size=16, scenario="avatar", mask_kind="exact")
    box = SyntheticPrivateActions(size=16, scenario="avatar", mask_kind="box")
    hidden = 0
    for i in range(16):
        e, b = exact.render(i), box.render(i)
        assert e.actor.equal(b.actor) and e.clip.equal(b.clip)
        assert e.mask.equal(~e.actor)  # exact: the background, nothing else
        assert (b.mask | e.actor).all()  # box: still every background pixel
        assert (~b.mask).flatten(1).any(1).all()  # some of the avatar stays public
        # Box: the public part is a rectangle per frame (the outline is hidden).
        public = ~b.mask
        assert public.equal(public.any(2)[:, :, None] & public.any(1)[:, None, :])
        hidden += int(b.mask.sum() > e.mask.sum())  # equal for square avatars
    assert hidden >= 4


def test_person_actor_is_sensitive_and_background_public() -> None:
    kinds = {
        k: SyntheticPrivateActions(size=16, scenario="person", mask_kind=k)
        for k in ("exact", "box", "track")
    }
    for i in range(16):
        e, b, t = (kinds[k].render(i) for k in ("exact", "box", "track"))
        assert e.mask.equal(e.actor)
        assert (b.mask >= e.actor).all() and b.mask.sum() > e.mask.sum()
        # Box: a rectangle per frame (rows x cols), containing the silhouette.
        rows, cols = b.mask.any(2), b.mask.any(1)
        assert b.mask.equal(rows[:, :, None] & cols[:, None, :])
        # Track: one box, the same in every frame, covering the whole trajectory.
        assert (t.mask == t.mask[:1]).all() and (t.mask >= b.mask).all()


@pytest.mark.parametrize(("scenario", "mask_kind"), KINDS)
def test_changing_the_identity_changes_only_masked_pixels(scenario: str, mask_kind: str) -> None:
    data = SyntheticPrivateActions(size=24, scenario=scenario, mask_kind=mask_kind)
    for i in range(len(data)):
        own = data.render(i)
        for other in range(data.num_identities):
            alt = data.render(i, identity=other)
            assert alt.identity == other and alt.action == own.action
            assert alt.mask.equal(own.mask) and alt.actor.equal(own.actor)
            changed = (alt.clip != own.clip).any(0)
            assert not (changed & ~own.mask).any(), "a public pixel depends on the identity"
            if other != own.identity:
                assert changed.sum() > 20  # the identity does show in the sensitive region


def test_render_rejects_a_bad_identity() -> None:
    data = SyntheticPrivateActions(size=2, num_identities=3)
    with pytest.raises(InvalidInputError):
        data.render(0, identity=3)


# ---------------------------------------------------------------------------------------
# Labels: balance and independence; learnability signals
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "classes", "identities"), [(96, 4, 8), (101, 6, 5), (7, 4, 8)])
def test_actions_and_identities_are_balanced_and_independent(
    size: int, classes: int, identities: int
) -> None:
    data = SyntheticPrivateActions(size=size, num_classes=classes, num_identities=identities)
    table = torch.zeros(classes, identities, dtype=torch.int64)
    table.index_put_((data.labels, data.identities), torch.ones(size, dtype=torch.int64), True)
    # Every (action, identity) cell occurs floor(size / cells) or that plus one times: the
    # joint distribution is the product of the marginals up to one record per cell.
    cells = classes * identities
    assert int(table.min()) >= size // cells and int(table.max()) <= -(-size // cells)
    if size % cells == 0:
        assert (table == size // cells).all()  # exact balance: chi-square statistic is 0
    # The order of labels is shuffled, not a fixed pattern.
    assert not data.labels.equal(torch.arange(size) % classes)


def _nearest_centroid(train_x, train_y, test_x, test_y, k: int) -> float:
    """Accuracy of a nearest-class-mean classifier with features standardised on train."""
    scale = train_x.std(0) + 1e-6
    centroids = torch.stack([train_x[train_y == c].mean(0) for c in range(k)])
    pred = torch.cdist(test_x / scale, centroids / scale).argmin(1)
    return float((pred == test_y).float().mean())


def _region_features(clips: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Per channel: mean and std over the region, plus mean |d/dx| and |d/dy| (orientation)."""
    w = region[:, None].float()
    count = w.sum((2, 3, 4)).clamp_min(1)
    mean = (clips * w).sum((2, 3, 4)) / count
    var = ((clips - mean[..., None, None, None]) ** 2 * w).sum((2, 3, 4)) / count
    gx = (clips[..., 1:] - clips[..., :-1]).abs().mean(1)
    wx = (region[..., 1:] & region[..., :-1]).float()
    gy = (clips[..., 1:, :] - clips[..., :-1, :]).abs().mean(1)
    wy = (region[..., 1:, :] & region[..., :-1, :]).float()
    fx = (gx * wx).sum((1, 2, 3)) / wx.sum((1, 2, 3)).clamp_min(1)
    fy = (gy * wy).sum((1, 2, 3)) / wy.sum((1, 2, 3)).clamp_min(1)
    return torch.cat([mean, var.sqrt(), fx[:, None], fy[:, None]], 1)


def _motion_features(region: torch.Tensor) -> torch.Tensor:
    """Net displacement of the region's centroid, path length minus it, area growth."""
    a = region.float()
    area = a.sum((2, 3)).clamp_min(1)
    grid = torch.arange(a.shape[-1], dtype=torch.float32)
    cx = (a.sum(2) * grid).sum(-1) / area
    cy = (a.sum(3) * grid).sum(-1) / area
    net = torch.stack([cx[:, -1] - cx[:, 0], cy[:, -1] - cy[:, 0]], 1)
    path = (cx.diff(dim=1) ** 2 + cy.diff(dim=1) ** 2).sqrt().sum(1)
    growth = area[:, -1] / area[:, 0]
    return torch.cat([net, (path - net.norm(dim=1))[:, None], growth[:, None]], 1)


@pytest.mark.parametrize("scenario", ["avatar", "person"])
def test_learnability_signals_and_no_cross_talk(scenario: str) -> None:
    """Cheap probes: the action is in the actor's motion, the identity in the sensitive
    region; the sensitive region says nothing about the action, the public region nothing
    about the identity."""
    train, test = SyntheticPrivateActions.train_test(
        train_size=384, test_size=384, scenario=scenario, num_classes=6, seed=11
    )
    x_tr, m_tr, y_tr = train.tensors()
    x_te, m_te, y_te = test.tensors()
    id_tr, id_te = train.identities, test.identities
    actor_tr = ~m_tr if scenario == "avatar" else m_tr
    actor_te = ~m_te if scenario == "avatar" else m_te

    action_acc = _nearest_centroid(
        _motion_features(actor_tr), y_tr, _motion_features(actor_te), y_te, 6
    )
    assert action_acc > 0.9  # chance 1/6

    sens_tr, sens_te = _region_features(x_tr, m_tr), _region_features(x_te, m_te)
    pub_tr, pub_te = _region_features(x_tr, ~m_tr), _region_features(x_te, ~m_te)
    identity_acc = _nearest_centroid(sens_tr, id_tr, sens_te, id_te, 8)
    assert identity_acc > 0.6  # chance 1/8; measured about 0.88
    colour_only = _nearest_centroid(sens_tr[:, :6], id_tr, sens_te[:, :6], id_te, 8)
    assert colour_only < identity_acc - 0.15  # colour tells pairs; texture tells identities

    # Independence: the identity-carrying content does not predict the action, and the
    # public content does not predict the identity (chance 1/6 and 1/8; 384 test clips).
    assert _nearest_centroid(sens_tr, y_tr, sens_te, y_te, 6) < 0.3
    assert _nearest_centroid(pub_tr, id_tr, pub_te, id_te, 8) < 0.25


def test_track_masks_hide_the_direction_of_motion() -> None:
    """With track masks the mask tells the axis of motion, not its direction."""
    train, test = SyntheticPrivateActions.train_test(
        train_size=256, test_size=256, scenario="person", mask_kind="track", seed=5
    )
    feats = [_motion_features(d.tensors()[1]) for d in (train, test)]
    acc = _nearest_centroid(feats[0], train.labels, feats[1], test.labels, 4)
    assert acc < 0.6  # chance 0.25; the axis alone gives at most 0.5
    assert ACTIONS[:4] == train.action_names


# ---------------------------------------------------------------------------------------
# Integration: DataLoader and masked_gradient
# ---------------------------------------------------------------------------------------


def test_works_with_a_dataloader_and_masked_gradient() -> None:
    from maskdp.mechanism.gradient import masked_gradient
    from maskdp.models import VideoViT

    data = SyntheticPrivateActions(size=6, scenario="person", mask_kind="box")
    batches = iter(DataLoader(data, batch_size=4, shuffle=False))
    clips, masks, labels = next(batches)
    public = next(batches)  # the other two clips: an independent public batch
    assert clips.shape == (4, 3, 8, 32, 32) and masks.dtype == torch.bool
    assert labels.dtype == torch.int64 and labels.shape == (4,)
    torch.manual_seed(0)
    model = VideoViT(num_classes=data.num_classes, dim=16, depth=1, heads=2)
    result = masked_gradient(
        model,
        torch.nn.CrossEntropyLoss(),
        clips,
        masks,
        labels,
        max_grad_norm=0.5,
        public=public,
        engine="reference",
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(result.private) == set(result.public) == trainable
    assert result.norms.shape == (4,) and bool((result.norms > 0).all())
    assert result.public_count == 2 and torch.isfinite(result.public_loss)
    assert any(bool(g.abs().sum() > 0) for g in result.public.values())
    assert all(torch.isfinite(g).all() for g in result.total().values())


# ---------------------------------------------------------------------------------------
# ClipFolder
# ---------------------------------------------------------------------------------------


def _some_clips(n: int = 5):
    data = SyntheticPrivateActions(size=n, frames=4, image_size=16, scenario="person")
    return data.tensors()


@pytest.mark.parametrize("fmt", ["npy", "pt"])
def test_clip_folder_round_trip(tmp_path: Path, fmt: str) -> None:
    clips, masks, labels = _some_clips()
    folder = ClipFolder.write(tmp_path / "data", clips, masks, labels, fmt=fmt)
    assert len(folder) == 5 and folder.num_classes == int(labels.max()) + 1
    assert folder.labels.equal(labels)
    for i in range(5):
        clip, mask, label = folder[i]
        assert clip.dtype == torch.float32 and clip.equal(clips[i])
        assert mask.dtype == torch.bool and mask.equal(masks[i])
        assert label.dtype == torch.int64 and int(label) == int(labels[i])
    # Writing is atomic: no temporary files are left behind.
    assert not [p for p in (tmp_path / "data").rglob("*") if p.name.endswith(".tmp")]
    batch = next(iter(DataLoader(folder, batch_size=5)))
    assert batch[0].equal(clips) and batch[1].equal(masks) and batch[2].equal(labels)


def test_clip_folder_transform_and_uint8_masks(tmp_path: Path) -> None:
    clips, masks, labels = _some_clips(2)
    (tmp_path / "m").mkdir()
    np.save(tmp_path / "c0.npy", clips[0].numpy().astype(np.float64))
    np.save(tmp_path / "m" / "m0.npy", masks[0].numpy().astype(np.uint8))
    (tmp_path / "labels.csv").write_text("clip,mask,label,notes\nc0.npy, m/m0.npy ,3,hello\n")

    def flip(clip, mask):
        return clip.flip(-1), mask.flip(-1)

    folder = ClipFolder(tmp_path, transform=flip)
    clip, mask, label = folder[0]
    assert clip.dtype == torch.float32 and clip.equal(clips[0].flip(-1))
    assert mask.dtype == torch.bool and mask.equal(masks[0].flip(-1))
    assert int(label) == 3 and folder.num_classes == 4


def _folder(tmp_path: Path, csv: str, files: dict[str, object] | None = None) -> Path:
    for name, array in (files or {}).items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(array, bytes):
            path.write_bytes(array)
        elif name.endswith(".pt"):
            torch.save(array, path)
        else:
            np.save(path, array)
    (tmp_path / "labels.csv").write_text(csv)
    return tmp_path


GOOD = {"c.npy": np.zeros((3, 4, 8, 8), np.float32), "m.npy": np.zeros((4, 8, 8), bool)}


@pytest.mark.parametrize(
    ("csv", "files", "message"),
    [
        ("clip,label\nc.npy,0\n", GOOD, "lacks the column(s) mask"),
        ("", GOOD, "is empty"),
        ("clip,mask,label\n", GOOD, "no rows"),
        ("clip,mask,label\nc.npy,m.npy,0\nc.npy,missing.npy,1\n", GOOD, "line 3: mask file"),
        ("clip,mask,label\nnope.npy,m.npy,0\n", GOOD, "nope.npy not found"),
        ("clip,mask,label\nc.npy,m.npy,cat\n", GOOD, "label 'cat' is not an integer"),
        ("clip,mask,label\nc.npy,m.npy,-1\n", GOOD, "not an integer >= 0"),
        ("clip,mask,label\nc.npy,,0\n", GOOD, "no value in column 'mask'"),
        ("clip,mask,label\nc.npy,m.npy,0,9\n", GOOD, "more fields than the header"),
        ("clip,mask,label\n/etc/c.npy,m.npy,0\n", GOOD, "must be relative"),
        ("clip,mask,label\nc.txt,m.npy,0\n", {**GOOD, "c.txt": b"x"}, "unsupported extension"),
    ],
)
def test_clip_folder_structure_errors_are_raised_at_construction(
    tmp_path: Path, csv: str, files: dict, message: str
) -> None:
    root = _folder(tmp_path, csv, files)
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ClipFolder(root)


def test_clip_folder_missing_folder_and_csv(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="does not exist"):
        ClipFolder(tmp_path / "absent")
    with pytest.raises(InvalidInputError, match="labels.csv not found"):
        ClipFolder(tmp_path)
    _folder(tmp_path, "clip,mask,label\nc.npy,m.npy,0\n", GOOD)
    (tmp_path / "labels.csv").rename(tmp_path / "train.csv")
    assert len(ClipFolder(tmp_path, labels="train.csv")) == 1


def test_clip_folder_video_without_pyav_names_file_and_package(tmp_path: Path, monkeypatch) -> None:
    """PyAV is a test dependency: hide it, as on a machine without the video extra."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "av" else real(name, *a)
    )
    root = _folder(tmp_path, "clip,mask,label\nv.mp4,m.npy,0\n", {**GOOD, "v.mp4": b"\0"})
    with pytest.raises(InvalidInputError, match=r"v\.mp4.*'av' package.*maskdp\[video\]"):
        ClipFolder(root)


@pytest.mark.parametrize(
    ("clip", "mask", "message"),
    [
        (np.zeros((3, 4, 8, 8), np.float32), np.zeros((4, 8, 9), bool), "m.npy has shape"),
        (np.zeros((3, 4, 8, 8), np.float32), np.zeros((4, 8), bool), r"expected \(T, H, W\)"),
        (np.full((3, 4, 8, 8), np.nan, np.float32), np.zeros((4, 8, 8), bool), "NaN"),
        (np.zeros((3, 4, 8, 8), np.uint8), np.zeros((4, 8, 8), bool), "floating point"),
        (np.zeros((4, 8, 8), np.float32), np.zeros((4, 8, 8), bool), r"\(C, T, H, W\)"),
        (np.zeros((3, 4, 8, 8), np.float32), np.full((4, 8, 8), 2, np.uint8), "values"),
        (np.zeros((3, 4, 8, 8), np.float32), np.full((4, 8, 8), 0.5, np.float32), "bool or int"),
    ],
)
def test_clip_folder_content_errors_are_raised_when_loading(
    tmp_path: Path, clip: np.ndarray, mask: np.ndarray, message: str
) -> None:
    root = _folder(
        tmp_path,
        "clip,mask,label\nok.npy,okm.npy,0\nc.npy,m.npy,1\n",
        {"ok.npy": GOOD["c.npy"], "okm.npy": GOOD["m.npy"], "c.npy": clip, "m.npy": mask},
    )
    folder = ClipFolder(root)  # content is checked lazily: construction succeeds
    assert folder[0][0].shape == (3, 4, 8, 8)
    with pytest.raises(InvalidInputError, match="labels.csv line 3") as info:
        folder[1]
    assert info.match(message)


def test_clip_folder_unreadable_files(tmp_path: Path) -> None:
    root = _folder(
        tmp_path,
        "clip,mask,label\nc.npy,m.pt,0\n",
        {"c.npy": b"not an npy file", "m.pt": torch.zeros(4, 8, 8, dtype=torch.bool)},
    )
    with pytest.raises(InvalidInputError, match=r"line 2: cannot read clip file .*c\.npy"):
        ClipFolder(root)[0]
    _folder(tmp_path, "clip,mask,label\nc.pt,m.pt,0\n", {"c.pt": {"x": torch.zeros(1)}})
    with pytest.raises(InvalidInputError, match="holds a dict"):
        ClipFolder(root)[0]
    _folder(tmp_path, "clip,mask,label\ns.npy,m.pt,0\n", {"s.npy": np.array(["a", "b"])})
    with pytest.raises(InvalidInputError, match="s.npy holds an array of dtype"):
        ClipFolder(root)[0]


def test_write_checks_everything_before_writing(tmp_path: Path) -> None:
    clips, masks, labels = _some_clips(3)
    bad = masks.clone().to(torch.uint8)
    bad[2, 0, 0, 0] = 7
    with pytest.raises(InvalidInputError, match="item 2"):
        write_clip_folder(tmp_path / "d", clips, bad, labels)
    assert not (tmp_path / "d").exists()
    with pytest.raises(InvalidInputError, match="item 1: label 1.5"):
        write_clip_folder(tmp_path / "d", clips, masks, [0, 1.5, 2])
    with pytest.raises(InvalidInputError, match="same non-zero length"):
        write_clip_folder(tmp_path / "d", clips, masks[:2], labels)
    with pytest.raises(InvalidInputError, match="item 0: mask shape"):
        write_clip_folder(tmp_path / "d", clips, masks[:, :, :5], labels)
    nan_clips = clips.clone()
    nan_clips[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidInputError, match="item 0: .*NaN"):
        write_clip_folder(tmp_path / "d", nan_clips, masks, labels)
    assert not (tmp_path / "d").exists()
    write_clip_folder(tmp_path / "d", clips, masks, labels)
    with pytest.raises(InvalidInputError, match="already exists"):
        write_clip_folder(tmp_path / "d", clips, masks, labels)
    folder = ClipFolder.write(tmp_path / "d", clips[:1], masks[:1], [5], overwrite=True)
    assert len(folder) == 1 and int(folder[0][2]) == 5


# ---------------------------------------------------------------------------------------
# Slow: a small VideoViT learns the actions (non-private training)
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("scenario", "target"), [("avatar", "action"), ("person", "action"), ("avatar", "identity")]
)
def test_a_small_video_vit_learns_the_task(scenario: str, target: str) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # about 30 s on one core; more threads oversubscribe CI
    try:
        accuracy = _train_vit(scenario, target)
    finally:
        torch.set_num_threads(threads)
    assert accuracy > (0.8 if target == "action" else 0.5), accuracy


def _train_vit(scenario: str, target: str) -> float:
    from maskdp.models import VideoViT

    torch.manual_seed(0)
    train, test = SyntheticPrivateActions.train_test(
        train_size=512, test_size=256, scenario=scenario, num_classes=4
    )
    x_tr, _, y_tr = train.tensors()
    x_te, _, y_te = test.tensors()
    if target == "identity":
        y_tr, y_te = train.identities, test.identities
    classes = int(y_tr.max()) + 1
    model = VideoViT(num_classes=classes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(30):
        order = torch.randperm(len(x_tr))
        for start in range(0, len(x_tr), 32):
            idx = order[start : start + 32]
            loss = torch.nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float((model(x_te).argmax(1) == y_te).float().mean())
