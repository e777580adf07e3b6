"""The engine's log messages on the terminal: information on stdout, warnings on stderr."""

from __future__ import annotations

import logging
import sys


class _TerminalHandler(logging.Handler):
    """The engine's messages as the command line shows them: information on stdout, warnings (prefixed
    ``warning:``) on stderr, written through tqdm so that an open progress bar is redrawn below them.
    The streams are looked up per message, so a redirected ``sys.stdout`` (tests, notebooks) is honoured."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            message = self.format(record)
            if record.levelno >= logging.WARNING:
                tqdm.write(f"warning: {message}", file=sys.stderr)
            else:
                tqdm.write(message, file=sys.stdout)
        except Exception:
            self.handleError(record)


def install_log_handler() -> None:
    """Show the engine's (``evl.*`` loggers') information and warnings on the terminal; idempotent, since
    ``main`` may run many times in one process."""
    logger = logging.getLogger("evl")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, _TerminalHandler) for h in logger.handlers):
        logger.addHandler(_TerminalHandler())
