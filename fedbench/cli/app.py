"""The Typer app and what every command shares: global options, the one-line error handling,
the plugin registry and the consoles. Commands live beside it (run, grid, results, datasets)."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from fedbench.errors import FedbenchError, exit_text, one_line

app = typer.Typer(
    help="Benchmark personalized federated learning on multi-site medical image segmentation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)
STATE: dict[str, Any] = {"debug": False, "plugins": ()}


def fail(message: str, code: int = 2) -> None:
    """One error line on stderr (a newline in a value shows as \\n), then exit with `code`."""
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(code)


def fail_all(messages: list[str], code: int = 1) -> None:
    """One error line per message, then exit with `code`; nothing when there is none."""
    for message in messages[:-1]:
        say(f"error: {message}")
    if messages:
        fail(messages[-1], code)


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Expected failures become one line on stderr and a non-zero exit (traceback: --debug)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except FedbenchError as exc:
            if STATE["debug"]:
                raise
            fail(str(exc))
        except KeyboardInterrupt:
            if STATE["debug"]:
                raise
            fail("interrupted; records already written are intact", code=130)
        except SystemExit as exc:  # fedbench exits through typer.Exit: this is a plugin's code
            if STATE["debug"]:
                raise
            fail(f"a plugin {exit_text(exc)}; records already written are intact", code=1)

    return wrapper


def say(message: str) -> None:
    """One line for the person at the terminal, on stderr (stdout stays for data); a newline in
    a value or file name shows as \\n, so the line stays one line."""
    typer.echo(one_line(message), err=True)


def echo(text: str) -> None:
    """One line of output, as given: no rich markup or wrapping (a long path stays whole for
    copy and paste) and a newline in a value shows as \\n."""
    typer.echo(one_line(text))


def literal(value: object, style: str = "") -> Text:
    """A string for a rich Table cell, title or line that rich prints exactly as it is: a path,
    record field, plugin text or study label such as `r[/]` or `:smile:` is never read as
    markup or an emoji code (a plain str would be), and a newline or escape code in it shows
    as \\n or \\x1b instead of breaking the cell or acting on the terminal. A title passes
    style="table.title": rich styles only the titles it parses itself."""
    return Text(one_line(str(value)), style=style)


def registry() -> Any:
    """The plugin registry (installed plugins and --plugin files); load problems are warnings."""
    from fedbench.engine.registry import load_registry

    reg = load_registry(tuple(STATE["plugins"]))
    reg.warn = lambda line: say(f"warning: {line}")
    reg.warn_exits = False  # an observer's sys.exit: an error line at the end (fail_all)
    for line in reg.failures:
        say(f"warning: {line}")
    return reg


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    plugin: Annotated[
        list[Path] | None, typer.Option("--plugin", help="Load a plugin module from a file.")
    ] = None,
) -> None:
    """Global options."""
    STATE["debug"] = debug
    STATE["plugins"] = tuple(plugin or ())
