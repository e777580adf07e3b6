"""``evl explain``: pictures of where a run looks in one video (attention maps, or class similarity over
time), with the tensors behind them."""

from __future__ import annotations

import argparse

from evl.cli.exits import EXIT_OK
from evl.cli.flags import add_source_arguments, load_source
from evl.cli.predict import print_ranked


def add_explain_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="attention maps of one video (EVL), or each class's similarity per frame (text methods)",
        description=(
            "EVL: per decoder layer, the query's attention over every frame's patches beside the image "
            "encoder's class token's (attention_layerN.png), and one patch's cross-frame attention in the "
            "previous and next frames (cross_frame.png). Text methods: each class's similarity with each "
            "frame (class_similarity.png). Also explanation.json and explanation.safetensors (the tensors)."
        ),
    )
    add_source_arguments(p)
    p.add_argument("video", help="the video file to explain (its first evaluation view: centre crop)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the pictures and tensors")
    p.add_argument("--layer", type=int, help="decoder layer of the cross-frame picture (default: the last)")
    p.add_argument("--frame", type=int, help="frame of the cross-frame picture's patch (default: chosen)")
    p.add_argument(
        "--patch",
        type=_row_col,
        metavar="ROW,COL",
        help="patch of the cross-frame picture (default: the one the query attends to most)",
    )
    p.add_argument("--dpi", type=int, default=100)
    p.set_defaults(func=_cmd_explain)


def _row_col(text: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected ROW,COL (two integers), got {text!r}")
    return int(parts[0]), int(parts[1])


def _cmd_explain(args: argparse.Namespace) -> int:
    from evl.engine.explain import explain_video, save_explanation
    from evl.engine.predict import Predictor

    predictor = Predictor(load_source(args))
    explanation = explain_video(predictor, args.video, layer=args.layer, frame=args.frame, patch=args.patch)
    written = save_explanation(explanation, args.out, dpi=args.dpi)
    top = explanation.top(5)
    print_ranked(
        args.video, [explanation.class_names[i] for i in top], explanation.probabilities[top].tolist()
    )
    if explanation.patch is not None:
        p = explanation.patch
        print(f"cross-frame patch: layer {p.layer}, frame {p.frame}, row {p.row}, column {p.col}")
    for path in written:
        print(f"wrote {path}")
    return EXIT_OK
