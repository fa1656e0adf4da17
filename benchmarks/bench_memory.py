"""Memory of a run as the federation grows and as it runs longer.

Each run is a fresh child process (peak resident memory, VmHWM, cannot be reset inside one), an
IOP-FL run at the quick preset on the embedded dataset, inside regime only: IOP-FL is the method
with the most per-client state (an EMA model per site). A round-end hook records the resident set
size (VmRSS) after every round.

1. Sites: 6, 12 and 24 sites (`data.num_sites`), SITE_ROUNDS rounds each. Printed: peak memory
   and its ratio to 6 sites, and what one more site costs. The floor, a child that imports
   fedbench and torch and builds the model but trains nothing, is printed as the baseline.
2. Rounds: one 6-site run of LONG_ROUNDS rounds; the resident size at round 50 against round 5
   must not grow beyond noise (GROWTH_LIMIT).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

SITE_COUNTS = (6, 12, 24)
SITE_ROUNDS = 3
LONG_ROUNDS = 50
GROWTH_LIMIT = 1.05
MIB = 1024

CHILD = r"""
import json, sys
from pathlib import Path
from fedbench.hookspecs import hookimpl
from fedbench.engine.reporter import Reporter
from fedbench.engine.registry import load_registry
from fedbench.engine.resolve import RunSpec, resolve
from fedbench.engine.run import execute

def status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])

class RoundMemory:
    rss_kib = []

    @hookimpl
    def fedbench_round_end(self, round):
        self.rss_kib.append(status_kib("VmRSS"))

spec, train = json.loads(sys.argv[1]), sys.argv[2] == "train"
registry = load_registry()
registry.manager.register(RoundMemory())
run = resolve(RunSpec(**spec), registry)
if train:
    status = execute(run, registry, Reporter()).record["status"]
else:  # the floor: data loaded and the model built, nothing trained
    data = run.dataset.load(run.config["data"], 0, Path(spec["results_dir"]) / "cache")
    run.build_model(data.task)
    status = "floor"
peak = status_kib("VmHWM")
print(json.dumps({"status": status, "peak_kib": peak, "rss_kib": RoundMemory.rss_kib}))
"""


def run_child(results: Path, num_sites: int, rounds: int, train: bool = True) -> dict[str, Any]:
    """Peak and per-round resident memory (KiB) of one quick IOP-FL run in a fresh process."""
    spec = {
        "method": "iopfl",
        "preset": "quick",
        "holdout": "none",
        "rounds": rounds,
        "overrides": [f"data.num_sites={num_sites}"],
        "results_dir": str(results),
    }
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec), "train" if train else "floor"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(kib: int) -> float:
    return kib / MIB


def test_peak_memory_as_sites_grow(benchmark, tmp_path):
    def measure() -> dict[str, Any]:
        floor = run_child(tmp_path / "floor", SITE_COUNTS[0], SITE_ROUNDS, train=False)
        runs = {n: run_child(tmp_path / f"s{n}", n, SITE_ROUNDS) for n in SITE_COUNTS}
        return {"floor": floor, "runs": runs}

    result = benchmark.pedantic(measure, rounds=1, iterations=1)
    floor, runs = result["floor"], result["runs"]
    assert all(r["status"] == "ok" for r in runs.values())
    base = runs[SITE_COUNTS[0]]["peak_kib"]
    print(f"\nfloor (imports, 6-site data, model; no training): {mib(floor['peak_kib']):.0f} MiB")
    for n, r in runs.items():
        print(
            f"{n:>2} sites: peak {mib(r['peak_kib']):.0f} MiB, "
            f"{r['peak_kib'] / base:.2f}x the 6-site run, "
            f"{mib(r['peak_kib'] - floor['peak_kib']):.0f} MiB above the floor"
        )
    small, large = SITE_COUNTS[0], SITE_COUNTS[-1]
    per_site = (runs[large]["peak_kib"] - runs[small]["peak_kib"]) / (large - small)
    print(f"one more site costs {mib(per_site):.1f} MiB of peak memory")
    benchmark.extra_info["peak_mib"] = {n: round(mib(r["peak_kib"]), 1) for n, r in runs.items()}


def test_memory_does_not_grow_over_rounds(benchmark, tmp_path):
    result = benchmark.pedantic(
        run_child, args=(tmp_path, SITE_COUNTS[0], LONG_ROUNDS), rounds=1, iterations=1
    )
    rss = result["rss_kib"]
    assert result["status"] == "ok" and len(rss) == LONG_ROUNDS
    at_5, at_50 = rss[4], rss[LONG_ROUNDS - 1]
    growth = at_50 / at_5
    print(
        f"\nresident memory: round 5 {mib(at_5):.0f} MiB, round {LONG_ROUNDS} {mib(at_50):.0f} "
        f"MiB, ratio {growth:.3f} (range over rounds 5-{LONG_ROUNDS}: "
        f"{mib(min(rss[4:])):.0f}-{mib(max(rss[4:])):.0f} MiB); "
        f"peak {mib(result['peak_kib']):.0f} MiB"
    )
    benchmark.extra_info["rss_growth_5_to_50"] = round(growth, 4)
    assert growth <= GROWTH_LIMIT, f"memory grew {growth:.3f}x from round 5 to {LONG_ROUNDS}"
