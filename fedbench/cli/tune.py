"""`fedbench tune`: each method's settings chosen on validation data with the same number of
trials and the same training budget, written as a study file that `fedbench grid --study` runs."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedbench.cli.app import STATE, app, echo, registry, say, user_errors
from fedbench.errors import FedbenchError

if TYPE_CHECKING:
    from fedbench.engine.tuning import Tuned

HEADER = """Written by `fedbench tune` on {day}: each part holds the settings its method's tuning
chose with {trials} trials on the preset's training budget, on validation data only:
  {objective}.
`tuned` says where each part's settings came from. Run it with
  fedbench grid --study {path}"""


def tune_command(
    method: Annotated[list[str], typer.Option("--method", help="Method to tune (repeat).")],
    dataset: Annotated[str, typer.Option(help="Dataset name.")] = "synth-prostate",
    preset: Annotated[str, typer.Option(help="quick, default or paper.")] = "default",
    rounds: Annotated[int | None, typer.Option(help="Federated rounds of every trial.")] = None,
    trials: Annotated[int, typer.Option(min=1, help="Trials per method.")] = 20,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the search and of its runs.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Fix a setting: KEY=VALUE.")
    ] = None,
    results_dir: Annotated[
        Path, typer.Option(help="Results folder (the tuning keeps its studies in tuning/).")
    ] = Path("results"),
    out: Annotated[
        Path | None,
        typer.Option(help="Study file to write; default RESULTS/studies/tuned-DATASET.toml."),
    ] = None,
    backend: Annotated[
        str, typer.Option(help="local (one trial after another) or ray (parallel trials).")
    ] = "local",
    parallel: Annotated[int, typer.Option(min=1, help="Trials at a time on the ray backend.")] = 2,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster to join (e.g. auto); default: a local Ray.")
    ] = None,
    cpus_per_run: Annotated[float, typer.Option(help="CPUs each trial reserves.")] = 1.0,
    gpus_per_run: Annotated[float, typer.Option(help="GPUs each trial reserves.")] = 0.0,
) -> None:
    """Tune each method on validation data (Optuna; a killed tuning resumes) and write the
    tuned settings as a study file."""
    from fedbench.engine.resolve import RunSpec

    if backend not in ("local", "ray"):
        raise FedbenchError(f"unknown --backend '{backend}'; known: local, ray")
    out = out or results_dir / "studies" / f"tuned-{dataset}.toml"
    top = {"dataset": dataset, "preset": preset, **({"rounds": rounds} if rounds else {})}
    check_destination(out, top)
    reg = registry()
    if backend == "ray":
        from fedbench.backends.ray_backend import RayOptions

        plugins = tuple(STATE["plugins"])
        ray = (RayOptions(ray_address, cpus_per_run, gpus_per_run, plugins), parallel)
    found: list[Tuned] = []
    for name in dict.fromkeys(method):
        spec = RunSpec(
            method=name,
            dataset=dataset,
            seed=seed,
            preset=preset,
            device=device,
            rounds=rounds,
            overrides=list(set_ or []),
            results_dir=results_dir,
        )
        say(f"tuning {name}: {trials} trials")
        tuned = (
            tuned_here(spec, reg, trials)
            if backend == "local"
            else tuned_on_ray(spec, reg, trials, *ray)
        )
        found.append(tuned)
        echo(line_for(tuned))
        write_study(out, top, found, list(set_ or []), trials)
    echo(f"study {out}")


def tuned_here(spec: Any, reg: Any, trials: int) -> Tuned:
    """One method's tuning in this process, a line per trial."""
    from fedbench.engine.tuning import tune_method

    return tune_method(spec, reg, trials, lambda done, n: say(f"  {spec.method}: trial {done}/{n}"))


def tuned_on_ray(spec: Any, reg: Any, trials: int, options: Any, parallel: int) -> Tuned:
    """One method's tuning as parallel trials on Ray."""
    from fedbench.backends.ray_tuning import tune_on_ray

    say(f"  {spec.method}: {parallel} trials at a time on Ray")
    return tune_on_ray(spec, reg, trials, options, parallel)


def line_for(tuned: Tuned) -> str:
    """What a tuning found, on one line."""
    settings = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in tuned.settings.items()
    )
    return (
        f"{tuned.method}: {settings} (validation dice {tuned.value:.4f}; {tuned.trials} trials, "
        f"{tuned.pruned} pruned, {tuned.failed} failed; {tuned.cpu_s / 3600:.2f} CPU-hours)"
    )


def check_destination(out: Path, top: dict[str, Any]) -> None:
    """An existing study file takes the new parts only when it was tuned on the same dataset,
    preset and rounds (its other parts stay); anything else is refused before any work."""
    from fedbench.backends.study import load_study

    if not out.exists():
        return
    old = load_study(out)
    theirs = {"dataset": old.dataset, "preset": old.preset, "rounds": old.rounds}
    ours = {"rounds": None, **top}
    if theirs != ours:
        raise FedbenchError(
            f"{out} holds settings tuned for {theirs}, not {ours}; give another --out"
        )


def write_study(
    out: Path, top: dict[str, Any], found: list[Tuned], fixed: list[str], trials: int
) -> None:
    """Write (or update) the tuned study file after each method, atomically."""
    from fedbench.backends.study import merged_parts, study_text
    from fedbench.engine.config import parse_assignment
    from fedbench.engine.tuning import OBJECTIVE
    from fedbench.storage import write_atomic

    # fixed settings stay the text --set took, which the grid's --set reads back the same
    fixed_settings = {".".join(key): value for key, value in map(parse_assignment, fixed)}
    parts = [
        {
            "name": t.method,
            "methods": [t.method],
            "settings": {**fixed_settings, **t.settings},
            "tuned": {**t.provenance(), "cpu_hours": round(t.cpu_s / 3600, 3)},
        }
        for t in found
    ]
    header = HEADER.format(day=date.today(), objective=OBJECTIVE, trials=trials, path=out)
    name = {"name": out.stem, "description": "settings chosen by fedbench tune"}
    top = {**name, **top, "seeds": "0,1,2", "holdout": "all"}
    text = study_text(top, merged_parts(out, parts), header)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda handle: handle.write(text.encode("utf-8")))


app.command("tune")(user_errors(tune_command))
