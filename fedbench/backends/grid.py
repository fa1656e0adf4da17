"""A grid: the cross product of methods x adapters x seeds, one run per cell. Finished cells (an
ok record with the same config hash) are skipped, so an interrupted grid continues where it
stopped; a failing cell is reported, recorded as failed, and the grid goes on. Cells whose records
all failed or diverged are not re-run unless asked (retry_failed). Backends run the pending cells:
`local` here, `ray` in fedbench.backends.ray_backend."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from fedbench.backends.study import Variant
from fedbench.engine.config import check_seed
from fedbench.engine.registry import Registry
from fedbench.engine.resolve import RunSpec, holdout_sites, resolve
from fedbench.engine.run import run_identity
from fedbench.errors import FedbenchError
from fedbench.results.record import build_record, new_run_id, read_records
from fedbench.task import POOLED

BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class Cell:
    """One run of the grid: what to run and the config hash that identifies its result."""

    spec: RunSpec
    config_hash: str
    holdouts: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        adapter = f" + {self.spec.adapter}" if self.spec.adapter else ""
        variant = f" [{self.spec.variant}]" if self.spec.variant else ""
        return f"{self.spec.method}{adapter}{variant}, seed {self.spec.seed}"


@dataclass
class CellResult:
    """What became of one cell: ok, skipped (already done), failed or diverged."""

    cell: Cell
    status: str
    run_id: str | None = None
    error: str | None = None
    wall_s: float = 0.0


@dataclass
class GridPlan:
    """The cells to run, the ones already done, those that cannot run, those whose earlier runs
    failed (not re-run without retry_failed), and notes about combinations left out."""

    pending: list[Cell] = field(default_factory=list)
    done: list[CellResult] = field(default_factory=list)
    failed: list[CellResult] = field(default_factory=list)
    earlier: list[CellResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


OnResult = Callable[[CellResult], None]


class Backend(Protocol):
    """Runs cells and calls `on_result` once per cell as each one finishes (in any order)."""

    def __call__(self, cells: Sequence[Cell], on_result: OnResult) -> None: ...


#: at most this many seeds in one grid (a typo such as 0-99999999 is refused, not expanded)
MAX_SEEDS = 1000


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' or '0-4' (or a mix) -> sorted distinct seeds, each a valid seed, at most
    MAX_SEEDS of them; anything else is one clear error, found before anything is expanded."""
    seeds: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        try:
            if "-" in part.lstrip("-"):
                low, high = (check_seed(int(x)) for x in part.split("-", 1))
                if low > high:
                    raise FedbenchError(f"bad --seeds '{text}': range {part} runs backwards")
                if high - low + 1 > MAX_SEEDS - len(seeds):
                    raise FedbenchError(f"--seeds '{text}' asks for more than {MAX_SEEDS} seeds")
                seeds.update(range(low, high + 1))
            elif part:
                seeds.add(check_seed(int(part)))
        except ValueError:
            raise FedbenchError(f"bad --seeds '{text}': expected e.g. 0,1,2 or 0-4") from None
    if not seeds:
        raise FedbenchError(f"bad --seeds '{text}': expected e.g. 0,1,2 or 0-4")
    if len(seeds) > MAX_SEEDS:
        raise FedbenchError(f"--seeds '{text}' asks for more than {MAX_SEEDS} seeds")
    return sorted(seeds)


def expand_names(names: Sequence[str], kind: str, registry: Registry) -> list[str]:
    """Check every name against the registry; 'all' stands for every registered one."""
    out: list[str] = []
    for name in names:
        chosen = registry.names(kind) if name == "all" else [name]
        for item in chosen:
            registry.get(kind, item)
            if item not in out:
                out.append(item)
    return out


#: at most this many cells in one grid or study, counted before any is expanded (a product of
#: sweeps, seeds and parts that no machine could run is refused, not expanded into memory)
MAX_CELLS = 10_000


def check_cell_count(count: int, what: str = "the grid") -> None:
    """Refuse a plan of more than MAX_CELLS cells, before it is expanded."""
    if count > MAX_CELLS:
        raise FedbenchError(
            f"{what} asks for {count:,} cells; at most {MAX_CELLS:,} (fewer seeds, sweep values "
            "or methods)"
        )


def check_one_value_per_key(overrides: list[str]) -> None:
    """Refuse two values for one setting in a cell (a --sweep of a key --set also gives, or a
    study part's settings and sweep naming one key): the later would silently win."""
    seen: dict[str, str] = {}
    for text in overrides:
        key = text.partition("=")[0].strip()
        if key in seen and seen[key] != text:
            raise FedbenchError(
                f"setting {key} is given twice ({seen[key]!r} and {text!r}): --set and --sweep "
                "(or a part's settings and its sweep) must not name the same key"
            )
        seen[key] = text


def adapter_choices(base: RunSpec, adapters: list[str]) -> list[str | None]:
    """The adapters a grid crosses: those given (never with --holdout none), else the default."""
    return list(adapters) if adapters and base.holdout != "none" else [None]


def cell_specs(
    base: RunSpec,
    methods: list[str],
    adapters: list[str],
    seeds: list[int],
    variants: Sequence[Variant] = (Variant(""),),
) -> list[RunSpec]:
    """The cross product methods x adapters x variants x seeds as RunSpecs; no adapters given
    means each method's default adapter; a variant adds its settings and names its cells."""
    choices = adapter_choices(base, adapters)
    check_cell_count(len(methods) * len(choices) * len(variants) * len(seeds))
    for variant in variants:
        check_one_value_per_key([*base.overrides, *variant.overrides])
    return [
        replace(
            base,
            method=m,
            adapter=a,
            seed=s,
            overrides=[*base.overrides, *v.overrides],
            variant=v.label or base.variant,
            tuning=v.tuning or base.tuning,
        )
        for m in methods
        for a in choices
        for v in variants
        for s in seeds
    ]


def records_by_hash(results_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Every valid record under RESULTS/runs by config hash, oldest first (invalid files are
    ignored here)."""
    by_hash: dict[str, list[dict[str, Any]]] = {}
    if not (Path(results_dir) / "runs").is_dir():
        return by_hash
    records, _ = read_records(results_dir)
    for record in sorted(records, key=lambda r: (str(r["finished_at"]), r["run_id"])):
        by_hash.setdefault(record["config_hash"], []).append(record)
    return by_hash


def same_holdouts(record: dict[str, Any], wanted: list[str] | None) -> bool:
    """Whether a record held out the sites a cell asks for (the config hash does not say);
    `wanted` None means all of the dataset's sites, read from the record's inside rows."""
    held = set(record.get("holdouts") or [])
    if wanted is None:
        inside = {r["site"] for r in record["metrics"] if r.get("regime") == "inside"}
        wanted = sorted(inside - {POOLED})  # the pooled-test row is no site
    return held == set(wanted)


def place(plan: GridPlan, cell: Cell, records: list[dict[str, Any]], retry_failed: bool) -> None:
    """Put a cell in the plan from its earlier records (oldest first): any ok one means done;
    otherwise the latest failed or diverged one keeps it out unless `retry_failed`."""
    ok = next((r for r in records if r["status"] == "ok"), None)
    if ok is not None:
        plan.done.append(CellResult(cell, "skipped", run_id=ok["run_id"]))
    elif records and not retry_failed:
        last = records[-1]
        note = f"{last.get('error') or 'no message'} (earlier run; --retry-failed runs it again)"
        plan.earlier.append(CellResult(cell, last["status"], run_id=last["run_id"], error=note))
    else:
        plan.pending.append(cell)


def plan_grid(specs: list[RunSpec], registry: Registry, retry_failed: bool = False) -> GridPlan:
    """Resolve each cell, skip the finished (and, unless `retry_failed`, the failed) ones and
    leave out impossible combinations."""
    plan = GridPlan()
    done = records_by_hash(specs[0].results_dir) if specs else {}
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for spec in specs:
        try:
            run = resolve(spec, registry)
        except FedbenchError as exc:
            plan.failed.append(CellResult(Cell(spec, ""), "failed", error=str(exc)))
            continue
        concrete = replace(spec, adapter=run.adapter_name)
        try:
            if run.adapter is not None:
                run.adapter.check_method(run.method)
        except FedbenchError as exc:
            note = f"left out {concrete.method} + {concrete.adapter}: {exc}"
            if note not in plan.notes:
                plan.notes.append(note)
            continue
        wanted = holdout_sites(spec.holdout, run.dataset.site_names(run.config["data"]))
        cell = Cell(concrete, run.config_hash, tuple(wanted or ()))
        if (cell.config_hash, cell.holdouts) in seen:
            continue  # the same run asked for twice (a swept value equal to another part's)
        seen.add((cell.config_hash, cell.holdouts))
        records = [r for r in done.get(cell.config_hash, []) if same_holdouts(r, wanted)]
        place(plan, cell, records, retry_failed)
    if plan.failed and not (plan.pending or plan.done or plan.earlier):
        raise FedbenchError(plan.failed[0].error or "no cell of the grid can run")
    return plan


def error_message(exc: BaseException) -> str:
    """One line naming what went wrong: a FedbenchError's own text, else the exception type too."""
    return str(exc) if isinstance(exc, FedbenchError) else f"{type(exc).__name__}: {exc}"


def failed_record(
    cell: Cell, error: str, registry: Registry, started: str, wall_s: float
) -> dict[str, Any]:
    """A valid failed record for a cell whose run died before writing its own; `error` names the
    cause. Written by the driver (environment: the driver's)."""
    run = resolve(cell.spec, registry)
    return build_record(
        run_id=new_run_id(
            run.dataset.name, run.method.name, run.adapter_name, cell.spec.seed, cell.config_hash
        ),
        status="failed",
        identity=run_identity(run),
        holdouts=list(cell.holdouts),
        config=run.config,
        config_hash=cell.config_hash,
        device=cell.spec.device,
        started_at=started,
        wall_s=wall_s,
        error=error,
    )


def result_of(cell: Cell, record: dict[str, Any], wall_s: float) -> CellResult:
    """The CellResult that a cell's record stands for."""
    return CellResult(
        cell, record["status"], run_id=record["run_id"], error=record.get("error"), wall_s=wall_s
    )


def failures(results: list[CellResult]) -> list[CellResult]:
    """The cells that did not end ok (failed or diverged); a cell another grid is running
    ("busy") is that grid's to finish."""
    return [r for r in results if r.status not in ("ok", "skipped", "busy")]
