"""The GPU script (benchmarks/gpu_protocol.py) run small on the CPU: the path a GPU session takes,
packed cells included. Cells packed two at a time on two CPUs run side by side, each with one
torch thread (the CPUs split between them), and the engine does the plain loop's exact work."""

from __future__ import annotations

import importlib.util
import json
import sys
from datetime import datetime
from itertools import combinations
from pathlib import Path

import pytest

pytest.importorskip("ray")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_protocol.py"


def records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((folder / "runs").glob("*.json"))]


def span(record: dict) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(record["started_at"]), datetime.fromisoformat(
        record["finished_at"]
    )


@pytest.mark.slow
def test_the_gpu_script_runs_on_the_cpu_with_cells_sharing_the_threads(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_protocol", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)
    spec.loader.exec_module(script)
    # cells of several seconds (default preset, 3 rounds), so that Ray's second worker, which
    # takes seconds to start, has cells left to share the CPUs with the first
    args = ["--out", str(tmp_path), "--device", "cpu", "--preset", "default", "--rounds", "3"]
    args += ["--repeats", "1", "--cells", "4", "--packings", "1,2", "--cpus", "2"]
    result = script.main(args)

    assert result["throughput"]["max_abs_difference"] == 0.0, "the engine did other work"
    assert result["throughput"]["engine_images_per_s"] > 0
    alone, packed = records(tmp_path / "packed-1"), records(tmp_path / "packed-2")
    assert [r["environment"]["threads"] for r in alone] == [2] * 4
    assert [r["environment"]["threads"] for r in packed] == [1] * 4
    spans = [span(r) for r in packed]
    overlapping = [max(a[0], b[0]) < min(a[1], b[1]) for a, b in combinations(spans, 2)]
    assert any(overlapping), "no two packed cells ran at the same time"
    learning_rates = [{r["config"]["train"]["lr"] for r in rs} for rs in (alone, packed)]
    assert learning_rates[0] == learning_rates[1] and len(learning_rates[0]) == 4
    projected = result["projection"]
    assert projected["packed_s"] == pytest.approx(
        projected["one_at_a_time_s"] / max(p["speedup"] for p in result["packing"])
    )
    assert (tmp_path / "gpu_protocol.json").is_file()
