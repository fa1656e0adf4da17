"""The `fedbench` command line (Typer). `main` is the console entry point; importing this
package registers every command on `app`."""

from __future__ import annotations

import os
import sys

from fedbench.cli import datasets, flower, grid, plugin, results, run, tune  # noqa: F401
from fedbench.cli.app import app
from fedbench.errors import one_line

GLOBAL_FLAGS = ("--debug",)
GLOBAL_OPTIONS = ("--plugin",)


def hoist_global_options(argv: list[str]) -> list[str]:
    """Move `--plugin PATH` and `--debug` to the front, where Typer reads global options, so
    `fedbench run --plugin my.py ...` works as `fedbench --plugin my.py run ...` does. Nothing
    after a `--` is touched."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        if arg in GLOBAL_FLAGS or ("=" in arg and arg.split("=", 1)[0] in GLOBAL_OPTIONS):
            front.append(arg)
        elif arg in GLOBAL_OPTIONS and i + 1 < len(argv):
            front += argv[i : i + 2]
            i += 1
        else:
            rest.append(arg)
        i += 1
    return front + rest


def main() -> None:
    # Idle OpenMP threads sleep instead of spinning: with spinning, a second busy process on a
    # small machine (a grid, a test run) slows every torch step down many times over.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(run_app(hoist_global_options(sys.argv[1:])))


def run_app(argv: list[str]) -> int:
    """The app's exit code; a command-line mistake (an unknown option, a value of the wrong
    type, a missing option) is one line on stderr with exit code 2 instead of Click's box."""
    import typer

    usage_error = typer.BadParameter.__mro__[1]  # Click's UsageError, as the installed Typer has it
    try:
        code = app(args=argv, prog_name="fedbench", standalone_mode=False)
    except usage_error as exc:
        if exc.format_message():  # no message: the help was shown for a bare group
            command = exc.ctx.command_path if exc.ctx is not None else "fedbench"
            line = f"error: {exc.format_message()} (see: {command} --help)"
            print(one_line(line), file=sys.stderr)
        return exc.exit_code
    except typer.Abort:
        print("error: interrupted", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0


__all__ = ["app", "hoist_global_options", "main"]
