"""User errors: mistakes in what the user gave (config, files, datasets, flags), reported by the tools as one line.

Every error the project raises for bad input derives from :class:`UserError`. The command-line tools run their
``main`` through :func:`run_tool`, which prints ``<tool>: error: <message>`` and exits with status 1 for a user
error, without a traceback (``--debug`` or ``DIFFUSIONINST_DEBUG=1`` shows it); any other exception keeps its
traceback, since it is a bug to report.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Optional, Sequence

__all__ = [
    "DEBUG_ENV",
    "HideUserErrorTracebacks",
    "USER_ERROR_EXIT",
    "UserError",
    "debug_requested",
    "report_user_error",
    "run_tool",
    "user_error_message",
]

DEBUG_ENV = "DIFFUSIONINST_DEBUG"
USER_ERROR_EXIT = 1  # the exit status of a run stopped by a user error


class UserError(Exception):
    """Bad input the user can fix; the message names the file, key or flag at fault and what to do."""

    def __str__(self) -> str:  # KeyError subclasses would print the repr of the message
        return str(self.args[0]) if self.args else ""


def debug_requested(argv: Sequence[str] = ()) -> bool:
    """Whether user errors should show their traceback: ``--debug`` among the arguments, or DIFFUSIONINST_DEBUG set."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def user_error_message(exc: BaseException) -> str:
    """The message of a user error; for one re-raised from a DataLoader worker, without the worker's traceback."""
    message = str(exc)
    if "\nOriginal Traceback" in message:  # the worker's traceback, then its error as the last line
        last = message.strip().splitlines()[-1]
        message = last.split(": ", 1)[1] if last.startswith(type(exc).__name__ + ":") else last
    return message


def report_user_error(exc: BaseException, prog: Optional[str] = None) -> None:
    """Print ``<prog>: error: <message>`` to stderr."""
    prog = prog or os.path.basename(sys.argv[0])
    print(f"{prog}: error: {user_error_message(exc)}", file=sys.stderr, flush=True)


class HideUserErrorTracebacks(logging.Filter):
    """A logging filter that logs user errors as their message alone: detectron2's training loop logs every
    exception with its traceback before re-raising it (the tool then prints the one-line error)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, UserError) and not debug_requested(sys.argv):
            record.msg, record.args = f"{record.getMessage()} {user_error_message(exc)}", ()
            record.exc_info = record.exc_text = None
        return True


def run_tool(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None,
             prog: Optional[str] = None) -> int:
    """Run a tool's ``main(argv)``; a :class:`UserError` becomes one line on stderr and exit status 1. The tool's
    argument parser declares ``--debug``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv) or 0
    except UserError as exc:
        if debug_requested(argv):
            raise
        report_user_error(exc, prog)
        return USER_ERROR_EXIT
