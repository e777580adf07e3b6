"""Preparing videos for fast loading: size, frames, keyframes, labels, trimming, resuming, safety."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

from evl.synth import make_dataset
from evl.video.decode import probe, read_frames
from evl.video.encode import write_video
from evl.video.lists import ListFileError, read_class_names, read_list
from evl.video.prepare import prepare_videos
from evl.video.reencode import output_size
from evl.video.trims import read_trims

FRAMES, FPS = 16, 8.0  # two seconds per video


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A source folder: ``videos/train/<class>/000{0,1}.mp4`` (48x48) plus ``wide.mp4`` (64x40), and
    ``train.txt`` listing them all."""
    root = tmp_path_factory.mktemp("prepare") / "src"
    data = make_dataset(root, num_train_per_class=2, num_val_per_class=0, num_frames=FRAMES, size=48, fps=FPS,
                        progress=False)  # fmt: skip
    frames = np.random.default_rng(0).integers(0, 256, size=(FRAMES, 40, 64, 3), dtype=np.uint8)
    write_video(root / "wide.mp4", frames, fps=FPS)
    data.train_list.write_text(data.train_list.read_text() + "wide.mp4 1\n")
    return root


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, by relative path."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def keyframes(path: Path) -> list[int]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = [packet for packet in container.demux(stream) if packet.size]
    return [index for index, packet in enumerate(packets) if packet.is_keyframe]


def videos_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix in (".mp4", ".tmp"))


# ---------------------------------------------------------------------------------------------- outputs


def test_outputs_have_the_short_side_every_frame_and_the_labels(source, tmp_path):
    before = snapshot(source)
    result = prepare_videos(source, source / "train.txt", tmp_path, short_side=32, keyframe_interval=4,
                            workers=2, progress=False)  # fmt: skip
    listed = read_list(source / "train.txt")
    prepared = read_list(result.list_path)
    assert result.list_path == tmp_path / "train.txt" and not result.failed and not result.existing
    assert [(e.path, e.label) for e in prepared] == [(e.path, e.label) for e in listed]  # already .mp4
    assert result.done == [e.path for e in prepared]
    for entry in prepared:
        meta = probe(tmp_path / entry.path)
        expected = (52, 32) if entry.path == "wide.mp4" else (32, 32)  # 64x40 scaled by 0.8, even sizes
        assert (meta.width, meta.height) == expected
        assert meta.num_frames == FRAMES and meta.fps == FPS
        assert keyframes(tmp_path / entry.path) == [0, 4, 8, 12]
    assert result.failures_path.read_text() == ""
    assert snapshot(source) == before


def test_a_rotated_video_is_written_upright(tmp_path):
    coded = np.zeros((FRAMES, 40, 64, 3), dtype=np.uint8)
    coded[:, :20, :32] = 255  # one bright corner, which the turn moves elsewhere
    (tmp_path / "src").mkdir()
    with av.open(str(tmp_path / "src" / "turned.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=int(FPS))
        stream.width, stream.height, stream.pix_fmt = 64, 40, "yuv420p"
        stream.set_display_rotation(90)
        for image in coded:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    (tmp_path / "list.txt").write_text("turned.mp4 0\n")
    result = prepare_videos(tmp_path / "src", tmp_path / "list.txt", tmp_path / "out", short_side=32,
                            progress=False)  # fmt: skip
    shown = read_frames(tmp_path / "src" / "turned.mp4", [0])[0]  # upright, 40 wide and 64 high
    meta = probe(tmp_path / "out" / result.done[0])
    assert (meta.width, meta.height, meta.rotation) == (32, 52, 0)
    written = read_frames(tmp_path / "out" / result.done[0], [0])[0]

    def bright_quadrant(image: np.ndarray) -> tuple[int, int]:
        h, w = image.shape[0] // 2, image.shape[1] // 2
        means = [[image[r * h : (r + 1) * h, c * w : (c + 1) * w].mean() for c in (0, 1)] for r in (0, 1)]
        return np.unravel_index(np.argmax(means), (2, 2))

    assert bright_quadrant(written) == bright_quadrant(shown)


def test_sizes_keep_the_aspect_are_even_and_never_grow():
    assert output_size(1920, 1080, 256) == (456, 256)
    assert output_size(360, 640, 256) == (256, 456)  # portrait
    assert output_size(48, 48, 256) == (48, 48)
    assert output_size(101, 75, 64) == (86, 64)


def test_trimming_csv_cuts_the_clips_kinetics_style(source, tmp_path):
    trims = tmp_path / "kinetics_train.csv"
    trims.write_text(
        "label,youtube_id,time_start,time_end,split,is_cc\n"
        "left,0000,0.5,1.5,train,0\n"  # 0000 is in every class folder: the label's is taken
        "up,0001,0,1,train,0\n"
        "right,0000,1,5,train,0\n"  # ends after the video: cut at its end
        "up,gone,0,1,train,0\n"
    )
    out = tmp_path / "out"
    result = prepare_videos(source / "videos" / "train", None, out, trim=trims, short_side=32, progress=False)
    assert read_class_names(result.classes_file) == ["left", "right", "up"]
    prepared = {entry.path: entry.label for entry in read_list(out / "kinetics_train.txt")}
    assert prepared == {
        "left/0000_000000.500_000001.500.mp4": 0,
        "up/0001_000000_000001.mp4": 2,
        "right/0000_000001_000005.mp4": 1,
    }
    for path, seconds in [("left/0000_000000.500_000001.500.mp4", 1.0), ("up/0001_000000_000001.mp4", 1.0),
                          ("right/0000_000001_000005.mp4", 1.0)]:  # fmt: skip
        meta = probe(out / path)
        assert meta.num_frames == round(seconds * FPS) and meta.duration == pytest.approx(seconds)
    [failure] = result.failed
    assert failure.where == f"{trims}:5" and "not found" in failure.reason
    assert (out / "kinetics_train_failures.txt").read_text() == f"{failure}\n"

    # The validation CSV, into the same out-root, is numbered by the training CSV's classes.txt.
    (tmp_path / "kinetics_val.csv").write_text("label,youtube_id,time_start,time_end\nup,0000,0,1\n")
    val = prepare_videos(source / "videos" / "train", None, out, trim=tmp_path / "kinetics_val.csv",
                         short_side=32, progress=False)  # fmt: skip
    assert val.classes_file == out / "classes.txt"
    assert read_class_names(out / "classes.txt") == ["left", "right", "up"]
    assert [(e.path, e.label) for e in read_list(val.list_path)] == [("up/0000_000000_000001.mp4", 2)]


def test_the_first_frames_of_a_trimmed_clip_are_the_sources(source, tmp_path):
    # Frames 4..11 of the source (0.5 s to 1.5 s at 8 fps), compared at the source's size.
    trims = tmp_path / "cut.csv"
    trims.write_text("videos/train/up/0000.mp4,0.5,1.5,3\n")  # no header: video,start,end,label
    result = prepare_videos(source, None, tmp_path / "out", trim=trims, short_side=48, progress=False)
    [entry] = read_list(result.list_path)
    assert entry.label == 3 and result.classes_file is None
    with av.open(str(source / "videos/train/up/0000.mp4")) as container:
        original = [f.to_ndarray(format="rgb24").astype(int) for f in container.decode(video=0)]
    with av.open(str(tmp_path / "out" / entry.path)) as container:
        cut = [f.to_ndarray(format="rgb24").astype(int) for f in container.decode(video=0)]
    assert len(cut) == 8
    errors = [[np.abs(c - o).mean() for o in original] for c in cut]
    assert [int(np.argmin(row)) for row in errors] == list(range(4, 12))


def test_trimming_files_are_checked_line_by_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("video,start,end\na,1,2\nb,3,2\n")
    with pytest.raises(ListFileError, match=rf"^{path}:3: end time 2 is not after the start time 3$"):
        read_trims(path)
    path.write_text("youtube_id,label\na,x\n")
    with pytest.raises(ListFileError, match=rf"^{path}:1: .*no start time column"):
        read_trims(path)
    path.write_text("a.mp4,0,1.5\na.mp4,0,1.5\n")
    with pytest.raises(ListFileError, match=rf"^{path}:2: .*listed twice \(first on line 1\)"):
        read_trims(path)
    path.write_text("\ufeffa.mp4,0,1.5,walk\n")
    [row] = read_trims(path)
    assert (row.video, row.start, row.end, row.label, row.line) == ("a.mp4", 0.0, 1.5, "walk", 1)


# --------------------------------------------------------------------------------------- resuming, safety

# Run in a child process, then killed: the second video stalls once all its frames went to the encoder,
# whose first packets are then in the temporary file (one encoder thread holds back fewer than 16 frames),
# the last ones not yet. A marker file says when.
_STALLED_RUN = """
import sys, time
from pathlib import Path
import evl.video.reencode as reencode
from evl.video.prepare import prepare_videos

original, calls = reencode._write_mp4, []

def stalled(path, frames, meta, settings, tag, encoder, threads):
    calls.append(path)
    if len(calls) == 2:
        def slow(frames=frames):
            yield from frames
            Path(sys.argv[4]).touch()
            time.sleep(120)
        frames, threads = slow(), 1
    return original(path, frames, meta, settings, tag, encoder, threads)

reencode._write_mp4 = stalled
prepare_videos(sys.argv[1], sys.argv[2], sys.argv[3], short_side=32, workers=1, progress=False)
"""


def test_a_killed_run_resumes_with_every_video_once(source, tmp_path):
    before = snapshot(source)
    out = tmp_path / "out"
    stalled = tmp_path / "stalled"
    args = [str(source), str(source / "train.txt"), str(out), str(stalled)]
    child = subprocess.Popen([sys.executable, "-c", _STALLED_RUN, *args])
    try:
        deadline = time.monotonic() + 60
        while not stalled.exists():
            assert child.poll() is None and time.monotonic() < deadline, "the run ended before being killed"
            time.sleep(0.05)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    left = videos_under(out)
    assert len([name for name in left if name.endswith(".tmp")]) == 1
    assert len([name for name in left if name.endswith(".mp4")]) == 1  # the first video only

    result = prepare_videos(source, source / "train.txt", out, short_side=32, workers=2, progress=False)
    listed = [entry.path for entry in read_list(source / "train.txt")]
    assert len(result.existing) == 1 and len(result.done) == len(listed) - 1 and not result.failed
    assert videos_under(out) == sorted(listed)  # the temporary file is gone, each output there once
    assert [entry.path for entry in read_list(result.list_path)] == listed
    for path in listed:
        assert probe(out / path).num_frames == FRAMES
    assert snapshot(source) == before

    again = prepare_videos(source, source / "train.txt", out, short_side=32, workers=2, progress=False)
    assert sorted(again.existing) == sorted(listed) and not again.done


def test_other_settings_replace_outputs_but_other_files_are_left_alone(source, tmp_path):
    listing = tmp_path / "two.txt"
    listing.write_text("videos/train/left/0000.mp4 0\nvideos/train/up/0000.mp4 2\n")
    prepare_videos(source, listing, tmp_path / "out", short_side=32, progress=False)
    mine = tmp_path / "out" / "videos/train/up/0000.mp4"
    mine.write_bytes((source / "wide.mp4").read_bytes())  # someone else's file at an output's path
    result = prepare_videos(source, listing, tmp_path / "out", short_side=24, progress=False)
    assert result.done == ["videos/train/left/0000.mp4"]  # made at 32 px: made again at 24
    assert probe(tmp_path / "out" / result.done[0]).width == 24
    [failure] = result.failed
    assert failure.where == f"{listing}:2" and "not written by evl prepare" in failure.reason
    assert mine.read_bytes() == (source / "wide.mp4").read_bytes()
    assert [entry.path for entry in read_list(result.list_path)] == result.done


def test_missing_and_unreadable_videos_are_reported(source, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "empty.mp4").write_bytes(b"")
    (tmp_path / "src" / "good.mp4").write_bytes((source / "wide.mp4").read_bytes())
    listing = tmp_path / "list.txt"
    listing.write_text("good.mp4 0\nempty.mp4 1\nmissing.avi 2\n")
    result = prepare_videos(tmp_path / "src", listing, tmp_path / "out", short_side=32, progress=False)
    assert result.done == ["good.mp4"]
    report = result.failures_path.read_text().splitlines()
    assert report == [
        f"{listing}:2: {tmp_path / 'src' / 'empty.mp4'}: empty file (0 bytes)",
        f"{listing}:3: {tmp_path / 'src' / 'missing.avi'}: file not found",
    ]


def test_an_out_root_inside_the_source_is_refused(source, tmp_path):
    before = snapshot(source)
    for out in (source, source / "prepared", source / "videos" / "train"):
        with pytest.raises(ValueError, match="inside the source folder") as info:
            prepare_videos(source, source / "train.txt", out, progress=False)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="holds the source folder"):
        prepare_videos(source, source / "train.txt", source.parent, progress=False)
    assert snapshot(source) == before and not (source / "prepared").exists()


def test_list_paths_leaving_the_source_are_refused(source, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("videos/train/left/0000.mp4 0\n../elsewhere.mp4 1\n")
    with pytest.raises(ListFileError, match=rf"^{listing}:2: ../elsewhere.mp4 is not under the source"):
        prepare_videos(source, listing, tmp_path / "out", progress=False)
    listing.write_text("a.avi 0\na.mkv 1\n")
    with pytest.raises(ListFileError, match=rf"^{listing}:2: its output a.mp4 is also the output of"):
        prepare_videos(source, listing, tmp_path / "out", progress=False)


# ------------------------------------------------------------------------------------------- command line
# `evl prepare` through the command line (parser and handler: evl/cli/data.py).


def test_evl_prepare_command(source, tmp_path, capsys):
    from evl.cli import main

    args = ["prepare", str(source), str(source / "train.txt"), "--out-root", str(tmp_path),
            "--short-side", "32", "--keyframe-interval", "8", "--workers", "2", "--quiet"]  # fmt: skip
    assert main(args) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("prepared 9 videos, kept 0 from an earlier run, 0 failed")
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("prepared 0 videos, kept 9")
    assert keyframes(tmp_path / "wide.mp4") == [0, 8]
    assert main(["prepare", str(source), str(source / "train.txt"), "--out-root", str(source / "x")]) == 2
    assert "inside the source folder" in capsys.readouterr().err
