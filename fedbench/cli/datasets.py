"""`fedbench datasets list|prepare|verify|show|accept-licence`: look at, convert and check datasets,
and record acceptance of a FLamby dataset's data terms.

`prepare` converts a dataset's raw files once into its prepared form (per-site files and a
manifest of sha256 checksums, written atomically) in the place `fedbench run` looks for it, or
in `--out`. `verify` checks a prepared folder against its manifest and reports each bad file by
its path on one line. `show` draws a few images per site with their mask outlines.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fedbench.cli.app import app, echo, literal, out, registry, user_errors
from fedbench.errors import FedbenchError, one_line

datasets_app = typer.Typer(
    help="List, prepare, verify and show datasets.", no_args_is_help=True, add_completion=False
)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="A data setting: data.KEY=VALUE (e.g. data.size=64)."),
]
ResultsOption = Annotated[
    Path, typer.Option(help="Results folder whose cache/ holds prepared data.")
]


def get_dataset(name: str) -> Any:
    """An instance of the registered dataset `name` (unknown names list the known ones)."""
    return registry().get("datasets", name)()


def data_config(dataset: Any, preset: str, overrides: list[str]) -> dict[str, Any]:
    """The dataset's `data.*` settings: defaults, the preset's values, then --set."""
    from fedbench.engine.config import apply_overrides, deep_merge, preset_config

    preset_config(preset)  # rejects an unknown preset
    data = deep_merge(dataset.defaults, dataset.preset(preset).get("data", {}))
    assignments = [o if o.startswith("data.") else f"data.{o}" for o in overrides]
    return apply_overrides({"data": data}, assignments)["data"]


def preparable(dataset: Any) -> bool:
    return callable(getattr(dataset, "prepare", None)) and callable(
        getattr(dataset, "verify", None)
    )


def require_preparable(dataset: Any) -> None:
    if not preparable(dataset):
        raise FedbenchError(
            f"dataset '{dataset.name}' has no prepared form (it is read directly or generated)"
        )


def report_problems(lines: list[str]) -> None:
    """One line per problem on stderr, then a non-zero exit."""
    for line in lines:
        typer.echo(f"error: {one_line(line)}", err=True)
    raise typer.Exit(1)


@datasets_app.command("list")
@user_errors
def list_command(
    json_: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the installed datasets and their data settings."""
    reg = registry()
    rows = []
    for name in reg.names("datasets"):
        dataset = reg.get("datasets", name)()
        rows.append(
            {
                "name": name,
                "description": getattr(dataset, "description", ""),
                "prepare": preparable(dataset),
                "settings": sorted(dataset.defaults),
            }
        )
    if json_:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table(title="datasets")
    for column in ("name", "description", "prepare", "data settings"):
        table.add_column(column)
    for row in rows:
        prepare = "yes" if row["prepare"] else "-"
        cells = (row["name"], row["description"], prepare, ", ".join(row["settings"]))
        table.add_row(*(literal(cell) for cell in cells))
    out.print(table)


@datasets_app.command("accept-licence")
@user_errors
def accept_licence_command(name: Annotated[str, typer.Argument(help="Dataset name.")]) -> None:
    """Record that you have read and accept a dataset's data terms (what FLamby asks on stdin
    on first use), so runs without a terminal can load it."""
    dataset = get_dataset(name)
    accept = getattr(dataset, "accept_licence", None)
    if not callable(accept):
        raise FedbenchError(f"dataset '{dataset.name}' asks for no licence acceptance")
    echo(accept())


@datasets_app.command("prepare")
@user_errors
def prepare_command(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    source: Annotated[Path, typer.Option(help="Folder with the raw files.")],
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Prepared folder (default: where runs look). An existing one is replaced only "
            "when fedbench prepared everything in it; never the --source folder or a link.",
        ),
    ] = None,
    preset: Annotated[str, typer.Option(help="Preset whose data settings apply.")] = "default",
    set_: SetOption = None,
    results_dir: ResultsOption = Path("results"),
) -> None:
    """Convert raw files once into the fast prepared form, with a checksum manifest."""
    dataset = get_dataset(name)
    require_preparable(dataset)
    if not source.is_dir():
        raise FedbenchError(f"--source {source} is not a folder")
    cfg = {**data_config(dataset, preset, list(set_ or [])), "path": str(source)}
    target = out_dir or dataset.default_dir(source, cfg, Path(results_dir) / "cache")
    try:
        directory = Path(dataset.prepare(source, Path(target), cfg))
    except FedbenchError as exc:
        report_problems(getattr(exc, "lines", None) or [str(exc)])
    manifest = read_json(directory / "manifest.json")
    for line in manifest.get("orphans", []):
        typer.echo(f"warning: left out: {one_line(line)}", err=True)
    sites = manifest.get("sites", {})
    counts = ", ".join(f"{s} {v.get('samples', '?')}" for s, v in sites.items())
    echo(f"prepared {name}: {counts} samples")
    echo(f"in {directory}")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def prepared_dirs(name: str, directory: Path | None, results_dir: Path) -> list[Path]:
    """The folder given, or every prepared folder of `name` in the results cache."""
    if directory is not None:
        return [directory]
    found = sorted((Path(results_dir) / "cache" / "datasets").glob(f"{name}-*"))
    if not found:
        raise FedbenchError(
            f"no prepared folder of '{name}' under {Path(results_dir) / 'cache' / 'datasets'}; "
            "name one with --dir"
        )
    return found


@datasets_app.command("verify")
@user_errors
def verify_command(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    directory: Annotated[Path | None, typer.Option("--dir", help="Prepared folder.")] = None,
    results_dir: ResultsOption = Path("results"),
) -> None:
    """Check prepared files against their manifest; each bad file is one line, exit 1."""
    dataset = get_dataset(name)
    require_preparable(dataset)
    problems = []
    for folder in prepared_dirs(name, directory, results_dir):
        found = dataset.verify(folder)
        problems += found
        if not found:
            echo(f"ok: {folder}")
    if problems:
        report_problems(problems)


@datasets_app.command("show")
@user_errors
def show_command(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    out_file: Annotated[Path, typer.Option("--out", help="PNG file to write.")],
    per_site: Annotated[int, typer.Option(help="Images per site.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed (splits, generated data).")] = 0,
    preset: Annotated[str, typer.Option(help="Preset whose data settings apply.")] = "default",
    set_: SetOption = None,
    results_dir: ResultsOption = Path("results"),
) -> None:
    """Draw a grid of a few images per site with their mask outlines (PNG)."""
    if per_site < 1:
        raise FedbenchError(f"--per-site must be at least 1, got {per_site}")
    dataset = get_dataset(name)
    cfg = data_config(dataset, preset, list(set_ or []))
    data = dataset.load(cfg, seed, Path(results_dir) / "cache")
    sample = data.sites[0].train
    if not data.task.dense_prediction or sample.targets.dim() != 3 or sample.inputs.dim() != 4:
        raise FedbenchError(f"dataset '{name}' has no images and masks to show")
    from fedbench.results.plots import dataset_figure

    dataset_figure(data, per_site, bool(getattr(dataset, "display_rgb", False)), out_file)
    echo(f"wrote {out_file}")


app.add_typer(datasets_app, name="datasets")
