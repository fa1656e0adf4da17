"""Study files on the command line: the cells `fedbench grid --study` runs, and which records
(and under which row labels) `fedbench leaderboard --study` puts on the study's board."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedbench.backends.study import Variant


def study_specs(path: Path, base: Any, reg: Any) -> list[Any]:
    """Every cell of a study file as RunSpecs carrying the study's name and their variant; the
    study's dataset, preset, seeds, holdout and rounds replace the command line's."""
    return [spec for spec, _ in labelled_specs(path, base, reg)]


def labelled_specs(path: Path, base: Any, reg: Any) -> list[tuple[Any, Variant]]:
    """(RunSpec, Variant) for every cell of a study file, parts in order."""
    from dataclasses import replace

    from fedbench.backends import grid
    from fedbench.backends.study import load_study, part_variants

    found = load_study(path)
    base = replace(
        base,
        dataset=found.dataset,
        preset=found.preset,
        holdout=found.holdout,
        rounds=found.rounds,
        study=found.name,
    )
    seeds = grid.parse_seeds(found.seeds)
    parts = [
        (
            replace(base, holdout=part.holdout) if part.holdout else base,
            grid.expand_names(part.methods, "methods", reg),
            grid.expand_names(part.adapters, "adapters", reg),
            part_variants(part),
        )
        for part in found.parts
    ]
    total = sum(
        len(methods) * len(grid.adapter_choices(own, adapters)) * len(variants) * len(seeds)
        for own, methods, adapters, variants in parts
    )
    grid.check_cell_count(total, f"study {path}")
    out: list[tuple[Any, Variant]] = []
    for own, methods, adapters, variants in parts:
        for variant in variants:
            specs = grid.cell_specs(own, methods, adapters, seeds, [variant])
            out += [(spec, variant) for spec in specs]
    return out


def changes_federation(variant: Variant) -> bool:
    """Whether a variant's settings reach the trained federation (anything but adapter.*)."""
    return any(not text.startswith("adapter.") for text in variant.overrides)


def study_variants(path: Path, reg: Any) -> tuple[str, Callable[[dict, str], list[str]], int]:
    """The study's dataset, the labels each record stands for on its board (by config hash and
    held-out sites), and how many distinct cells the study has. Inside, a variant that changes
    only the adapter shares the default federation, so it has no row of its own there."""
    from fedbench.backends.grid import same_holdouts
    from fedbench.engine.resolve import RunSpec, holdout_sites, resolve

    # per config hash: (label, whether it changes the federation, whether it has no settings)
    labels: dict[str, list[tuple[str, bool, bool]]] = {}
    wanted: dict[str, list[list[str] | None]] = {}
    dataset = ""
    for spec, variant in labelled_specs(path, RunSpec(method=""), reg):
        run = resolve(spec, reg)
        dataset = run.dataset.name
        entry = (variant.label, changes_federation(variant), not variant.overrides)
        if entry not in labels.setdefault(run.config_hash, []):
            labels[run.config_hash].append(entry)
        wanted.setdefault(run.config_hash, []).append(
            holdout_sites(spec.holdout, run.dataset.site_names(run.config["data"]))
        )
    any_inside = any(inside for entries in labels.values() for _, inside, _ in entries)

    def variants(record: dict, regime: str) -> list[str]:
        entries = labels.get(str(record.get("config_hash")), [])
        held = wanted.get(str(record.get("config_hash")), [])
        if not entries or not any(same_holdouts(record, sites) for sites in held):
            return []
        if regime != "inside":
            return [label for label, _, _ in entries]
        if not any_inside:
            return ["-"]
        chosen = [label for label, inside, _ in entries if inside]
        # the study's reference (a variant with no settings) has an inside row of its own
        # unless a swept value already names its federation
        return chosen or [label for label, _, plain in entries if plain]

    return dataset, variants, len(labels)
