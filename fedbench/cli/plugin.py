"""`fedbench plugin check NAME`: the conformance kit (fedbench/conformance.py) on one plugin,
built-in or third-party: one line per problem and exit 1, or one ok line."""

from __future__ import annotations

from typing import Annotated

import typer

from fedbench.cli.app import app, echo, fail_all, registry, say, user_errors

plugin_app = typer.Typer(help="Check plugins against fedbench's rules.", no_args_is_help=True)


@plugin_app.command("check")
@user_errors
def check_command(
    name: Annotated[str, typer.Argument(help="A method, adapter, dataset or model name.")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="A setting for the runs: KEY=VALUE.")
    ] = None,
    dataset: Annotated[
        str | None, typer.Option(help="Dataset of the runs (default: synth-prostate).")
    ] = None,
) -> None:
    """Run the conformance checks: door rules, a quick run, determinism, resume, what the
    server receives, the byte counts, and label-freedom for adapters."""
    from fedbench.conformance import check_plugin

    reg = registry()
    problems = check_plugin(name, reg, list(set_ or []), dataset)
    for line in problems:
        say(f"error: {name}: {line}")
    fail_all(reg.exits)  # an observer that called sys.exit during the checks' runs
    if problems:
        raise typer.Exit(1)
    echo(f"ok: {name} conforms")


app.add_typer(plugin_app, name="plugin")
