"""Real footage in the data layer: video windows, per-frame mask images, box files.

The references are independent of the code under test: frames are encoded losslessly (FFV1)
from known arrays and compared with numpy slicing; PNG masks are written by a minimal PNG
encoder here (zlib, not PyAV); box masks are filled by hand.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from maskdp.data.folder import ClipFolder
from maskdp.data.footage import FrameWindow, read_mask, read_video
from maskdp.errors import InvalidInputError

av = pytest.importorskip("av")
T, H, W = 9, 16, 24


def source_frames(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (T, H, W, 3), dtype=np.uint8)


def write_video(path: Path, frames: np.ndarray) -> Path:
    """Lossless FFV1 in Matroska: decoding gives back exactly ``frames``."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_png(path: Path, image: np.ndarray) -> None:
    """An 8-bit greyscale PNG, written by hand (PNG spec: signature, IHDR, IDAT, IEND)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    height, width = image.shape
    raw = b"".join(b"\x00" + image[row].astype(np.uint8).tobytes() for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("start", "frames", "stride"), [(0, None, 1), (2, 3, 2), (1, None, 3), (8, 1, 1), (0, 5, 2)]
)
def test_a_video_window_decodes_exactly_the_source_frames(tmp_path, start, frames, stride):
    source = source_frames()
    path = write_video(tmp_path / "clip.mkv", source)
    clip, chosen = read_video(path, FrameWindow(start, frames, stride))
    want = source[start::stride][:frames]
    assert chosen == list(range(T))[start::stride][:frames]
    assert clip.dtype == torch.float32 and clip.shape == (3, len(want), H, W)
    torch.testing.assert_close(clip, torch.from_numpy(want).permute(3, 0, 1, 2) / 255.0)


def test_a_window_past_the_end_names_the_file_and_the_frames(tmp_path):
    path = write_video(tmp_path / "clip.mkv", source_frames())
    with pytest.raises(InvalidInputError, match=r"clip\.mkv has 9 frames.*needs 4 from frame 6"):
        read_video(path, FrameWindow(6, 4, 1))
    with pytest.raises(InvalidInputError, match="stride must be an int >= 1"):
        FrameWindow(0, 2, 0)


@pytest.mark.parametrize("content", [b"", b"not a video at all" * 50])
def test_a_corrupt_or_missing_video_names_the_file(tmp_path, content):
    path = tmp_path / "broken.mp4"
    path.write_bytes(content)
    with pytest.raises(InvalidInputError, match="broken.mp4"):
        read_video(path)
    with pytest.raises(InvalidInputError, match="missing.mp4"):
        read_video(tmp_path / "missing.mp4")


def test_png_masks_follow_the_window(tmp_path):
    rng = np.random.default_rng(1)
    masks = rng.random((T, H, W)) < 0.3
    folder = tmp_path / "masks"
    folder.mkdir()
    for t in range(T):
        write_png(folder / f"{t:05d}.png", masks[t].astype(np.uint8) * 255)
    got = read_mask(folder, [1, 4, 7], height=H, width=W)
    assert torch.equal(got, torch.from_numpy(masks[[1, 4, 7]]))
    with pytest.raises(InvalidInputError, match="has 9 frames; the clip needs frame 9"):
        read_mask(folder, [3, 9], height=H, width=W)


def test_boxes_from_csv_and_json_cover_exactly_their_frames(tmp_path):
    rows = [(2, 1.5, 2.0, 5.0, 6.2), (2, 10, 0, 12, 3), (4, 0, 0, 24, 16), (6, 3, 3, 4, 4)]
    csv_path = tmp_path / "boxes.csv"
    csv_path.write_text("frame,x0,y0,x1,y1\n" + "".join(f"{','.join(map(str, r))}\n" for r in rows))
    json_path = tmp_path / "boxes.json"
    json_path.write_text(json.dumps([{"frame": r[0], "box": list(r[1:])} for r in rows]))
    chosen = [2, 4, 5]  # frame 6's box is outside the window
    want = torch.zeros(3, H, W, dtype=torch.bool)
    want[0, 2:7, 1:5] = True  # floor the start, ceil the end
    want[0, 0:3, 10:12] = True
    want[1] = True
    for path in (csv_path, json_path):
        assert torch.equal(read_mask(path, chosen, height=H, width=W), want), path.name


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("b.csv", "t,x0,y0,x1,y1\n0,0,0,1,1\n", "needs the header frame,x0,y0,x1,y1"),
        ("b.csv", "frame,x0,y0,x1,y1\n0,0,zero,1,1\n", "malformed"),
        ("b.csv", "frame,x0,y0,x1,y1\n1.5,0,0,1,1\n", "frame 1.5 is not an int"),
        ("b.json", '{"frame": 0}', "malformed"),
        ("b.json", '[{"frame": 0, "box": [5, 5, 1, 1]}]', "x1 < x0"),
    ],
)
def test_bad_box_files_name_the_file(tmp_path, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InvalidInputError, match=needle) as info:
        read_mask(path, [0, 1], height=H, width=W)
    assert name in str(info.value)


def test_a_clip_folder_cuts_video_and_mask_sources_alike(tmp_path):
    source = source_frames(3)
    (tmp_path / "clips").mkdir()
    write_video(tmp_path / "clips" / "a.mkv", source)
    masks = np.random.default_rng(4).random((T, H, W)) < 0.5
    np.save(tmp_path / "a_mask.npy", masks)
    (tmp_path / "boxes.csv").write_text("frame,x0,y0,x1,y1\n3,0,0,4,4\n")
    (tmp_path / "labels.csv").write_text(
        "clip,mask,label,start,frames,stride\n"
        "clips/a.mkv,a_mask.npy,1,1,3,3\n"
        "clips/a.mkv,boxes.csv,0,3,2,\n"
        "clips/a.mkv,a_mask.npy,2,,,\n"
    )
    folder = ClipFolder(tmp_path)
    clip, mask, label = folder[0]
    assert label == 1 and clip.shape == (3, 3, H, W)
    torch.testing.assert_close(clip, torch.from_numpy(source[[1, 4, 7]]).permute(3, 0, 1, 2) / 255)
    assert torch.equal(mask, torch.from_numpy(masks[[1, 4, 7]]))
    _, box_mask, _ = folder[1]
    assert box_mask[0, :4, :4].all() and box_mask.sum() == 16 and box_mask.shape == (2, H, W)
    assert folder[2][0].shape == (3, T, H, W)


def test_a_clip_folder_row_with_a_bad_window_names_its_line(tmp_path):
    (tmp_path / "clips").mkdir()
    write_video(tmp_path / "clips" / "a.mkv", source_frames())
    np.save(tmp_path / "m.npy", np.zeros((T, H, W), dtype=bool))
    (tmp_path / "labels.csv").write_text(
        "clip,mask,label,start,frames,stride\nclips/a.mkv,m.npy,0,x,2,1\n"
    )
    with pytest.raises(InvalidInputError, match="labels.csv line 2: start 'x' is not an integer"):
        ClipFolder(tmp_path)
    (tmp_path / "labels.csv").write_text(
        "clip,mask,label,start,frames,stride\nclips/a.mkv,m.npy,0,7,3,1\n"
    )
    with pytest.raises(InvalidInputError, match=r"labels.csv line 2: .*a.mkv has 9 frames"):
        ClipFolder(tmp_path)[0]


def write_footage_split(root: Path, rows: int, seed: int) -> None:
    """A clip folder over one real-video file: windows of 4 frames, boxes as masks."""
    (root / "clips").mkdir(parents=True)
    write_video(root / "clips" / "scene.mkv", source_frames(seed))
    (root / "boxes.csv").write_text("frame,x0,y0,x1,y1\n" + "".join(
        f"{t},2,2,10,10\n" for t in range(T)
    ))  # fmt: skip
    lines = [f"clips/scene.mkv,boxes.csv,{i % 2},{i % (T - 3)},4,1" for i in range(rows)]
    (root / "labels.csv").write_text("clip,mask,label,start,frames,stride\n" + "\n".join(lines))


def test_maskdp_train_data_trains_on_a_folder_of_real_video(tmp_path, capsys):
    """``maskdp train --data PATH``: the folder's size sets the sampling rate, its clips'
    shape (4 frames of 16 x 24, not square) the model."""
    from maskdp.accounting.cli import run as run_cli

    from maskdp.cli.app import app

    write_footage_split(tmp_path / "data" / "train", rows=12, seed=1)
    write_footage_split(tmp_path / "data" / "test", rows=6, seed=2)
    run_dir = tmp_path / "run"
    args = ["--data", str(tmp_path / "data"), "--run-dir", str(run_dir), "--batch-size", "3"]
    args += ["--epochs", "1", "--public-epochs", "1", "--threads", "1", "--json"]
    assert run_cli(app, ["train", *args]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["sample_rate"] == 3 / 12 and metrics["private_steps"] == 4
    assert metrics["epsilon"] <= 1.0 and metrics["accuracy"] in {k / 6 for k in range(7)}
    assert json.loads((run_dir / "config.json").read_text())["data"] == str(tmp_path / "data")
