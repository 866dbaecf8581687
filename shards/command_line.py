"""What the ``mvprep`` and ``mvtrain`` command lines share: how a failure is reported, and
the path of a picture to write.

A failure the user can act on (a bad option, a missing file, a corrupt shard, a model folder
that does not load) is *expected*: it is printed as one line on stderr,
``PROG: error: MESSAGE``, and the command exits non-zero, with no traceback. The traceback
comes only with ``--debug`` (anywhere on the command line) or ``MVKIT_DEBUG=1`` in the
environment; ``--debug`` also sets ``MVKIT_DEBUG=1`` so processes the command starts (training
ranks) inherit it. Anything else is a bug and keeps its traceback.

Who prints is up to the caller's ``report`` function: a training rank started by
``mvtrain run --nproc-per-node`` hands its failure to the launcher instead, which prints each
distinct failure once (:mod:`mvtrain.launch`).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import click

DEBUG_ENV = "MVKIT_DEBUG"
DEBUG_FLAG = "--debug"


@dataclass(frozen=True)
class Failure:
    """How a command ended badly: the line to print, the exit code, and (for a bug, or with
    --debug) the traceback."""

    message: str
    code: int
    expected: bool
    traceback: str = ""


Report = Callable[[str, Failure], None]
"""``report(prog, failure)``: make the failure known (print it, or hand it on)."""


def debug_enabled() -> bool:
    """``--debug`` was given (to this process or the command that started it)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def collapse(text: str) -> str:
    """``text`` on one line: its non-blank lines joined by spaces."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (a KeyError's without its quotes)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return collapse(text) or type(exc).__name__


def expected_classes(*names: str) -> Callable[[BaseException], bool]:
    """``is_expected`` for :func:`run_cli`: true for instances of the classes ``names``
    (``"module:Class"``), looked up only in modules already imported (an exception cannot
    come from a module never loaded, and the check must not import torch)."""

    def is_expected(exc: BaseException) -> bool:
        for spec in names:
            module, name = spec.split(":")
            cls = getattr(sys.modules.get(module), name, None)
            if isinstance(cls, type) and isinstance(exc, cls):
                return True
        return False

    return is_expected


def print_failure(prog: str, failure: Failure) -> None:
    """The default ``report``: the traceback if there is one, then ``PROG: error: MESSAGE``."""
    if failure.traceback:
        print(failure.traceback, file=sys.stderr, end="", flush=True)
    print(f"{prog}: error: {failure.message}", file=sys.stderr, flush=True)


def failure_of(exc: BaseException, expected: bool, debug: bool) -> Failure:
    """The :class:`Failure` for ``exc``; a traceback for bugs, or for everything with debug."""
    if isinstance(exc, click.ClickException):
        message = exc.format_message()
        ctx = getattr(exc, "ctx", None)
        if isinstance(exc, click.UsageError) and ctx is not None:
            message = f"{message} (see `{ctx.command_path} --help`)"
        code = exc.exit_code
    else:
        message = one_line(exc)
        code = int(getattr(exc, "exit_code", 1))
    tb = "".join(traceback.format_exception(exc)) if (debug or not expected) else ""
    return Failure(message=collapse(message), code=code, expected=expected, traceback=tb)


def run_cli(
    group: click.Command,
    prog: str,
    is_expected: Callable[[BaseException], bool],
    report: Report = print_failure,
    argv: list[str] | None = None,
) -> NoReturn:
    """Run ``group`` on ``argv`` (default ``sys.argv[1:]``) and exit: 0, the command's own
    ``sys.exit`` code, or a failure reported once through ``report``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if DEBUG_FLAG in args:
        args = [a for a in args if a != DEBUG_FLAG]
        os.environ[DEBUG_ENV] = "1"
        if argv is None:
            sys.argv[1:] = args
    debug = debug_enabled()
    try:
        group.main(args=args, prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        report(prog, Failure("interrupted", 130, expected=True))
        sys.exit(130)
    except (click.ClickException, Exception) as exc:  # noqa: BLE001 - sorted just below
        expected = isinstance(exc, click.ClickException) or is_expected(exc)
        failure = failure_of(exc, expected, debug)
        report(prog, failure)
        sys.exit(failure.code)
    sys.exit(0)


def png_path(path: Path) -> Path:
    """Where to write a picture asked for as ``path``: ``.png`` added when it has no
    extension (Pillow picks the format from the extension)."""
    return path if path.suffix else path.with_name(path.name + ".png")


def png_callback(_ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
    """The ``callback`` of a ``--png`` option: :func:`png_path` of the value."""
    return None if value is None else png_path(Path(value))
