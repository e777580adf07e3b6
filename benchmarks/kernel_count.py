"""Count the aten ops one EVL decoder training step dispatches: on a GPU, each is a kernel launch.

    python benchmarks/kernel_count.py --model evl-b16 --batch-size 32 [--formulation batched|cpu]

The decoder and head run forward and backward on the meta device (shapes only, no memory, no math), in the
formulation CUDA uses unless told otherwise, with the memory recomputed in backward or not as CUDA would
(``--recompute``: force it on). Prints one JSON object: the ops of forward and backward, all of them and the
non-view ones (a view launches no kernel), and the most frequent non-view ops.
"""

from __future__ import annotations

import argparse
import json

import torch

from evl.config import MODEL_PRESETS, model_preset
from evl.devices import resolve_formulation
from evl.opcount import count_decoder_step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="evl-b16", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--num-frames", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--formulation", default=resolve_formulation("auto", torch.device("cuda")), choices=["batched", "cpu"]
    )
    parser.add_argument("--recompute", action="store_true", help="recompute the memory in backward")
    args = parser.parse_args(argv)
    config = model_preset(args.model, num_frames=args.num_frames)
    report = {"model": args.model, "num_frames": args.num_frames}
    report.update(count_decoder_step(config, args.batch_size, args.formulation, args.recompute or None))
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
