"""``evl export``: a run's model for deployment, as ONNX or a torch.export program."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evl.cli.exits import EXIT_INPUT_ERROR, EXIT_OK
from evl.cli.flags import add_source_arguments, load_source


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a run's model for deployment: ONNX or a torch.export program (.pt2)"
    )
    add_source_arguments(p)
    p.set_defaults(device="cpu")  # traced on the CPU, whatever the machine has
    p.add_argument("--format", choices=("onnx", "torch-export"), default="onnx")
    p.add_argument("--output", help="folder for the files and deployment.json (default: RUN_DIR/export)")
    p.add_argument("--split", action="store_true", help="EVL: the frozen backbone and the decoder apart")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-check", action="store_true", help="skip comparing its scores with the model's")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from evl.engine.export import DEPLOYMENT_FILE, ExportDependencyError, export_run

    loaded = load_source(args)
    output = Path(args.output) if args.output else (loaded.run_dir or Path(".")) / "export"
    try:
        result = export_run(loaded, output, args.format, args.split, args.opset, check=not args.no_check)
    except ExportDependencyError as err:  # an ImportError: not among the errors main reports in one line
        print(f"evl export: error: {err}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    checked = ""  # the files themselves were reported as they were written
    if result.max_difference is not None:
        checked = f"; its scores are within {result.max_difference:.1e} of the model's"
    print(f"wrote {result.directory / DEPLOYMENT_FILE}{checked}")
    return EXIT_OK
