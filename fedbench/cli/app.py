"""The Typer app and what every command shares: global options, the one-line error handling,
the plugin registry and the consoles. Commands live beside it (run, grid, results, datasets)."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fedbench.errors import FedbenchError

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
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


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

    return wrapper


def say(message: str) -> None:
    """One line for the person at the terminal, on stderr (stdout stays for data)."""
    typer.echo(message, err=True)


def echo(text: str) -> None:
    """One line of output; never wrapped by rich, so a long path stays whole for copy and paste."""
    out.print(text, highlight=False, soft_wrap=True)


def registry() -> Any:
    """The plugin registry (installed plugins and --plugin files); load problems are warnings."""
    from fedbench.engine.registry import load_registry

    reg = load_registry(tuple(STATE["plugins"]))
    reg.warn = lambda line: say(f"warning: {line}")
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
