"""`fedbench run` and `fedbench list`: one run with its per-site table, and what is installed.
Heavy libraries (torch, MONAI) are imported only inside the commands that need them."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fedbench.cli.app import (
    STATE,
    app,
    echo,
    err,
    fail_all,
    literal,
    out,
    registry,
    say,
    user_errors,
)
from fedbench.errors import FedbenchError


@app.command("run")
@user_errors
def run_command(
    method: Annotated[str, typer.Option(help="Method name (fedbench list methods).")],
    adapter: Annotated[str | None, typer.Option(help="Adapter for unseen sites.")] = None,
    dataset: Annotated[str, typer.Option(help="Dataset name.")] = "synth-prostate",
    holdout: Annotated[str, typer.Option(help="all, none, or SITE,SITE: sites held out.")] = "all",
    rounds: Annotated[int | None, typer.Option(help="Federated rounds.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    preset: Annotated[str, typer.Option(help="quick, default or paper.")] = "default",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a setting: KEY=VALUE.")
    ] = None,
    results_dir: Annotated[Path, typer.Option(help="Where records go.")] = Path("results"),
    json_: Annotated[bool, typer.Option("--json", help="Print only the run record.")] = False,
    profile: Annotated[bool, typer.Option(help="Show where the time went.")] = False,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N rounds.", min=1)] = 1,
    keep_checkpoints: Annotated[bool, typer.Option(help="Keep checkpoints after the run.")] = False,
    workers: Annotated[
        int | None,
        typer.Option(help="Processes training the federations; default: one per CPU.", min=1),
    ] = None,
    track: Annotated[
        list[str] | None,
        typer.Option("--track", help="Experiment tracker: mlflow or tensorboard (repeat)."),
    ] = None,
) -> None:
    """Train a federation, score each site inside it, and adapt to each held-out site.

    Run the same command again after an interruption: finished federations come from the cache
    and the one in training resumes from its last checkpoint."""
    from fedbench.cli.progress import make_reporter
    from fedbench.cli.tracking import enable_trackers
    from fedbench.engine.resolve import RunSpec, resolve
    from fedbench.engine.run import execute

    spec = RunSpec(
        method=method,
        adapter=adapter,
        dataset=dataset,
        holdout=holdout,
        seed=seed,
        preset=preset,
        device=device,
        rounds=rounds,
        overrides=list(set_ or []),
        results_dir=results_dir,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints,
        workers=workers,
    )
    reg = registry()
    resolved = resolve(spec, reg)
    for line in enable_trackers(track or [], results_dir):
        say(line)
    reporter = make_reporter(err, quiet=json_)
    try:
        outcome = execute(resolved, reg, reporter)
    finally:
        reporter.close()
    record = outcome.record
    if STATE["debug"] and outcome.trace:
        err.print(outcome.trace, markup=False, highlight=False, end="")
    if json_:
        sys.stdout.write(json.dumps(record, indent=2) + "\n")
    else:
        print_summary(record, results_dir)
    if profile:
        print_profile(record, console=err if json_ else out)
    problems = list(reg.exits)  # observers that called sys.exit: the record is written
    if record["status"] != "ok":
        problems.append(f"run {record['status']}: {record.get('error', '')}")
    fail_all(problems)


def print_summary(record: dict[str, Any], results_dir: Path) -> None:
    """The per-site table a person reads after a run; names and the path are literal text."""
    title = f"{record['method']} on {record['dataset']} (seed {record['seed']})"
    table = Table(title=literal(title, "table.title"))
    table.add_column("site")
    values: dict[tuple[str, str, str], float] = {
        (r["site"], r["regime"], r["metric"]): r["value"]
        for r in record["metrics"]
        if r["selection"] == "final"
    }
    names = list(dict.fromkeys(r["metric"] for r in record["metrics"]))
    shown = [m for m in ("dice", "hd95") if m in names] or names[:2]
    columns = [("inside", m) for m in shown]
    if record["adapter"]:
        columns += [("outside", m) for m in shown]
    for regime, metric in columns:
        label = f"{regime} {metric}" + (f" ({record['adapter']})" if regime == "outside" else "")
        table.add_column(literal(label), justify="right")
    sites = list(dict.fromkeys(r["site"] for r in record["metrics"]))
    for site in sites:
        cells = [values.get((site, regime, metric)) for regime, metric in columns]
        table.add_row(literal(site), *("-" if v is None else f"{v:.3f}" for v in cells))
    out.print(table)
    cost = record["cost"]
    path = results_dir / "runs" / f"{record['run_id']}.json"
    echo(
        f"status {record['status']} in {record['wall_s']:.1f} s; "
        f"sent {cost['bytes_up'] / 1e6:.1f} MB up, {cost['bytes_down'] / 1e6:.1f} MB down; "
        f"record {path}"
    )


def print_profile(record: dict[str, Any], console: Console) -> None:
    """Seconds and shares of the run's wall time per phase."""
    table = Table(title="where the time went")
    for column in ("phase", "seconds", "share"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    total = record["wall_s"] or 1.0
    phases = dict(record["profile"])
    phases["other (imports, setup, records)"] = max(0.0, total - sum(phases.values()))
    for phase, seconds in phases.items():
        table.add_row(literal(phase), f"{seconds:.2f}", f"{100 * seconds / total:.1f}%")
    console.print(table)


@app.command("list")
@user_errors
def list_command(
    kind: Annotated[str, typer.Argument(help="methods, adapters, datasets or models")],
    json_: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the installed methods, adapters, datasets or models."""
    kinds = ("methods", "adapters", "datasets", "models")
    if kind not in kinds:
        raise FedbenchError(f"unknown kind '{kind}'; known: {', '.join(kinds)}")
    reg = registry()
    rows = []
    for name in reg.names(kind):
        cls = reg.get(kind, name)
        row = {"name": name, "description": getattr(cls, "description", "")}
        if kind == "methods":
            row["default_adapter"] = cls.default_adapter
        rows.append(row)
    if json_:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table(title=kind)
    for column in rows[0] if rows else ["name"]:
        table.add_column(column.replace("_", " "))
    for row in rows:
        table.add_row(*(literal(value) for value in row.values()))
    out.print(table)
