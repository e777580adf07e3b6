"""The README's timeline picture: a generated long video (a shape moving left for 20 s, then up for 20 s,
25 fps, 112 px, at the speed of the demo's training clips) through a trained run's timeline.

    python benchmarks/timeline_picture.py demo_run/run --out-dir docs/img

Writes the video, ``left_then_up.timeline.png`` and the JSON/CSV files beside it, and prints the segments
as JSON (the truth: the change at 20.0 s).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import evl
from evl.engine.timeline import write_timeline_files
from evl.synth import write_action_change_video

CHANGE = 20.0  # seconds of "left", then as many of "up"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run trained on the motion task, e.g. evl demo's demo_run/run")
    parser.add_argument("--out-dir", default="timeline_picture")
    parser.add_argument("--window", type=float, default=1.0, help="seconds per window")
    parser.add_argument("--stride", type=float, default=0.5, help="seconds between windows")
    parser.add_argument("--overlay", action="store_true", help="also write the video with labels drawn on it")
    args = parser.parse_args()

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # 0.013 frame sides per frame: within the demo clips' 0.2-0.45 of a side over 24 frames.
    video = write_action_change_video(
        out / "left_then_up.mp4", fps=25.0, size=112, seconds=(CHANGE, CHANGE), speed=0.013
    )
    predictor = evl.load(args.run_dir)
    timeline = predictor.timeline(video, window=args.window, stride=args.stride, topk=4)
    overlay_from = video if args.overlay else None
    written = write_timeline_files(timeline, out, "left_then_up", overlay_from=overlay_from)
    segments = [
        {"start": seg.start, "end": seg.end, "label": seg.name, "score": round(seg.score, 3)}
        for seg in timeline.segments
    ]
    files = {kind: str(path) for kind, path in written.items()}
    print(json.dumps({"truth_change_s": CHANGE, "segments": segments, "files": files}))


if __name__ == "__main__":
    main()
