"""Tests for evl.video.decode: exact frame indices across frame rates, seeking, rotation and broken files."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from evl.video import decode
from evl.video.decode import VideoDecodeError, VideoMeta, iter_frames, probe, read_frames
from evl.video.encode import write_video

H, W = 32, 48
BANDS = 6  # frame k shows the bits of k as 6 black/white vertical bands, 8 px each


def index_frames(num_frames: int) -> np.ndarray:
    """uint8 [T, H, W, 3]: frame k encodes k in bands (readable even after lossy coding) and a marker.

    The red channel also carries 4k, so lossless decodes can be compared exactly; the top-left 4x4
    corner is marked so that orientation can be checked.
    """
    assert num_frames <= 2**BANDS
    frames = np.zeros((num_frames, H, W, 3), dtype=np.uint8)
    for k in range(num_frames):
        for bit in range(BANDS):
            if k >> bit & 1:
                frames[k, :, bit * 8 : (bit + 1) * 8, 1:] = 255
        frames[k, ..., 0] = 4 * k
        frames[k, :4, :4] = (250, 10, 10)
    return frames


def read_index(image: np.ndarray) -> int:
    """The frame number written by :func:`index_frames` (from the bands, below the marker rows)."""
    bands = image[8:, :, 1].reshape(H - 8, BANDS, 8).mean(axis=(0, 2))
    return int(sum(1 << bit for bit in range(BANDS) if bands[bit] > 127))


def write_pyav(
    path: Path,
    frames: np.ndarray,
    *,
    rate: Fraction | int = 25,
    pts: list[int] | None = None,
    time_base: Fraction | None = None,
    codec: str = "libx264rgb",
    pix_fmt: str = "rgb24",
    options: dict[str, str] | None = None,
    rotation: int = 0,
    container_options: dict[str, str] | None = None,
) -> Path:
    """Encode with PyAV directly, for what ``write_video`` does not expose (GOP, pts, rotation)."""
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        stream.options = {"qp": "0", "preset": "ultrafast"} if options is None else options
        if time_base is not None:
            stream.codec_context.time_base = time_base
        if rotation:
            stream.set_display_rotation(rotation)
        for k, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[k], time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def frames60() -> np.ndarray:
    return index_frames(60)


@pytest.fixture(scope="module")
def video60(tmp_path_factory, frames60) -> Path:
    """Lossless, 25 fps, 60 frames, every frame a keyframe candidate (x264 ultrafast defaults)."""
    return write_video(tmp_path_factory.mktemp("v") / "v60.mp4", frames60, fps=25.0, lossless=True)


@pytest.fixture(scope="module")
def gop_video(tmp_path_factory, frames60) -> Path:
    """Lossless, a keyframe every 5 frames and no scene-cut keyframes."""
    options = {"qp": "0", "preset": "ultrafast", "g": "5", "keyint_min": "5", "sc_threshold": "0"}
    return write_pyav(tmp_path_factory.mktemp("v") / "gop.mp4", frames60, options=options)


# ----------------------------------------------------------------------------------------------- probe


def test_probe_reads_stream_metadata(video60):
    meta = probe(video60)
    assert meta == VideoMeta(str(video60), 60, 25.0, 2.4, W, H, 0)


def test_probe_estimates_frame_count_when_container_has_none(tmp_path, frames60):
    path = write_video(tmp_path / "v.mkv", frames60, fps=25.0, lossless=True)  # mkv stores no count
    meta = probe(path)
    assert (meta.num_frames, meta.fps, meta.width, meta.height) == (60, 25.0, W, H)
    assert meta.duration == pytest.approx(2.4)


def test_probe_counts_packets_without_duration(tmp_path, frames60):
    # A raw H.264 stream has neither a frame count, a duration nor timestamps.
    path = write_pyav(tmp_path / "v.h264", frames60[:20], codec="libx264", pix_fmt="yuv420p", options={})
    meta = probe(path)
    assert meta.num_frames == 20
    assert meta.duration == pytest.approx(20 / meta.fps)


# ------------------------------------------------------------------------------------------ read_frames


@pytest.mark.parametrize(
    "indices",
    [[0, 1, 2, 3], [7, 2, 59, 0, 31], [4, 4, 0, 4], [58, 59, 60, 200], [12]],
    ids=["sorted", "unsorted", "repeated", "past-end", "single"],
)
def test_read_frames_returns_exact_frames_in_request_order(video60, frames60, indices):
    out = read_frames(video60, indices)
    expected = frames60[np.minimum(indices, 59)]
    assert out.dtype == np.uint8 and out.shape == (len(indices), H, W, 3)
    np.testing.assert_array_equal(out, expected)


def test_read_frames_seeks_deep_into_a_video_with_keyframe_interval(gop_video, frames60):
    indices = [47, 45, 59, 52, 44]
    np.testing.assert_array_equal(read_frames(gop_video, indices), frames60[indices])


def test_read_frames_decodes_only_from_the_keyframe_before_the_request(gop_video, frames60, monkeypatch):
    decoded = []
    iter_frames = decode._iter_frames

    def counting(container, stream):
        for frame in iter_frames(container, stream):
            decoded.append(frame.pts)
            yield frame

    monkeypatch.setattr(decode, "_iter_frames", counting)
    out = read_frames(gop_video, [57, 58])
    np.testing.assert_array_equal(out, frames60[[57, 58]])
    assert len(decoded) == 4  # keyframe 55, then 56, 57, 58; never the 55 frames before


def test_read_frames_at_ntsc_rate(tmp_path, frames60):
    path = write_video(tmp_path / "ntsc.mp4", frames60, fps=30000 / 1001, lossless=True)
    meta = probe(path)
    assert meta.fps == pytest.approx(30000 / 1001) and meta.num_frames == 60
    indices = [59, 0, 29, 30, 31]
    np.testing.assert_array_equal(read_frames(path, indices), frames60[indices])


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_read_frames_variable_frame_rate_counts_frames_not_time(tmp_path, suffix):
    frames = index_frames(40)
    gaps = np.random.default_rng(0).integers(5, 120, size=39)  # ms between frames: 8 to 200 fps
    pts = np.concatenate([[0], np.cumsum(gaps)]).tolist()
    options = {"qp": "0", "preset": "ultrafast", "g": "8"}
    path = write_pyav(
        tmp_path / f"vfr{suffix}", frames, pts=pts, time_base=Fraction(1, 1000), options=options
    )
    indices = [39, 0, 17, 18, 33, 5, 17]
    np.testing.assert_array_equal(read_frames(path, indices), frames[indices])


def test_read_frames_with_b_frames_lossy(tmp_path):
    frames = index_frames(48)
    options = {"preset": "medium", "bf": "3", "g": "12", "crf": "12"}
    path = write_pyav(tmp_path / "b.mp4", frames, codec="libx264", pix_fmt="yuv420p", options=options)
    indices = [30, 2, 47, 13, 26, 11]
    assert [read_index(image) for image in read_frames(path, indices)] == indices


def _decode_all(path: Path) -> np.ndarray:
    """Reference: every frame, decoded sequentially from the start."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.mark.parametrize(
    ("name", "codec", "options"),
    [
        ("bframes.mp4", "libx264", {"preset": "medium", "bf": "3", "g": "12"}),
        ("bframes.mkv", "libx264", {"preset": "medium", "bf": "3", "g": "12"}),
        ("vp9.webm", "libvpx-vp9", {"g": "10", "deadline": "realtime"}),
        ("packed.avi", "mpeg4", {"g": "7", "bf": "2"}),  # AVI: first pts is 1, start_time says 0
        ("approx.ts", "libx264", {"preset": "medium", "bf": "2", "g": "9"}),  # MPEG-TS seeks overshoot
    ],
)
def test_read_frames_matches_sequential_decode_across_containers(tmp_path, name, codec, options):
    frames = index_frames(40)
    path = write_pyav(
        tmp_path / name, frames, rate=Fraction(30000, 1001), codec=codec, pix_fmt="yuv420p", options=options
    )
    reference = _decode_all(path)
    assert len(reference) == 40
    rng = np.random.default_rng(0)
    for _ in range(6):
        indices = rng.integers(0, 43, size=5).tolist()
        np.testing.assert_array_equal(read_frames(path, indices), reference[np.minimum(indices, 39)])


def test_read_frames_without_timestamps_counts_from_start(tmp_path):
    frames = index_frames(24)
    path = write_pyav(
        tmp_path / "raw.h264", frames, codec="libx264", pix_fmt="yuv420p", options={"crf": "12"}
    )
    indices = [23, 5, 6, 30]
    assert [read_index(image) for image in read_frames(path, indices)] == [23, 5, 6, 23]


@pytest.mark.parametrize(
    ("matrix_ccw", "turns_ccw", "rotation"),
    [(90, 1, 270), (-90, -1, 90), (180, 2, 180)],
)
def test_rotated_video_comes_out_upright(tmp_path, matrix_ccw, turns_ccw, rotation):
    frames = index_frames(6)
    path = write_pyav(tmp_path / "rot.mp4", frames, rotation=matrix_ccw)
    expected = np.rot90(frames, k=turns_ccw, axes=(1, 2))
    meta = probe(path)
    assert meta.rotation == rotation
    assert (meta.height, meta.width) == expected.shape[1:3]
    np.testing.assert_array_equal(read_frames(path, [5, 0, 3]), expected[[5, 0, 3]])


@pytest.mark.parametrize(("codec", "pix_fmt"), [("ffv1", "gray"), ("qtrle", "argb")])
def test_gray_and_alpha_sources_become_rgb(tmp_path, codec, pix_fmt):
    frames = index_frames(4)
    suffix = ".mkv" if codec == "ffv1" else ".mov"
    path = write_pyav(tmp_path / f"src{suffix}", frames, codec=codec, pix_fmt=pix_fmt, options={})
    out = read_frames(path, [3, 1])
    assert out.shape == (2, H, W, 3) and out.dtype == np.uint8
    if pix_fmt == "gray":
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    else:
        np.testing.assert_array_equal(out, frames[[3, 1]])


def test_read_frames_empty_request_and_bad_indices(video60):
    assert read_frames(video60, []).shape == (0, H, W, 3)
    with pytest.raises(ValueError, match=">= 0"):
        read_frames(video60, [3, -1])
    with pytest.raises(ValueError, match="integers"):
        read_frames(video60, [1.5])


# --------------------------------------------------------------------------------------------- errors


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for k in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, k * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _video_stream_without_frames(path: Path) -> Path:
    # Matroska keeps a declared video stream even when only the audio stream received packets.
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264rgb", rate=25)
        video.width, video.height, video.pix_fmt = W, H, "rgb24"
        audio = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        for packet in [*audio.encode(frame), *audio.encode()]:
            container.mux(packet)
    return path


def _make_broken(kind: str, tmp_path: Path, video: Path) -> Path:
    path = tmp_path / f"{kind}.mp4"
    if kind == "missing":
        return path
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.touch()
    elif kind == "text":
        path.write_text("this is not a video\n")
    elif kind == "audio-only":
        _audio_only(tmp_path / "audio.m4a").rename(path)
    elif kind == "no-frames":
        path = _video_stream_without_frames(tmp_path / "no-frames.mkv")
    elif kind == "truncated":  # the sample table (moov) is written last, so half a file has none
        data = video.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


BROKEN = {
    "missing": "file not found",
    "directory": "is a directory",
    "empty": "empty file",
    "text": "not a readable video file",
    "audio-only": "no video stream",
    "no-frames": "no decodable video frames",
    "truncated": "not a readable video file",
}


@pytest.mark.parametrize("kind", list(BROKEN))
@pytest.mark.parametrize("call", ["probe", "read_frames"])
def test_broken_files_raise_one_line_errors(tmp_path, video60, kind, call):
    path = _make_broken(kind, tmp_path, video60)
    with pytest.raises(VideoDecodeError) as info:
        probe(path) if call == "probe" else read_frames(path, [0, 1])
    message = str(info.value)
    assert "\n" not in message and str(path) in message and BROKEN[kind] in message


def test_truncated_file_gives_frames_that_survive_and_fails_on_the_rest(tmp_path, frames60):
    options = {"qp": "0", "preset": "ultrafast", "g": "10"}
    full = write_pyav(
        tmp_path / "fast.mp4", frames60, options=options, container_options={"movflags": "+faststart"}
    )
    data = full.read_bytes()
    path = tmp_path / "half.mp4"
    path.write_bytes(data[: len(data) // 2])  # sample table intact, media data cut
    np.testing.assert_array_equal(read_frames(path, [0, 5]), frames60[[0, 5]])
    with pytest.raises(VideoDecodeError, match="corrupted video data") as info:
        read_frames(path, [58])
    assert str(path) in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------- streaming


def test_iter_frames_streams_every_frame_in_order(video60, frames60):
    streamed = list(iter_frames(video60))
    assert [index for index, _ in streamed] == list(range(60))
    np.testing.assert_array_equal(np.stack([image for _, image in streamed]), frames60)


@pytest.mark.parametrize(
    ("name", "codec", "options"),
    [
        ("gop.mp4", "libx264rgb", {"qp": "0", "preset": "ultrafast", "g": "5", "sc_threshold": "0"}),
        ("bframes.mkv", "libx264", {"preset": "medium", "bf": "3", "g": "12"}),
        ("packed.avi", "mpeg4", {"g": "7", "bf": "2"}),
        ("approx.ts", "libx264", {"preset": "medium", "bf": "2", "g": "9"}),
    ],
)
def test_iter_frames_gives_the_frames_read_frames_gives(tmp_path, name, codec, options):
    frames = index_frames(40)
    pix_fmt = "rgb24" if codec == "libx264rgb" else "yuv420p"
    path = write_pyav(tmp_path / name, frames, codec=codec, pix_fmt=pix_fmt, options=options)
    wanted = [0, 3, 4, 17, 30, 39, 41, 45]  # past the end: the last frame, as read_frames
    streamed = list(iter_frames(path, wanted))
    assert [index for index, _ in streamed] == wanted
    np.testing.assert_array_equal(np.stack([image for _, image in streamed]), read_frames(path, wanted))


def test_iter_frames_of_a_variable_frame_rate_and_a_rotated_video(tmp_path):
    frames = index_frames(30)
    pts = np.concatenate([[0], np.cumsum(np.random.default_rng(1).integers(5, 90, size=29))]).tolist()
    vfr = write_pyav(tmp_path / "vfr.mkv", frames, pts=pts, time_base=Fraction(1, 1000))
    rotated = write_pyav(tmp_path / "rot.mp4", frames, rotation=90)
    for path in (vfr, rotated):
        wanted = [1, 2, 12, 29]
        images = np.stack([image for _, image in iter_frames(path, wanted)])
        np.testing.assert_array_equal(images, read_frames(path, wanted))


def test_iter_frames_refuses_indices_out_of_order(video60):
    with pytest.raises(ValueError, match="strictly increasing"):
        list(iter_frames(video60, [3, 3]))
    with pytest.raises(ValueError, match="strictly increasing"):
        list(iter_frames(video60, [-1]))


def test_iter_frames_of_broken_files_raise_one_line_errors(tmp_path, video60, frames60):
    with pytest.raises(VideoDecodeError, match="file not found"):
        list(iter_frames(tmp_path / "missing.mp4"))
    options = {"qp": "0", "preset": "ultrafast", "g": "10"}
    full = write_pyav(
        tmp_path / "fast.mp4", frames60, options=options, container_options={"movflags": "+faststart"}
    )
    half = tmp_path / "half.mp4"
    half.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])  # media data cut
    with pytest.raises(VideoDecodeError, match="corrupted video data") as info:
        list(iter_frames(half, [0, 58]))
    assert "\n" not in str(info.value)
