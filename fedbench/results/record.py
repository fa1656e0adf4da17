"""The run record (DESIGN.md section 5): one JSON file per run, written atomically inside the
results folder."""

from __future__ import annotations

import json
import platform
import re
import secrets
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedbench import __version__
from fedbench.errors import FedbenchError
from fedbench.results.schema import SCHEMA_VERSION, record_problem
from fedbench.storage import write_json_atomic

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def safe_token(text: str) -> str:
    """A file-name-safe token: run ids can never escape the results folder."""
    return _UNSAFE.sub("-", text).strip(".-") or "x"


def new_run_id(dataset: str, method: str, adapter: str | None, seed: int, config_hash: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    parts = [
        dataset,
        method,
        adapter or "inside",
        f"s{seed}",
        config_hash[:8],
        stamp,
        secrets.token_hex(2),
    ]
    return "_".join(safe_token(p) for p in parts)


def git_sha() -> str | None:
    """The commit fedbench runs from, when it runs from a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def environment(device: str) -> dict[str, Any]:
    import torch

    return {
        "fedbench": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_sha": git_sha(),
        "device": device,
        "threads": torch.get_num_threads(),
    }


def runs_dir(results_dir: Path) -> Path:
    """The records folder, created if needed; a results path that is a file or read-only is an
    error before any work starts."""
    results_dir = Path(results_dir)
    if results_dir.exists() and not results_dir.is_dir():
        raise FedbenchError(f"results folder {results_dir} is a file, not a folder")
    runs = results_dir / "runs"
    try:
        runs.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=runs, prefix=".probe-"):
            pass
    except OSError as exc:
        raise FedbenchError(
            f"results folder {results_dir} is not writable: {exc.strerror}"
        ) from None
    return runs


def write_record(results_dir: Path, record: dict[str, Any]) -> Path:
    runs = runs_dir(results_dir)
    path = runs / f"{safe_token(record['run_id'])}.json"
    write_json_atomic(path, record)
    return path


def build_record(
    *,
    run_id: str,
    status: str,
    identity: dict[str, Any],
    holdouts: list[str],
    config: dict[str, Any],
    config_hash: str,
    device: str,
    started_at: str,
    wall_s: float,
    cost: dict[str, Any] | None = None,
    metrics: list[dict[str, Any]] | None = None,
    history: dict[str, Any] | None = None,
    val_best_rounds: dict[str, Any] | None = None,
    profile: dict[str, float] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """The one place a run record (DESIGN.md section 5) is put together, for runs that ended
    and for cells that died before writing their own. `identity` holds method, adapter,
    dataset, seed and preset."""
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "status": status,
        "method": identity["method"],
        "adapter": identity["adapter"] if holdouts else None,
        "dataset": identity["dataset"],
        "seed": identity["seed"],
        "preset": identity["preset"],
        "holdouts": list(holdouts),
        "config": config,
        "config_hash": config_hash,
        "code": identity.get("code", {}),
        "data_fingerprint": identity.get("data_fingerprint"),
        "environment": environment(device),
        "started_at": started_at,
        "finished_at": now_iso(),
        "wall_s": round(wall_s, 3),
        "cost": cost or {"bytes_up": 0, "bytes_down": 0, "client_steps": 0, "federations": {}},
        "metrics": list(metrics or []) if status == "ok" else [],
    }
    if history is not None:
        record["history"] = history
    if val_best_rounds:
        record["val_best_rounds"] = val_best_rounds
    if identity.get("hd95_unit"):
        record["hd95_unit"] = identity["hd95_unit"]
    # a cell of a study file (tuned) or a --sweep; a method that sends statistics of client data
    for key in ("study", "variant", "tuning", "shares_data", "adapter_mode"):
        if identity.get(key):
            record[key] = identity[key]
    if profile is not None:
        record["profile"] = profile
    if error:
        record["error"] = error
    return record


def validate_record(payload: Any) -> str | None:
    """Why `payload` is not a valid run record (one line naming the field), or None when it is:
    the fields and their types of DESIGN.md section 5, as fedbench/results/schema.py states them."""
    return record_problem(payload)


def read_records(results_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every valid record under RESULTS/runs, plus one warning line per file that is not one."""
    records, warnings = [], []
    for path in sorted((Path(results_dir) / "runs").glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as exc:
            warnings.append(f"skipped {path}: not valid JSON ({exc.__class__.__name__})")
            continue
        problem = validate_record(payload)
        if problem:
            warnings.append(f"skipped {path}: {problem}")
            continue
        records.append(payload)
    return records, warnings


def find_record(results_dir: Path, run_id: str) -> dict[str, Any]:
    """The valid record for a run id, a unique prefix of one, or a record file's path."""
    runs = Path(results_dir) / "runs"
    path = Path(run_id)
    if not (path.suffix == ".json" and path.is_file()):
        path = runs / f"{safe_token(run_id)}.json"
    if not path.is_file():
        matches = sorted(runs.glob(f"{safe_token(run_id)}*.json")) if runs.is_dir() else []
        if len(matches) != 1:
            found = "several match" if matches else f"no record in {runs}"
            raise FedbenchError(f"run '{run_id}' not found: {found}")
        path = matches[0]
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise FedbenchError(f"{path} is not a valid record: {type(exc).__name__}") from None
    problem = validate_record(payload)
    if problem:
        raise FedbenchError(f"{path} is not a valid record: {problem}")
    return payload
