"""Studies and sweeps: a grid kept in a TOML file beside the paper, and `--sweep KEY=V1,V2`.

A study names a dataset, methods, adapters, seeds, preset, settings and sweeps; its optional
`[[part]]` tables are sub-grids that inherit the top level (an ablation: one part per factor).
Every cell gets a variant label ("alpha: method.alpha=0.3") that a study's board uses as a row.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbench.engine.config import flatten
from fedbench.errors import FedbenchError

#: the keys a study file (and each of its parts) may hold
STUDY_KEYS = {"name", "description", "dataset", "preset", "seeds", "holdout", "rounds", "part"}
PART_KEYS = {"name", "methods", "adapters", "settings", "sweep", "tuned", "holdout"}
#: at most this many cells come out of one sweep product (a typo is refused, not expanded)
MAX_SWEEP_CELLS = 1000


@dataclass
class Part:
    """One sub-grid of a study: methods x adapters x the sweep product, with extra settings."""

    name: str
    methods: list[str]
    adapters: list[str]
    settings: list[str] = field(default_factory=list)
    sweep: dict[str, list[str]] = field(default_factory=dict)
    #: where `fedbench tune` found the settings (trials, objective, value, seed, study)
    tuned: dict[str, Any] | None = None
    #: the sites this part holds out, when not the study's (an adapter tuned per unseen site:
    #: parts of one name, one per site, make one row)
    holdout: str | None = None


@dataclass
class Study:
    """A study file, read and checked: what `fedbench grid --study` runs."""

    name: str
    path: Path
    dataset: str = "synth-prostate"
    preset: str = "default"
    seeds: str = "0,1,2"
    holdout: str = "all"
    rounds: int | None = None
    parts: list[Part] = field(default_factory=list)
    description: str = ""


@dataclass(frozen=True)
class Variant:
    """The extra settings of one cell group and the label its board row carries."""

    label: str
    overrides: tuple[str, ...] = ()
    #: the part's `tuned` table: its records say where their settings came from
    tuning: dict[str, Any] | None = None


def setting_text(value: Any) -> str:
    """A TOML value as the `--set` parser reads it (true/false, numbers, comma lists)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(setting_text(v) for v in value)
    if isinstance(value, (int, float, str)):
        return str(value)
    raise FedbenchError(f"setting value {value!r} is not a string, number, boolean or list")


def parse_sweep(texts: list[str]) -> dict[str, list[str]]:
    """`--sweep KEY=V1,V2` options -> {KEY: [V1, V2]}; each key once, each value once."""
    sweep: dict[str, list[str]] = {}
    for text in texts:
        key, sep, values = text.partition("=")
        key = key.strip()
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+", key) or not items:
            raise FedbenchError(f"bad --sweep '{text}': expected KEY=V1,V2, e.g. method.mu=0,0.01")
        if key in sweep:
            raise FedbenchError(f"--sweep {key} given twice; put all its values in one option")
        if len(set(items)) != len(items):
            raise FedbenchError(f"bad --sweep '{text}': a value is repeated")
        sweep[key] = items
    return sweep


def sweep_variants(sweep: dict[str, list[str]], prefix: str = "") -> list[Variant]:
    """The product of a sweep's values, one Variant per combination (one with no settings when
    nothing is swept)."""
    size = 1
    for values in sweep.values():
        size *= len(values)
    if size > MAX_SWEEP_CELLS:
        raise FedbenchError(f"the sweep has {size} combinations; at most {MAX_SWEEP_CELLS}")
    out = []
    for combo in itertools.product(*sweep.values()):
        pairs = [f"{k}={v}" for k, v in zip(sweep, combo, strict=True)]
        label = ", ".join(pairs)
        label = f"{prefix}: {label}" if prefix and label else (prefix or label)
        out.append(Variant(label, tuple(pairs)))
    return out


def part_variants(part: Part) -> list[Variant]:
    """A part's variants: its fixed settings, then each combination of its sweep."""
    return [
        Variant(v.label, (*part.settings, *v.overrides), part.tuned)
        for v in sweep_variants(part.sweep, part.name)
    ]


def load_study(path: Path) -> Study:
    """Read and check a study file; every mistake is one line naming the file and the key."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise FedbenchError(f"cannot read study {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FedbenchError(f"study {path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise FedbenchError(f"study {path} nests its tables too deeply to read") from None
    where = f"study {path}"
    unknown_keys(raw, STUDY_KEYS | PART_KEYS, where)
    name = text_value(raw, "name", where, default=Path(path).stem)
    parts_raw = raw.get("part", [])
    if not isinstance(parts_raw, list) or not all(isinstance(p, dict) for p in parts_raw):
        raise FedbenchError(f"{where}: 'part' must be [[part]] tables")
    top = {k: v for k, v in raw.items() if k in PART_KEYS - {"name"}}
    parts = [read_part(top, {}, "", where)] if not parts_raw else []
    for i, table in enumerate(parts_raw, 1):
        unknown_keys(table, PART_KEYS, f"{where}, part {i}")
        label = text_value(table, "name", f"{where}, part {i}", default=f"part {i}")
        parts.append(read_part(top, table, label, f"{where}, part '{label}'"))
    if len({(p.name, p.holdout) for p in parts}) != len(parts):
        raise FedbenchError(f"{where}: two parts have the same name (and holdout)")
    return Study(
        name=name,
        path=Path(path),
        dataset=text_value(raw, "dataset", where, default="synth-prostate"),
        preset=text_value(raw, "preset", where, default="default"),
        seeds=setting_text(raw.get("seeds", "0,1,2")),
        holdout=setting_text(raw.get("holdout", "all")),
        rounds=rounds_value(raw, where),
        parts=parts,
        description=text_value(raw, "description", where, default=""),
    )


def read_part(top: dict[str, Any], table: dict[str, Any], label: str, where: str) -> Part:
    """One part: its own keys over the study's top-level ones (settings are merged)."""
    merged = {**top, **table}
    methods = name_list(merged, "methods", where)
    if not methods:
        raise FedbenchError(f"{where}: 'methods' is missing (e.g. methods = [\"fedavg\"])")
    settings = settings_table(top, "settings", where) | settings_table(table, "settings", where)
    sweep: dict[str, list[str]] = {}
    for key, values in settings_table(merged, "sweep", where).items():
        if not isinstance(values, list) or not values:
            raise FedbenchError(f"{where}: sweep '{key}' must be a non-empty list of values")
        sweep[key] = [setting_text(v) for v in values]
        if len(set(sweep[key])) != len(sweep[key]):
            raise FedbenchError(f"{where}: sweep '{key}' repeats a value")
    return Part(
        name=label,
        methods=methods,
        adapters=name_list(merged, "adapters", where),
        settings=[f"{k}={setting_text(v)}" for k, v in settings.items()],
        sweep=sweep,
        tuned=tuned_table(table, where),
        holdout=setting_text(table["holdout"]) if "holdout" in table else None,
    )


def tuned_table(table: dict[str, Any], where: str) -> dict[str, Any] | None:
    """A part's own `tuned` table (never inherited from the top level), as written by tune."""
    value = table.get("tuned")
    if value is not None and not isinstance(value, dict):
        raise FedbenchError(f"{where}: 'tuned' must be a table (fedbench tune writes it)")
    return value


def unknown_keys(table: dict[str, Any], known: set[str], where: str) -> None:
    extra = sorted(set(table) - known)
    if extra:
        raise FedbenchError(f"{where}: unknown key '{extra[0]}'; known: {', '.join(sorted(known))}")


def text_value(table: dict[str, Any], key: str, where: str, default: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or (key == "name" and not value.strip()):
        raise FedbenchError(f"{where}: '{key}' must be a non-empty string")
    return value


def rounds_value(table: dict[str, Any], where: str) -> int | None:
    value = table.get("rounds")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise FedbenchError(f"{where}: 'rounds' must be a positive integer")
    return value


def name_list(table: dict[str, Any], key: str, where: str) -> list[str]:
    value = table.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise FedbenchError(f"{where}: '{key}' must be a list of names")
    return value


def settings_table(table: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    """A table of settings with dotted keys; `train.lr = 1` (nested by TOML) and
    `"train.lr" = 1` mean the same."""
    value = table.get(key, {})
    if not isinstance(value, dict):
        raise FedbenchError(f"{where}: '{key}' must be a table of KEY = VALUE")
    return flatten(value)


def toml_value(value: Any) -> str:
    """A TOML value: strings quoted (JSON's escapes are TOML's), numbers and booleans as they
    are (floats in full), lists and inline tables of those."""
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise FedbenchError(f"cannot write {value!r} in a study file")


def study_text(top: dict[str, Any], parts: list[dict[str, Any]], comment: str = "") -> str:
    """A study file: `comment` lines, the top-level keys, then one [[part]] table each."""
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    lines += [f"{key} = {toml_value(value)}" for key, value in top.items()]
    for part in parts:
        lines += ["", "[[part]]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in part.items()]
    return "\n".join(lines) + "\n"


def merged_parts(path: Path, parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The parts of the study file at `path` (when there is one) with those of the same name
    and holdout replaced by `parts`, new ones added at the end: tuning another method loses
    nothing."""
    if not Path(path).exists():
        return list(parts)
    load_study(path)  # one clear line if it is not a study file
    old = tomllib.loads(Path(path).read_text(encoding="utf-8")).get("part", [])
    new = {(p["name"], p.get("holdout")): p for p in parts}
    kept = [new.pop((p.get("name"), p.get("holdout")), p) for p in old]
    return kept + list(new.values())
