"""The ``evl`` command line. Thin: each sub-command parses flags and calls an engine function.

Errors a user can fix (a malformed list, a missing file, a bad flag) print one line and exit with 2;
nothing a user did should end in a traceback.

One module per job: ``app`` (the parser and ``main``), ``exits`` (exit statuses, the user's errors),
``flags`` (flags several commands share), ``logs`` (the engine's messages on the terminal), and the commands,
each parser beside its handler: ``train`` (train, extract), ``evaluate`` (eval), ``predict`` (predict,
embed), ``ensemble``, ``data`` (lists, prepare, splits, synth), ``export`` and ``tools`` (flops, bench,
demo).
"""

from evl.cli.app import build_parser, main
from evl.cli.exits import EXIT_INPUT_ERROR, EXIT_INTERRUPTED, EXIT_OK, USER_ERRORS
from evl.cli.logs import install_log_handler

__all__ = [
    "EXIT_INPUT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "USER_ERRORS",
    "build_parser",
    "install_log_handler",
    "main",
]
