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


def fail(message: str) -> NoReturn:
    raise UsageError(message)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
