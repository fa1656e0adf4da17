"""GPU figures in one short script (a few minutes of an H100):

1. throughput: the preset's federated training (paper: release U-Net, 384 px, batch 5, Adam, fp32)
   in images per second, fedbench's engine against a plain PyTorch loop doing the same steps with
   the same model and precision, interleaved (benchmarks/interleave.py);
2. packing: the same CELLS cells (IOP-FL, inside and one held-out site, ROUNDS rounds, one seed
   and data, learning rates a hair apart so that each is its own cell) run by `fedbench grid
   --backend ray`, K at once on one device for each K of PACKINGS (--gpus-per-run 1/K on a GPU,
   --cpus-per-run CPUS/K on a CPU); cells per hour against one at a time;
3. projection: the whole paper protocol of IOP-FL on this device (inside + every fold, 100
   rounds, 3 seeds): each cell's federation-round and adaptation seconds from the records of the
   cells run one at a time, scaled to the protocol's counts, divided by the best speed-up.

    python benchmarks/gpu_protocol.py --out OUT            # on the GPU machine
    python benchmarks/gpu_protocol.py --out OUT --device cpu --preset quick --packings 1,2

Writes OUT/gpu_protocol.json and prints a summary. tests/test_gpu_protocol.py runs it small on
the CPU, so the script a GPU session gets is the one CI ran."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from interleave import interleaved  # noqa: E402
from plain_loop import plain_fedavg  # noqa: E402

from fedbench.engine.registry import load_registry  # noqa: E402
from fedbench.engine.resolve import RunSpec, resolve  # noqa: E402
from fedbench.engine.training import train_federation  # noqa: E402

PROTOCOL = {"seeds": 3, "rounds": 100}  # inside + every fold, the paper's rounds, 3 seeds
HOLDOUT = "BIDMC"  # the one fold each packed cell trains besides the inside federation


def resolved(args: argparse.Namespace, method: str, rounds: int) -> Any:
    spec = RunSpec(
        method=method,
        preset=args.preset,
        device=args.device,
        rounds=rounds,
        overrides=list(args.set),
        results_dir=args.out / "data",
    )
    return resolve(spec, load_registry(()))


def synchronized(step: Any, device: torch.device) -> Any:
    """`step`, waiting for the device's queued work so that its clock stops when work does."""

    def run() -> Any:
        result = step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return result

    return run


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Images per second of the engine's FedAvg and of the plain loop (best interleaved rounds)."""
    run = resolved(args, "fedavg", args.rounds)
    data = run.dataset.load(run.config["data"], run.spec.seed, args.out / "data" / "cache")
    config = {**run.config, "eval": {**run.config["eval"], "history": False}}
    states: dict[str, dict[str, torch.Tensor]] = {}

    def build() -> torch.nn.Module:
        return run.build_model(data.task)

    def engine() -> None:
        states["engine"] = train_federation(
            data,
            data.sites,
            run.method,
            build,
            config,
            run.spec.seed,
            run.device,
            history=False,
            for_unseen_site=False,
        ).global_state

    def plain() -> None:
        states["plain"] = plain_fedavg(data, build, run.config["train"], run.spec.seed, run.device)

    variants = {"engine": engine, "plain": plain}
    variants = {name: synchronized(step, run.device) for name, step in variants.items()}
    timings = interleaved(variants, rounds=args.repeats, clock=time.perf_counter)
    images = args.rounds * sum(len(site.train) for site in data.sites)
    difference = max(
        (states["engine"][k].double() - v.double()).abs().max().item()
        for k, v in states["plain"].items()
    )
    return {
        "images": images,
        "max_abs_difference": difference,
        "engine_images_per_s": images / timings.best("engine"),
        "plain_images_per_s": images / timings.best("plain"),
        "engine_over_plain_time": timings.describe("engine", "plain"),
        "seconds": timings.seconds,
    }


def share_data_cache(source: Path, results_dir: Path) -> None:
    """Hard-link (else copy) the generated dataset into a results folder's cache."""
    for file in (source / "cache").rglob("*.npz"):
        target = results_dir / file.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file, target)
        except OSError:
            shutil.copy2(file, target)


def packed_grid(args: argparse.Namespace, cells_at_once: int) -> dict[str, Any]:
    """Wall time of CELLS cells run by the Ray grid, `cells_at_once` sharing the device."""
    results = args.out / f"packed-{cells_at_once}"
    shutil.rmtree(results, ignore_errors=True)
    share_data_cache(args.out / "data", results)
    lrs = ",".join(f"{1e-3 * (1 + i / 1000):.6g}" for i in range(args.cells))
    share = {"--gpus-per-run": f"{1 / cells_at_once:.6g}", "--cpus-per-run": "1"}
    if args.device == "cpu":
        share = {"--cpus-per-run": f"{max(1, args.cpus // cells_at_once)}"}
    command = [
        sys.executable, "-c", "from fedbench.cli import main; main()", "grid",
        "--method", "iopfl", "--seeds", "0", "--holdout", HOLDOUT,
        "--preset", args.preset, "--rounds", str(args.rounds), "--device", args.device,
        "--backend", "ray", "--results-dir", str(results), "--sweep", f"train.lr={lrs}",
        *[part for key, value in share.items() for part in (key, value)],
        *[part for setting in args.set for part in ("--set", setting)],
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall_s = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"packing {cells_at_once}: the grid failed:\n{done.stderr[-3000:]}")
    records = [json.loads(p.read_text()) for p in (results / "runs").glob("*.json")]
    if len(records) != args.cells or any(r["status"] != "ok" for r in records):
        raise SystemExit(f"packing {cells_at_once}: not {args.cells} finished cells")
    return {"cells_at_once": cells_at_once, "wall_s": wall_s, "records": records}


def cell_costs(record: dict[str, Any]) -> dict[str, float]:
    """Seconds per federation round and per adaptation of one cell, and its remaining seconds."""
    feds = record["cost"]["federations"]
    round_s = [f["train_s"] / f["rounds"] for f in feds.values()]
    adapt_s = [f["adapt_s"] for f in feds.values() if "adapt_s" in f]
    trained = sum(f["train_s"] for f in feds.values()) + sum(adapt_s)
    return {
        "round_s": sum(round_s) / len(round_s),
        "adapt_s": sum(adapt_s) / max(1, len(adapt_s)),
        "other_s": record["wall_s"] - trained,
    }


def projection(alone: dict[str, Any], speedup: float, sites: int) -> dict[str, float]:
    """The paper protocol's wall time from the cells run one at a time: per seed, `sites` + 1
    federations of 100 rounds and `sites` adaptations, plus the cell's other costs; packed,
    divided by the best packing's speed-up."""
    costs = [cell_costs(r) for r in alone["records"]]
    mean = {key: sum(c[key] for c in costs) / len(costs) for key in costs[0]}
    per_seed = (
        (sites + 1) * PROTOCOL["rounds"] * mean["round_s"]
        + sites * mean["adapt_s"]
        + mean["other_s"]
    )
    return {**mean, "one_at_a_time_s": PROTOCOL["seeds"] * per_seed,
            "packed_s": PROTOCOL["seeds"] * per_seed / speedup}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cells", type=int, default=4)
    parser.add_argument("--packings", default="1,2,4")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE for every run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"device": args.device, "preset": args.preset, "rounds": args.rounds}
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
    counts = [int(k) for k in args.packings.split(",")]
    if counts[0] != 1:
        raise SystemExit("--packings starts with 1: one cell at a time is the baseline")
    result["throughput"] = throughput(args)
    packings = [packed_grid(args, k) for k in counts]
    for p in packings:
        p["speedup"] = packings[0]["wall_s"] / p["wall_s"]
    best = max(p["speedup"] for p in packings)
    sites = packings[0]["records"][0]["cost"]["federations"]["inside"]["clients"]
    result["packing"] = [{k: v for k, v in p.items() if k != "records"} for p in packings]
    result["projection"] = projection(packings[0], best, sites)
    (args.out / "gpu_protocol.json").write_text(json.dumps(result, indent=2))
    print(summary(result))
    return result


def summary(result: dict[str, Any]) -> str:
    t, p = result["throughput"], result["projection"]
    lines = [
        f"{result.get('gpu', result['device'])}, preset {result['preset']}:",
        f"  training {t['engine_images_per_s']:.1f} images/s (engine), "
        f"{t['plain_images_per_s']:.1f} (plain loop); engine/plain time "
        f"{t['engine_over_plain_time']}; max |engine - plain| {t['max_abs_difference']:.1e}",
    ]
    for row in result["packing"]:
        lines.append(
            f"  {row['cells_at_once']} at once: {row['wall_s']:.1f} s, "
            f"speed-up {row['speedup']:.2f}x"
        )
    lines.append(
        f"  paper protocol of IOP-FL ({PROTOCOL['seeds']} seeds, inside + every fold, "
        f"{PROTOCOL['rounds']} rounds): {p['one_at_a_time_s'] / 60:.1f} min one at a time, "
        f"{p['packed_s'] / 60:.1f} min packed"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
