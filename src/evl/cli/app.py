"""The ``evl`` entry point: the parser of every command, and ``main``, which runs one and reports the
errors a user can fix in one line (with the flag that fixes them, where there is one)."""

from __future__ import annotations

import argparse
import os
import sys

from evl.cli import data, ensemble, evaluate, explain, export, predict, tools, train
from evl.cli.exits import EXIT_INPUT_ERROR, EXIT_INTERRUPTED, USER_ERRORS
from evl.cli.flags import TRAIN_FLAGS
from evl.cli.logs import install_log_handler
from evl.config import SettingError
from evl.devices import DeviceOutOfMemory
from evl.runtime import tune_cpu_allocator


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evl", description="Video recognition on frozen CLIP image encoders."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        train.add_train_parser,
        train.add_extract_parser,
        evaluate.add_eval_parser,
        ensemble.add_ensemble_parser,
        predict.add_predict_parser,
        predict.add_embed_parser,
        explain.add_explain_parser,
        data.add_lists_parser,
        data.add_prepare_parser,
        export.add_export_parser,
        data.add_splits_parser,
        data.add_synth_parser,
        tools.add_flops_parser,
        tools.add_bench_parser,
        tools.add_demo_parser,
    ):
        add(sub)
    return parser


def _setting_advice(err: SettingError) -> str:
    """The flag that sets the run-config field an engine error names, where the command line has one."""
    flags = {field: flag for flag, field, _, _ in TRAIN_FLAGS}
    return f"; pass {flags[err.field]}" if err.field in flags else ""


def _memory_advice(err: DeviceOutOfMemory, command: str) -> str:
    """What to pass next time, by the flags of the command that ran out of memory."""
    if err.stage == "training":
        return (
            f"pass --batch-split {2 * err.batch_split} (or more) to run the same batch of {err.batch_size} "
            "in smaller micro-batches; the last good checkpoint is kept and --resume auto continues from it"
        )
    if command == "predict" and err.batch_size == 1:  # one video's views: only the device can change
        return "the views of one video do not fit: use a device with more memory or --device cpu"
    return f"pass a smaller --batch-size (now {err.batch_size})"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    tune_cpu_allocator()
    install_log_handler()
    try:
        return args.func(args)
    except DeviceOutOfMemory as err:
        if os.environ.get("EVL_DEBUG"):
            raise
        print(f"evl {args.command}: error: {err}; {_memory_advice(err, args.command)}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except USER_ERRORS as err:
        if os.environ.get("EVL_DEBUG"):
            raise
        advice = _setting_advice(err) if isinstance(err, SettingError) else ""
        print(f"evl {args.command}: error: {err}{advice}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print(f"evl {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
