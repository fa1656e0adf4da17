"""Leaderboard build time: read 200 generated run records from disk and build both boards (with
the Wilcoxon comparisons) and their Markdown. The limit is 2 s."""

from __future__ import annotations

import json
import random
from pathlib import Path

from fedbench.results.formats import render
from fedbench.results.leaderboard import build_leaderboard, load_records

SITES = ("BIDMC", "HK", "I2CVB", "ISBI", "ISBI1.5", "UCL")
METHODS = ("fedavg", "fedprox", "fedbn", "local", "iopfl")
ADAPTERS = ("none", "bn-adapt", "tent", "ensemble")
SEEDS = range(10)  # 5 methods x 4 adapters x 10 seeds = 200 records


def generated_record(method: str, adapter: str, seed: int, rng: random.Random) -> dict:
    """A record shaped like the runner's: dice and hd95, final and val-best, inside and outside."""
    rows = [
        {
            "regime": regime,
            "site": site,
            "holdout": site if regime == "outside" else None,
            "metric": metric,
            "value": rng.uniform(0.4, 0.9) if metric == "dice" else rng.uniform(2, 30),
            "selection": selection,
        }
        for regime in ("inside", "outside")
        for site in SITES
        for metric in ("dice", "hd95")
        for selection in ("final", "val-best")
    ]
    run_id = f"synth-prostate_{method}_{adapter}_s{seed}"
    feds = {k: {"bytes_up": 10**6, "bytes_down": 10**6} for k in ("inside", *SITES)}
    return {
        "schema_version": 1,
        "run_id": run_id,
        "status": "ok",
        "method": method,
        "adapter": adapter,
        "dataset": "synth-prostate",
        "seed": seed,
        "config": {"train": {"rounds": 12}},
        "config_hash": run_id,
        "environment": {},
        "started_at": "2024-01-01T00:00:00+00:00",
        "finished_at": "2024-01-01T01:00:00+00:00",
        "wall_s": 60.0,
        "cost": {"bytes_up": 7e6, "bytes_down": 7e6, "client_steps": 100, "federations": feds},
        "metrics": rows,
        "history": {"inside": [{"round": r, "val": dict.fromkeys(SITES, 0.5)} for r in range(12)]},
    }


def test_leaderboard_of_200_records(benchmark, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    rng = random.Random(0)
    for method in METHODS:
        for adapter in ADAPTERS:
            for seed in SEEDS:
                record = generated_record(method, adapter, seed, rng)
                (runs / f"{record['run_id']}.json").write_text(json.dumps(record))

    def build() -> str:
        records, warnings = load_records(tmp_path)
        assert len(records) == 200 and not warnings
        return render(build_leaderboard(records), "md")

    text = benchmark.pedantic(build, rounds=3, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.mean
    assert "| 20 | " in text  # 20 method + adapter rows outside
    print(f"\nleaderboard of 200 records: {seconds:.3f} s (limit 2 s)")
    assert seconds < 2.0
