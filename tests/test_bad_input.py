"""Bad input never crashes a run: broken list files and broken videos, through ``evl train`` and ``evl eval``.

Every case ends one of three documented ways, never in a traceback:

* a list-file problem is a one-line error naming ``file:line`` before anything is trained or evaluated,
  exit status 2;
* a video that cannot be decoded is skipped with a warning and counted (``skipped_videos.txt`` in the run
  directory, or in the evaluation folder with the count in the summary and the metrics JSON), or, with
  ``--on-bad-video error``, is a one-line error with exit status 2;
* odd but valid input (gray or RGBA frames, a 4000x16 frame, one frame, fewer frames than a clip, CRLF,
  blank lines, a file name that is not UTF-8) is used like any other.

Videos are 32x32 and 8 frames long; clips are 4 frames at stride 2, so a clip spans every frame and damage
anywhere in a video is decoded. Each training run is one step over one epoch of 5 videos, so a bad video is
met exactly once.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest

from evl.cli import main
from evl.video.encode import write_video
from evl.video.lists import VideoEntry, read_list
from evl.video.lists import write_list as write_entries

SIZE, FRAMES = 32, 8
CLASSES = ("a", "b", "c")
NUM_GOOD = 4  # good videos in every list; a decode case adds one bad video as entry 5


def frames(num: int = FRAMES, height: int = SIZE, width: int = SIZE, seed: int = 0) -> np.ndarray:
    """uint8 [num, height, width, 3]: a flat colour per video with a little noise."""
    rng = np.random.default_rng(seed)
    colour = rng.integers(0, 256, (1, 1, 1, 3))
    noise = rng.integers(-20, 21, (num, height, width, 3))
    return np.clip(colour + noise, 0, 255).astype(np.uint8)


def write_pyav(path: Path, images: np.ndarray, codec: str, pix_fmt: str, src_format: str = "rgb24") -> Path:
    """Encode with PyAV directly, for pixel formats ``write_video`` does not offer (gray, alpha)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = images.shape[2], images.shape[1], pix_fmt
        for image in images:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format=src_format)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def cli(capsys: pytest.CaptureFixture, args: list[str]) -> tuple[int, str, str]:
    """Run ``evl`` in-process; returns (exit status, stdout, stderr), none of which may hold a traceback."""
    capsys.readouterr()
    status = main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, out + err
    return status, out, err


def one_line_error(err: str, command: str) -> str:
    """The message of a one-line ``evl <command>: error: ...`` on stderr."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"evl {command}: error: "), err
    return lines[0].removeprefix(f"evl {command}: error: ")


def write_list(path: Path, lines: list[str], newline: str = "\n") -> Path:
    """A list file, byte for byte: a path that is not UTF-8 is written as its raw file-name bytes."""
    path.write_bytes(b"".join(os.fsencode(line) + newline.encode() for line in lines))
    return path


@dataclass(frozen=True)
class Good:
    root: Path
    lines: list[str]  # "abs/path.mp4 label", usable from any data root
    classes: Path


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Good:
    root = tmp_path_factory.mktemp("good")
    lines = []
    for k in range(NUM_GOOD):
        path = write_video(root / f"good{k}.mp4", frames(seed=k))
        lines.append(f"{path} {k % len(CLASSES)}")
    classes = root / "classes.txt"
    classes.write_text("".join(f"{name}\n" for name in CLASSES))
    return Good(root, lines, classes)


def train_args(good: Good, train_list: Path, data_root: Path, out: Path, policy: str, workers: int = 0):
    return [
        "train",
        "--data-root", str(data_root),
        "--train-list", str(train_list),
        "--classes", str(good.classes),
        "--backbone", "random:ViT-T/16@112",
        "--set", "backbone.heads=3",
        "--num-frames", "4",
        "--frame-stride", "2",
        "--steps", "1",
        "--batch-size", str(NUM_GOOD + 1),
        "--num-workers", str(workers),
        "--decoder-layers", "1",
        "--set", "data.rand_augment=null",
        "--on-bad-video", policy,
        "--output-dir", str(out),
        "--quiet",
    ]  # fmt: skip


def eval_args(run: Path, val_list: Path, data_root: Path, out: Path, workers: int = 0) -> list[str]:
    return [
        "eval", str(run),
        "--val-list", str(val_list),
        "--data-root", str(data_root),
        "--num-workers", str(workers),
        "--batch-size", "8",
        "--out-dir", str(out),
        "--output", str(out / "metrics.json"),
        "--quiet",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(good, tmp_path_factory) -> dict[str, Path]:
    """One trained run per policy (the run's ``data.on_bad_video`` is what ``evl eval`` applies)."""
    base = tmp_path_factory.mktemp("runs")
    train_list = write_list(base / "train.txt", good.lines)
    out = {}
    for policy in ("skip", "error"):
        out[policy] = base / policy
        assert main(train_args(good, train_list, base, out[policy], policy)) == 0
    return out


# ------------------------------------------------------------------------------------------ broken videos


def _zero_bytes(root: Path) -> str:
    (root / "empty.mp4").touch()
    return "empty.mp4"


def _truncated_mp4(root: Path) -> str:
    # write_video puts the sample table (moov) last: half a file has none, and cannot even be opened.
    data = write_video(root / "src.mp4", frames()).read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    return "truncated.mp4"


def _truncated_data(root: Path) -> str:
    # With the sample table first (faststart), the file opens and promises 8 frames; the last ones are gone.
    with av.open(str(root / "src.mp4"), "w", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        for image in frames():
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = (root / "src.mp4").read_bytes()
    (root / "cut.mp4").write_bytes(data[: int(len(data) * 0.6)])
    return "cut.mp4"


def _text_as_mp4(root: Path) -> str:
    (root / "notes.mp4").write_text("this is a text file, not a video\n")
    return "notes.mp4"


def _audio_only(root: Path) -> str:
    with av.open(str(root / "audio.m4a"), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for k in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, k * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    (root / "audio.m4a").rename(root / "audio.mp4")
    return "audio.mp4"


def _no_frames(root: Path) -> str:
    # Shorter than one frame: Matroska keeps a declared video stream that received no packet at all.
    with av.open(str(root / "no_frames.mkv"), "w") as container:
        video = container.add_stream("libx264rgb", rate=25)
        video.width, video.height, video.pix_fmt = SIZE, SIZE, "rgb24"
        audio = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        for packet in [*audio.encode(frame), *audio.encode()]:
            container.mux(packet)
    return "no_frames.mkv"


def _corrupt_frame(root: Path, name: str, start: Callable[[int], int], length: Callable[[int], int]) -> str:
    """Overwrite bytes of the 5th of 8 frames' packet in place (offset and length from its size)."""
    path = write_video(root / name, frames())
    with av.open(str(path)) as container:
        packets = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    pos, size = packets[4]
    data = bytearray(path.read_bytes())
    begin = pos + start(size)
    data[begin : begin + length(size)] = b"\xff" * length(size)
    path.write_bytes(bytes(data))
    return name


def _corrupt_frame_header(root: Path) -> str:
    # The NAL length prefix and header are gone: FFmpeg reports invalid data.
    return _corrupt_frame(root, "bad_frame.mp4", start=lambda size: 0, length=lambda size: size)


def _corrupt_frame_payload(root: Path) -> str:
    # 16 bytes inside the slice data: FFmpeg conceals the damaged blocks and reports nothing.
    return _corrupt_frame(root, "noisy_frame.mp4", start=lambda size: size // 2, length=lambda size: 16)


def _unreadable(root: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    path = write_video(root / "locked.mp4", frames())
    path.chmod(0)
    try:
        path.open("rb").close()
    except PermissionError:
        return "locked.mp4"  # an ordinary user: the OS itself refuses the read
    # root reads any file whatever its mode: make the open fail the way it fails for everyone else.
    real_open = av.open

    def refusing_open(file, *args, **kwargs):
        if os.fspath(file) == str(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(av, "open", refusing_open)
    return "locked.mp4"


def _missing(root: Path) -> str:
    return "missing.mp4"


def _parent_is_a_file(root: Path) -> str:
    (root / "clips").write_text("a file where a folder is expected\n")
    return "clips/a.mp4"


def _directory(root: Path) -> str:
    (root / "folder.mp4").mkdir()
    return "folder.mp4"


def _huge_declared_size(root: Path) -> str:
    # A YUV4MPEG header declares the size in plain text; the single frame's data is not there.
    header = b"YUV4MPEG2 W16000 H16000 F25:1 Ip A1:1 C420jpeg\nFRAME\n"
    (root / "huge.y4m").write_bytes(header + bytes(1000))
    return "huge.y4m"


def _wide(root: Path) -> str:
    write_video(root / "wide.mp4", frames(height=16, width=4000))
    return "wide.mp4"


def _grayscale(root: Path) -> str:
    write_pyav(root / "gray.mkv", frames(), codec="ffv1", pix_fmt="gray")
    return "gray.mkv"


def _rgba(root: Path) -> str:
    alpha = np.full((FRAMES, SIZE, SIZE, 1), 128, np.uint8)
    rgba = np.concatenate([frames(), alpha], axis=-1)
    write_pyav(root / "alpha.mov", rgba, codec="png", pix_fmt="rgba", src_format="rgba")
    return "alpha.mov"


def _one_frame(root: Path) -> str:
    write_video(root / "one.mp4", frames(num=1))
    return "one.mp4"


def _shorter_than_clip(root: Path) -> str:
    write_video(root / "short.mp4", frames(num=3))  # a clip spans 8 frames
    return "short.mp4"


NON_UTF8 = os.fsdecode(b"caf\xe9.mp4")  # Latin-1 "café.mp4": not UTF-8, kept as a lone surrogate


def _non_utf8_name(root: Path) -> str:
    write_video(root / "cafe.mp4", frames())
    os.rename(os.fsencode(root / "cafe.mp4"), os.fsencode(root / NON_UTF8))
    return NON_UTF8


def _non_utf8_name_missing(root: Path) -> str:
    return NON_UTF8


@dataclass(frozen=True)
class VideoCase:
    make: Callable[..., str]  # (data root[, monkeypatch]) -> the path written in the list
    skipped: str | None  # what the skip reason says; None: the video is decoded and used


VIDEO_CASES = {
    "zero-bytes": VideoCase(_zero_bytes, "empty file (0 bytes)"),
    "truncated-mp4": VideoCase(_truncated_mp4, "not a readable video file"),
    "truncated-data": VideoCase(_truncated_data, "corrupted video data"),
    "text-named-mp4": VideoCase(_text_as_mp4, "not a readable video file"),
    "audio-only": VideoCase(_audio_only, "no video stream (streams found: audio)"),
    "no-frames": VideoCase(_no_frames, "no decodable video frames"),
    "corrupt-frame-header": VideoCase(_corrupt_frame_header, "corrupted video data"),
    "corrupt-frame-payload": VideoCase(_corrupt_frame_payload, None),
    "unreadable": VideoCase(_unreadable, "permission denied"),
    "missing": VideoCase(_missing, "file not found"),
    "parent-is-a-file": VideoCase(_parent_is_a_file, "file not found (a parent of it is a file)"),
    "directory": VideoCase(_directory, "is a directory"),
    "huge-declared-size": VideoCase(_huge_declared_size, "frame size 16000x16000 is too large"),
    "wide-4000x16": VideoCase(_wide, None),
    "grayscale": VideoCase(_grayscale, None),
    "rgba": VideoCase(_rgba, None),
    "one-frame": VideoCase(_one_frame, None),
    "shorter-than-clip": VideoCase(_shorter_than_clip, None),
    "non-utf8-name": VideoCase(_non_utf8_name, None),
    "non-utf8-name-missing": VideoCase(_non_utf8_name_missing, "file not found"),
}


@pytest.fixture(params=list(VIDEO_CASES))
def video_case(request, tmp_path, good, monkeypatch) -> tuple[VideoCase, Path, Path, str]:
    """(case, data root, list of 4 good videos + the bad one, the bad video's path as reports show it)."""
    case = VIDEO_CASES[request.param]
    root = tmp_path / "data"
    root.mkdir()
    make = case.make
    relpath = make(root, monkeypatch) if make is _unreadable else make(root)
    listed = write_list(tmp_path / "list.txt", [*good.lines, f"{relpath} 0"])
    shown = os.fsdecode(root / relpath).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return case, root, listed, shown


def test_bad_video_in_training(video_case, tmp_path, good, capsys):
    case, root, listed, shown = video_case
    run = tmp_path / "run"
    status, out, warnings = cli(capsys, train_args(good, listed, root, run, "skip"))
    assert status == 0
    log = run / "skipped_videos.txt"
    if case.skipped is None:
        assert not log.exists() and "warning: skipped" not in out + warnings
    else:
        # Met once in the one epoch: one warning, one record "path<TAB>reason".
        [record] = log.read_text(encoding="utf-8").splitlines()
        path, reason = record.split("\t")
        assert path == shown and reason.startswith(f"{shown}: ") and case.skipped in reason
        assert warnings.count("warning: skipped undecodable video") == 1  # on stderr

        # --on-bad-video error: the same video ends the run with a one-line error instead.
        status, out, err = cli(capsys, train_args(good, listed, root, tmp_path / "strict", "error"))
        assert status == 2
        message = one_line_error(err, "train")
        assert message.startswith(f"{shown}: ") and case.skipped in message


def test_bad_video_in_evaluation(video_case, runs, tmp_path, capsys):
    case, root, listed, shown = video_case
    out_dir = tmp_path / "eval"
    status, out, err = cli(capsys, eval_args(runs["skip"], listed, root, out_dir))
    assert status == 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    skipped = 0 if case.skipped is None else 1
    decoded = NUM_GOOD + 1 - skipped
    assert f"({decoded} videos, {skipped} skipped;" in out
    assert (metrics["num_videos"], metrics["num_skipped"], metrics["num_listed"]) == (decoded, skipped, 5)
    # Both denominators: over decoded videos, and over all listed ones with a skipped video counted wrong.
    assert metrics["top1_listed"] == pytest.approx(metrics["top1"] * decoded / 5)
    assert metrics["top5_listed"] == pytest.approx(metrics["top5"] * decoded / 5)
    scored = (out_dir / "scores.csv").read_text(encoding="utf-8").splitlines()
    assert len(scored) == 1 + decoded and sum(line.startswith(f"{shown},") for line in scored) == 1 - skipped
    log = out_dir / "skipped_videos.txt"
    if case.skipped is None:
        assert not log.exists() and err.strip() == ""
    else:
        [record] = log.read_text(encoding="utf-8").splitlines()
        path, reason = record.split("\t")
        assert path == shown and case.skipped in reason
        assert err.strip() == f"skipped: {shown}: {reason}"

        # A run trained with --on-bad-video error evaluates with that policy too.
        status, out, err = cli(capsys, eval_args(runs["error"], listed, root, tmp_path / "strict"))
        assert status == 2
        message = one_line_error(err, "eval")
        assert message.startswith(f"{shown}: ") and case.skipped in message


@pytest.mark.parametrize("command", ["train", "eval"])
def test_error_policy_in_a_loader_worker_is_still_one_line(command, good, runs, tmp_path, capsys):
    root = tmp_path / "data"
    root.mkdir()
    listed = write_list(tmp_path / "list.txt", [*good.lines, f"{_text_as_mp4(root)} 0"])
    if command == "train":
        args = train_args(good, listed, root, tmp_path / "run", "error", workers=1)
    else:
        args = eval_args(runs["error"], listed, root, tmp_path / "eval", workers=1)
    status, _, err = cli(capsys, args)
    assert status == 2
    assert one_line_error(err, command) == (
        f"{root / 'notes.mp4'}: not a readable video file (Invalid data found when processing input)"
    )


def test_no_decodable_video_at_all(good, runs, tmp_path, capsys):
    root = tmp_path / "data"
    root.mkdir()
    listed = write_list(tmp_path / "list.txt", [f"{_zero_bytes(root)} 0", f"{_missing(root)} 1"])
    status, _, err = cli(capsys, train_args(good, listed, root, tmp_path / "run", "skip"))
    assert status == 2
    message = one_line_error(err, "train")
    assert message.startswith("2 videos in a row could not be decoded (is the data root right?); the last: ")
    assert message.endswith(("empty.mp4: empty file (0 bytes)", "missing.mp4: file not found"))

    out_dir = tmp_path / "eval"
    status, out, _ = cli(capsys, eval_args(runs["skip"], listed, root, out_dir))
    assert status == 0 and "(0 videos, 2 skipped;" in out
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert (metrics["num_videos"], metrics["num_skipped"], metrics["num_listed"]) == (0, 2, 2)
    assert np.isnan(metrics["top1"]) and metrics["top1_listed"] == 0.0
    assert len((out_dir / "skipped_videos.txt").read_text().splitlines()) == 2


# ------------------------------------------------------------------------------------------ broken lists


@dataclass(frozen=True)
class ListCase:
    lines: Callable[[list[str]], list[str]]  # the good lines -> the list's lines
    error: tuple[int | None, str, ...] | None  # (line, what the message says...); None: the list is accepted
    newline: str = "\n"


def _with(extra: str) -> Callable[[list[str]], list[str]]:
    return lambda good: [*good, extra.format(video=good[0].rsplit(maxsplit=1)[0])]


LIST_CASES = {
    "negative-label": ListCase(_with("{video}_x -1"), (5, "label -1 is negative")),
    "non-integer-label": ListCase(_with("{video}_x 1.5"), (5, "label '1.5' is not an integer")),
    "class-name-as-label": ListCase(_with("{video}_x b"), (5, "label 'b' is not an integer")),
    "label-out-of-range": ListCase(
        _with("{video}_x 3"), (5, "label 3 out of range for num_classes=3 (valid labels are 0..2)")
    ),
    "no-label": ListCase(_with("{video}_x"), (5, "no label")),
    "duplicate-entry": ListCase(_with("{video} 0"), (5, "duplicate entry", "(first on line 1)")),
    "nul-in-path": ListCase(_with("{video}\0x 0"), (5, "contains a NUL byte")),
    "empty-list": ListCase(lambda good: ["", "# nothing here"], (None, "empty list file (no entries)")),
    "blank-lines": ListCase(lambda good: ["", *"\n\n".join(good).split("\n"), "", "   "], None),
    "crlf": ListCase(lambda good: good, None, newline="\r\n"),
}


@pytest.mark.parametrize("name", list(LIST_CASES))
def test_bad_list_file(name, good, runs, tmp_path, capsys):
    case = LIST_CASES[name]
    listed = write_list(tmp_path / "list.txt", case.lines(good.lines), newline=case.newline)
    train = train_args(good, listed, tmp_path, tmp_path / "run", "skip")
    evaluate = eval_args(runs["skip"], listed, tmp_path, tmp_path / "eval")
    for command, args in (("train", train), ("eval", evaluate)):
        status, out, err = cli(capsys, args)
        if case.error is None:
            assert status == 0, err
            if command == "eval":
                assert f"({NUM_GOOD} videos, 0 skipped;" in out
            continue
        line, *fragments = case.error
        assert status == 2
        message = one_line_error(err, command)
        assert message.startswith(f"{listed}:{line}: " if line else f"{listed}: ")
        assert all(fragment in message for fragment in fragments), message
        assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training


def test_missing_or_utf16_list_file(good, tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    status, _, err = cli(capsys, train_args(good, missing, tmp_path, tmp_path / "run", "skip"))
    assert status == 2 and one_line_error(err, "train") == f"{missing}: list file not found"
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes("\n".join(good.lines).encode("utf-16"))
    status, _, err = cli(capsys, train_args(good, utf16, tmp_path, tmp_path / "run", "skip"))
    assert status == 2
    assert one_line_error(err, "train") == f"{utf16}: list file is UTF-16 text; save it as UTF-8"


def test_class_names_file_not_utf8_names_the_line(good, tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_bytes(b"a\ncaf\xe9\nc\n")  # Latin-1: class names are text, so this is an error
    args = train_args(good, write_list(tmp_path / "list.txt", good.lines), tmp_path, tmp_path / "run", "skip")
    args[args.index("--classes") + 1] = str(classes)
    status, _, err = cli(capsys, args)
    assert status == 2
    assert one_line_error(err, "train") == (
        f"{classes}:2: class-names file is not UTF-8 text (byte 0xe9 at column 4)"
    )


def test_list_with_a_non_utf8_file_name_round_trips(tmp_path):
    entries = [VideoEntry(NON_UTF8, 1, 1), VideoEntry("plain.mp4", 0, 2)]
    path = tmp_path / "list.txt"
    write_entries(path, entries)
    assert path.read_bytes() == b"caf\xe9.mp4 1\nplain.mp4 0\n"
    assert read_list(path) == entries


def test_damaged_run_config_is_one_line_naming_the_file_and_line(runs, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(runs["skip"], run_dir)
    config = run_dir / "config.json"
    lines = config.read_text().splitlines()
    config.write_text("\n".join([*lines[:3], '  "run": {,', *lines[3:]]) + "\n")  # an edit gone wrong
    status, _, err = cli(capsys, ["predict", str(run_dir), str(tmp_path)])
    assert status == 2
    assert one_line_error(err, "predict").startswith(f"{config}:4: invalid JSON")
