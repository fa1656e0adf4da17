"""`fedbench tune`: each method's settings chosen on validation data with the same number of
trials and the same training budget, written as a study file that `fedbench grid --study` runs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedbench.cli.app import STATE, app, echo, registry, say, user_errors
from fedbench.errors import FedbenchError

if TYPE_CHECKING:
    from fedbench.engine.tuning import Tuned

HEADER = """Written by `fedbench tune` (last on {day}): each part holds the settings its tuning
chose on the preset's training budget, on validation data only; its `tuned` table says how
(trials, objective, best value, seed, CPU-hours). An adapter is tuned once per unseen site,
never reading that site: one part per site, one row on the board. Run it with
  fedbench grid --study {path}"""


#: the description of the study files tune writes, and the only ones it adds parts to
DESCRIPTION = "settings chosen by fedbench tune"


def tune_command(
    method: Annotated[
        list[str] | None,
        typer.Option("--method", help="Method to tune (repeat); with --adapter, its federation."),
    ] = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option("--adapter", help="Adapter to tune per unseen site (repeat)."),
    ] = None,
    dataset: Annotated[str, typer.Option(help="Dataset name.")] = "synth-prostate",
    preset: Annotated[str, typer.Option(help="quick, default or paper.")] = "default",
    rounds: Annotated[int | None, typer.Option(help="Federated rounds of every trial.")] = None,
    trials: Annotated[int, typer.Option(min=1, help="Trials per tuning.")] = 20,
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
    """Tune each method (or adapter) on validation data (Optuna; a killed tuning resumes) and
    write the tuned settings as a study file."""
    from fedbench.engine.resolve import RunSpec

    if backend not in ("local", "ray"):
        raise FedbenchError(f"unknown --backend '{backend}'; known: local, ray")
    if not method and not adapter:
        raise FedbenchError("give --method NAME or --adapter NAME (repeat for more)")
    if adapter and backend != "local":
        raise FedbenchError("adapters are tuned on the local backend (their trials are short)")
    out = out or results_dir / "studies" / f"tuned-{dataset}.toml"
    top = {"dataset": dataset, "preset": preset, **({"rounds": rounds} if rounds else {})}
    check_destination(out, top)
    reg = registry()
    base = RunSpec(
        method="",
        dataset=dataset,
        seed=seed,
        preset=preset,
        device=device,
        rounds=rounds,
        overrides=list(set_ or []),
        results_dir=results_dir,
    )
    fixed = fixed_settings(list(set_ or []))
    methods = list(dict.fromkeys(method or (["fedavg"] if adapter else [])))
    check_names(reg, methods, list(dict.fromkeys(adapter or [])), list(set_ or []))
    parts: list[dict[str, Any]] = []
    for name in methods:
        spec = replace(base, method=name)
        if adapter:
            for found in adapter_tunings(spec, reg, trials, list(dict.fromkeys(adapter))):
                parts.append(adapter_part(found, name, fixed))
                write_study(out, top, parts)
            continue
        say(f"tuning {name}: {trials} trials")
        if backend == "ray":
            found = tuned_on_ray(
                spec, reg, trials, ray_address, cpus_per_run, gpus_per_run, parallel
            )
        else:
            found = tuned_here(spec, reg, trials)
        echo(line_for(found))
        parts.append(method_part(found, fixed))
        write_study(out, top, parts)
    echo(f"study {out}")


def check_names(reg: Any, methods: list[str], adapters: list[str], fixed: list[str]) -> None:
    """Every name, search space and --set checked before any training: one line, not an error
    an hour into the tuning."""
    from fedbench.engine.tuning import check_fixed, method_space
    from fedbench.engine.tuning_adapters import adapter_space

    for name in methods:
        found = reg.get("methods", name)
        if not adapters:
            check_fixed(method_space(found), fixed)
    for name in adapters:
        check_fixed(adapter_space(reg, name), fixed)


def fixed_settings(assignments: list[str]) -> dict[str, str]:
    """--set settings as the text --set took, which the grid's --set reads back the same."""
    from fedbench.engine.config import parse_assignment

    return {".".join(key): value for key, value in map(parse_assignment, assignments)}


def method_part(found: Tuned, fixed: dict[str, str]) -> dict[str, Any]:
    return {
        "name": found.method,
        "methods": [found.method],
        "settings": {**fixed, **found.settings},
        "tuned": {**found.provenance(), "cpu_hours": round(found.cpu_s / 3600, 3)},
    }


def adapter_part(found: Tuned, method: str, fixed: dict[str, str]) -> dict[str, Any]:
    adapter = found.method.split(" on ")[0]
    return {
        "name": f"{adapter} tuned on {method}",
        "holdout": found.holdout,
        "methods": [method],
        "adapters": [adapter],
        "settings": {**fixed, **found.settings},
        "tuned": {**found.provenance(), "cpu_hours": round(found.cpu_s / 3600, 3)},
    }


def adapter_tunings(spec: Any, reg: Any, trials: int, adapters: list[str]) -> Iterator[Tuned]:
    """Each adapter tuned on `spec.method`'s federations, once per unseen site."""
    from fedbench.engine.resolve import resolve
    from fedbench.engine.tuning_adapters import tune_adapter

    run = resolve(replace(spec, holdout="none"), reg)
    sites = run.dataset.site_names(run.config["data"])
    if sites is None:  # a dataset that knows its sites only once loaded
        cache = Path(spec.results_dir) / "tuning" / "cache"
        sites = [s.name for s in run.dataset.load(run.config["data"], spec.seed, cache).sites]
    for name in adapters:
        for unseen in sites:
            say(f"tuning {name} on {spec.method} for unseen site {unseen}: {trials} trials")
            line = lambda done, n, a=name: say(f"  {a}: trial {done}/{n}")  # noqa: E731
            found = tune_adapter(replace(spec, adapter=name), reg, trials, unseen, line)
            echo(line_for(found))
            yield found


def tuned_here(spec: Any, reg: Any, trials: int) -> Tuned:
    """One method's tuning in this process, a line per trial."""
    from fedbench.engine.tuning import tune_method

    return tune_method(spec, reg, trials, lambda done, n: say(f"  {spec.method}: trial {done}/{n}"))


def tuned_on_ray(
    spec: Any,
    reg: Any,
    trials: int,
    address: str | None,
    cpus: float,
    gpus: float,
    parallel: int,
) -> Tuned:
    """One method's tuning as parallel trials on Ray."""
    from fedbench.backends.ray_backend import RayOptions
    from fedbench.backends.ray_tuning import tune_on_ray

    say(f"  {spec.method}: {parallel} trials at a time on Ray")
    options = RayOptions(address, cpus, gpus, tuple(STATE["plugins"]))
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
    if old.description != DESCRIPTION:  # a study someone wrote: never rewritten
        raise FedbenchError(f"{out} is not a study fedbench tune wrote; give another --out")
    theirs = {"dataset": old.dataset, "preset": old.preset, "rounds": old.rounds}
    ours = {"rounds": None, **top}
    if theirs != ours:
        raise FedbenchError(
            f"{out} holds settings tuned for {theirs}, not {ours}; give another --out"
        )


def write_study(out: Path, top: dict[str, Any], parts: list[dict[str, Any]]) -> None:
    """Write (or update) the tuned study file after each tuning, atomically."""
    from fedbench.backends.study import merged_parts, study_text
    from fedbench.engine.federations import claimed
    from fedbench.storage import write_atomic

    header = HEADER.format(day=date.today(), path=out)
    name = {"name": out.stem, "description": DESCRIPTION}
    top = {**name, **top, "seeds": "0,1,2", "holdout": "all"}
    out.parent.mkdir(parents=True, exist_ok=True)
    with claimed(out):  # two tunings writing one study file: neither loses the other's parts
        text = study_text(top, merged_parts(out, parts), header)
        write_atomic(out, lambda handle: handle.write(text.encode("utf-8")))


app.command("tune")(user_errors(tune_command))
