"""How `melo` reports a failed command: one clear line on stderr and a non-zero exit, no traceback.

Configuration mistakes (an unknown or invalid setting, TOML syntax, a missing file or directory)
and startup failures reach the user as one line naming what to fix; ``--debug`` prints the
traceback as well, for bug reports.
"""

from __future__ import annotations

import sys
import tomllib
import traceback
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

EXIT_FAILED = 1
EXIT_CONFIG = 2


def _section(loc: tuple[Any, ...]) -> str:
    # ("batch", "max_sise") reads as the TOML a user wrote: [batch] max_sise
    parts = [str(p) for p in loc]
    if len(parts) >= 2:
        return f"[{'.'.join(parts[:-1])}] {parts[-1]}"
    return parts[0] if parts else "settings"


def one_line(error: BaseException) -> tuple[str, int]:
    """A one-line message for ``error`` and the exit status it deserves."""
    if isinstance(error, ValidationError):
        problems = "; ".join(f"{_section(tuple(e['loc']))}: {e['msg']}" for e in error.errors())
        return f"invalid settings: {problems}", EXIT_CONFIG
    if isinstance(error, tomllib.TOMLDecodeError):
        return f"the config file is not valid TOML: {error}", EXIT_CONFIG
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (FileNotFoundError, NotADirectoryError, PermissionError)):
        return text, EXIT_CONFIG
    return f"{type(error).__name__}: {text}", EXIT_FAILED


def run_reporting(command: str, func: Callable[[], int], *, debug: bool) -> int:
    """Run ``func``; an exception becomes one line on stderr (and the traceback with ``debug``)."""
    try:
        return func()
    except KeyboardInterrupt:
        print(f"melo {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the CLI's last line of defence: report, never dump a traceback
        if debug:
            traceback.print_exc()
        message, status = one_line(error)
        hint = "" if debug else " (--debug shows the traceback)"
        print(f"melo {command}: error: {message}{hint}", file=sys.stderr)
        return status
