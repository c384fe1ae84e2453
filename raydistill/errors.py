"""User-facing errors: every bad input becomes ONE ``error:`` line on stderr and exit code 2."""
from __future__ import annotations

import functools
import sys
from typing import Callable, NoReturn


class UsageError(Exception):
    """Bad user input (names, ranges, files, flags).

    The message must name the bad value and what is accepted, e.g.
    ``unknown attack 'pgd7'; choose from: clean, fgsm, pgd20, cw, aa``.
    """


# how a traceback's last line names a UsageError: Ray Train sends a worker's exception to the driver so
USAGE_ERROR_PREFIX = f"{UsageError.__module__}.{UsageError.__qualname__}: "


def fail(message: str) -> NoReturn:
    raise UsageError(message)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def not_a_usage_error(record) -> bool:
    """A logging filter for Ray Train's loggers in a worker: drops the record that logs a UsageError with its
    traceback (the driver reports bad input that a worker found in one line: train.launch)."""
    return USAGE_ERROR_PREFIX not in record.getMessage()


def cli_entry(main: Callable[..., int | None]) -> Callable[..., None]:
    """Wrap a command's ``main(argv)`` so UsageError prints one line and exits 2, never a traceback."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> None:
        try:
            code = main(argv)
        except UsageError as exc:
            msg = " ".join(str(exc).split())  # one line, whatever the message held
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)
        sys.exit(code or 0)

    return wrapper
