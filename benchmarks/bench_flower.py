"""fedbench against Flower's simulation on the same FedAvg workload: the synth-prostate quick data
(6 sites), the quick U-Net, 10 rounds of 1 local epoch, Adam re-created every round, the same
batches in the same order, sample-weighted averaging of every parameter and buffer.

Each framework runs in its own subprocess (`python benchmarks/bench_flower.py WORKER ...`), so
neither pays for the other's imports, and this process samples the memory of that subprocess's
whole process tree (Flower's Ray backend starts a GCS server, a raylet and worker processes):
peak of the summed PSS (proportional set size: a page shared by k processes counts 1/k in each,
so shared libraries are not counted once per process) and, for reference, peak of the summed RSS
(which counts shared pages in every process and so overstates a multi-process tree). Both are
read from /proc every 250 ms, Linux only; a peak shorter than that can be missed, and sampling
costs CPU that a loaded machine takes from the run (printed). The kernel's exact peak RSS of the
largest single process (`ru_maxrss` from wait4) is printed as well.

Identical batches: fedbench draws every client's shuffle, one `torch.randperm(n_train)` per local
epoch, from that client's own stream (`client_stream(seed, client)`). A Flower ClientApp runs in
a Ray actor and only knows its partition id and the server round, so it takes the same stream
and replays its own draws of the earlier rounds; the same data then gives bit-identical batches.

Equal work, checked round by round: from the same global model both do bit-identical local
training, but the averages differ in the last bit, because Flower's FedAvg sums float32 arrays in
reply order (the nodes are sampled in random order) while fedbench sums in float64 in site order.
So every round of Flower's (its global model after each round is kept) is re-run here with
fedbench's own engine from Flower's previous global model, and the two must agree within
ROUND_TOLERANCE. The final models are compared too, but only printed: over 10 rounds that
last-bit difference grows to a few 1e-3 (Adam turns near-zero gradients, the largest being that
of the first conv's bias, which feeds BatchNorm, into steps of size lr whose sign is rounding
noise); fedbench's own loop with float32 instead of float64 averaging ends as far (5e-3) from
itself. Integer buffers (BatchNorm's
`num_batches_tracked`, averaged by Flower as float64) are rounded back on load, as fedbench does.

Wall times: the whole training call (Flower: `run_simulation`, which includes starting and
stopping Ray; fedbench: `train_federation`), and the steady state of rounds 2..10 (from the end of
round 1 to the end of round 10), which leaves out Ray's start and the actors' first imports;
each the best of REPEATS alternating runs (medians printed too), since other load on the machine
easily slows a run several times over.
Flower gets one client at a time with every core (`num_cpus` per client = the machine's cores),
which is how fedbench runs. Skipped without Flower >= 1.21 (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from bench_engine import ROUNDS, quick_setup, unet

from fedbench.data import FederatedData
from fedbench.engine.clients import client_stream
from fedbench.engine.training import Training, train_federation
from fedbench_plugins.fedavg import FedAvg

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, Context, Message
    from flwr.serverapp import Grid

FLOWER_MIN_VERSION = "1.21"  # the Message API used here: flwr.app, flwr.serverapp.strategy
SEED = 0
REPEATS = 3  # alternating runs of each framework; the best one is reported (a noisy machine)
ROUND_TOLERANCE = 1e-5  # one round from the same model: float32 vs float64 averaging only
SAMPLE_EVERY_S = 0.25  # one sample of Ray's ~11 processes costs ~15-50 ms of CPU here
State = dict[str, torch.Tensor]
#: call_s: seconds of the training call; stamps: perf_counter at each round's end; threads: torch's
Timings = dict[str, Any]


# ---- the two workers (run in subprocesses) ----------------------------------------------------


def run_fedbench(cache_dir: Path) -> tuple[list[State], Timings]:
    """fedbench's FedAvg: [its final global state] and timings."""
    data, config = quick_setup(cache_dir)
    stamps: list[float] = []
    start = time.perf_counter()
    result = train_federation(
        data,
        data.sites,
        FedAvg,
        unet(data, config),
        config,
        SEED,
        torch.device("cpu"),
        on_round=lambda _round, _scores: stamps.append(time.perf_counter()),
    )
    call_s = time.perf_counter() - start
    timings = {"call_s": call_s, "stamps": stamps, "threads": torch.get_num_threads()}
    return [result.global_state], timings


@functools.cache
def client_data(cache_dir: str) -> tuple[FederatedData, dict]:
    """The data and config, loaded once per Ray actor process (the cache is already written)."""
    return quick_setup(Path(cache_dir))


def replayed_generator(
    sizes: list[int], epochs: int, server_round: int, site: int
) -> torch.Generator:
    """Client `site`'s own random stream as it stands when it starts `server_round`: its
    draws of the earlier rounds replayed (fedbench gives every client a stream of its own)."""
    generator = client_stream(SEED, site)
    for _ in range((server_round - 1) * epochs):
        torch.randperm(sizes[site], generator=generator)
    return generator


def as_dtypes(state: State, like: State) -> State:
    """`state` cast to the dtypes of `like`, integer tensors rounded rather than truncated."""
    out = {}
    for key, ref in like.items():
        value = state[key]
        out[key] = (value if ref.dtype.is_floating_point else value.round()).to(ref.dtype)
    return out


def flower_train(cache_dir: str, message: Message, context: Context) -> Message:
    """The Flower ClientApp's train handler: one local round, exactly as fedbench's client."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    data, config = client_data(cache_dir)
    train = config["train"]
    site = int(context.node_config["partition-id"])
    split = data.sites[site].train
    model = unet(data, config)()
    received = message.content["arrays"].to_torch_state_dict()
    model.load_state_dict(as_dtypes(received, model.state_dict()))
    sizes = [len(s.train) for s in data.sites]
    server_round = int(message.content["config"]["server-round"])
    generator = replayed_generator(sizes, train["local_epochs"], server_round, site)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=train["lr"])
    for _ in range(train["local_epochs"]):
        for inputs, targets in split.batches(train["batch_size"], generator):
            optimizer.zero_grad(set_to_none=True)
            data.task.loss(model(inputs), targets).backward()
            optimizer.step()
    content = {
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord(
            {"num-examples": len(split), "torch-threads": torch.get_num_threads()}
        ),
    }
    return Message(RecordDict(content), reply_to=message)


def run_flower(cache_dir: Path) -> tuple[list[State], Timings]:
    """Flower's FedAvg in its simulation runtime: its global state before the first and after
    every round, and timings."""
    from flwr.app import ArrayRecord
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
    from flwr.simulation import run_simulation

    data, config = quick_setup(cache_dir)
    torch.manual_seed(SEED)  # the initial model exactly as fedbench's Training builds it
    initial = unet(data, config)().state_dict()
    n, out, stamps, states = len(data.sites), {}, [], []

    client = ClientApp()
    client.train()(functools.partial(flower_train, str(cache_dir)))
    server = ServerApp()

    def round_end(server_round: int, arrays: ArrayRecord) -> None:
        if server_round > 0:
            stamps.append(time.perf_counter())
        states.append(as_dtypes(arrays.to_torch_state_dict(), initial))

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FlowerFedAvg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(initial),
            num_rounds=ROUNDS,
            evaluate_fn=round_end,
        )
        out["threads"] = result.train_metrics_clientapp[ROUNDS]["torch-threads"]

    resources = {"num_cpus": os.cpu_count() or 1, "num_gpus": 0.0}
    start = time.perf_counter()
    run_simulation(server, client, n, backend_config={"client_resources": resources})
    call_s = time.perf_counter() - start
    return states, {"call_s": call_s, "stamps": stamps, "threads": out["threads"]}


WORKERS: dict[str, Callable[[Path], tuple[list[State], Timings]]] = {
    "fedbench": run_fedbench,
    "flower": run_flower,
}


def worker_main(name: str, cache_dir: Path, out_dir: Path) -> None:
    """Subprocess entry: run one framework, save its global states and timings under out_dir."""
    states, timings = WORKERS[name](cache_dir)
    torch.save(states, out_dir / f"{name}.pt")
    (out_dir / f"{name}.json").write_text(json.dumps(timings))


# ---- measuring a subprocess tree --------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    """`root` and all its live descendants, from the parent ids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def memory_kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in KiB, from /proc/PID/smaps_rollup; (0, 0) once it is gone."""
    values = {"Pss:": 0, "Rss:": 0}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            fields = line.split()
            if fields and fields[0] in values:
                values[fields[0]] = int(fields[1])
    except (OSError, ValueError):
        pass
    return values["Pss:"], values["Rss:"]


@dataclass
class Measured:
    """What one worker subprocess cost: wall seconds, peak memory in bytes (summed over its
    process tree, sampled; and the kernel's exact peak of its largest single process, reaped
    descendants included), and the CPU seconds the sampling itself took in this process."""

    process_s: float = 0.0
    peak_pss: int = 0
    peak_rss: int = 0
    max_rss_single: int = 0
    sampler_cpu_s: float = 0.0


def run_worker(name: str, cache_dir: Path, out_dir: Path) -> Measured:
    """Run a worker subprocess, sampling its process tree's memory until it exits."""
    command = [sys.executable, __file__, name, str(cache_dir), str(out_dir)]
    log = (out_dir / f"{name}.log").open("w")
    start = time.perf_counter()
    # Idle OpenMP threads sleep rather than spin, as the fedbench CLI sets it; the same for both
    # (Ray's actors inherit it), since spinning threads on a busy small machine slow torch down.
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    measured = Measured()
    done = threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_EVERY_S):
            totals = [memory_kib(pid) for pid in process_tree(proc.pid)]
            measured.peak_pss = max(measured.peak_pss, 1024 * sum(t[0] for t in totals))
            measured.peak_rss = max(measured.peak_rss, 1024 * sum(t[1] for t in totals))
        measured.sampler_cpu_s = time.thread_time()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)  # Popen.wait() would not return the rusage
    measured.process_s = time.perf_counter() - start
    measured.max_rss_single = usage.ru_maxrss * 1024  # KiB on Linux
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    log.close()
    if code != 0:
        tail = (out_dir / f"{name}.log").read_text()[-4000:]
        raise RuntimeError(f"{name} worker exited with {code}:\n{tail}")
    return measured


def load_outputs(name: str, out_dir: Path) -> tuple[list[State], Timings]:
    """A finished worker's global states and timings."""
    timings = json.loads((out_dir / f"{name}.json").read_text())
    return torch.load(out_dir / f"{name}.pt"), timings


def max_abs_difference(a: State, b: State) -> float:
    """Largest element-wise |a - b| over every tensor of two states with the same keys."""
    assert a.keys() == b.keys(), "the models differ in their keys"
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def rerun_difference(flower_states: list[State], cache_dir: Path) -> float:
    """Re-run every Flower round with fedbench's engine, starting each from Flower's global model
    before it (the engine's own client streams keep their natural sequence, so this also
    checks the clients' replay); the largest difference from Flower's global model after the
    round."""
    data, config = quick_setup(cache_dir)
    fed = Training(data, data.sites, FedAvg, unet(data, config), config, SEED, torch.device("cpu"))
    assert max_abs_difference(fed.global_state, flower_states[0]) == 0, "other initial models"
    worst = 0.0
    for before, after in zip(flower_states, flower_states[1:]):
        fed.global_state = {k: v.clone() for k, v in before.items()}
        fed.run_round()
        worst = max(worst, max_abs_difference(fed.global_state, after))
    return worst


def steady_round_s(stamps: list[float]) -> float:
    """Mean seconds per round from the end of round 1 to the end of the last round."""
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def summarize(runs: list[tuple[Measured, Timings]]) -> dict[str, float]:
    """Best (the least disturbed run) and median seconds over the runs, peak GiB over them."""
    calls = [t["call_s"] for _, t in runs]
    steady = [steady_round_s(t["stamps"]) for _, t in runs]
    return {
        "call": min(calls),
        "call_median": statistics.median(calls),
        "steady": min(steady),
        "steady_median": statistics.median(steady),
        "process": min(m.process_s for m, _ in runs),
        "pss": max(m.peak_pss for m, _ in runs) / 2**30,
        "rss": max(m.peak_rss for m, _ in runs) / 2**30,
        "single": max(m.max_rss_single for m, _ in runs) / 2**30,
        "sampler": sum(m.sampler_cpu_s for m, _ in runs),
        "threads": runs[-1][1]["threads"],
    }


def test_flower_against_fedbench(benchmark: Any, tmp_path: Path) -> None:
    """Flower's simulation against fedbench on equal work, alternating REPEATS runs of each;
    pytest-benchmark records the fedbench subprocesses (whole wall time, imports included)."""
    pytest.importorskip("flwr", minversion=FLOWER_MIN_VERSION)
    pytest.importorskip("ray")
    cache_dir = tmp_path / "cache"
    quick_setup(cache_dir)  # write the dataset cache once, so neither worker generates it
    runs: dict[str, list[tuple[Measured, Timings]]] = {"flower": [], "fedbench": []}

    def run_recorded(name: str) -> None:
        measured = run_worker(name, cache_dir, tmp_path)
        runs[name].append((measured, load_outputs(name, tmp_path)[1]))

    benchmark.pedantic(
        run_recorded,
        args=("fedbench",),
        setup=lambda: run_recorded("flower"),  # not timed by pytest-benchmark
        rounds=REPEATS,
        iterations=1,
    )
    w_flower = load_outputs("flower", tmp_path)[0]  # the last run's global models
    w_fedbench = load_outputs("fedbench", tmp_path)[0]
    diff = max_abs_difference(w_flower[-1], w_fedbench[-1])
    per_round = rerun_difference(w_flower, cache_dir)
    f, b = summarize(runs["flower"]), summarize(runs["fedbench"])
    print(
        f"\nflower {f['call']:.2f} s, fedbench {b['call']:.2f} s, "
        f"ratio {f['call'] / b['call']:.2f} "
        f"(training call, best of {REPEATS}; medians {f['call_median']:.2f} s and "
        f"{b['call_median']:.2f} s; whole process {f['process']:.1f} s vs {b['process']:.1f} s)"
        f"\nsteady state rounds 2..{ROUNDS}: flower {f['steady']:.3f} s/round, fedbench "
        f"{b['steady']:.3f} s/round, ratio {f['steady'] / b['steady']:.2f} (best of {REPEATS}; "
        f"medians {f['steady_median']:.3f} and {b['steady_median']:.3f} s/round)"
        f"\npeak PSS flower {f['pss']:.2f} GiB, fedbench {b['pss']:.2f} GiB (summed RSS "
        f"{f['rss']:.2f} GiB vs {b['rss']:.2f} GiB; largest process {f['single']:.2f} GiB vs "
        f"{b['single']:.2f} GiB); max |w_flower - w_fedbench| = {diff:.1e} (final model), "
        f"{per_round:.1e} (worst single round, both from Flower's model)"
        f"\ntorch threads per client: flower {f['threads']:g}, fedbench {b['threads']:g}; "
        f"memory sampling took {f['sampler']:.1f} s and {b['sampler']:.1f} s of CPU"
    )
    assert len(w_flower) == ROUNDS + 1 and len(runs["fedbench"][0][1]["stamps"]) == ROUNDS
    assert per_round < ROUND_TOLERANCE, "not the same work"


if __name__ == "__main__":
    # Run through the module's importable name, so Ray pickles the client handler by reference
    # (benchmarks/ is on the path Flower hands its actors) rather than as `__main__` code.
    import bench_flower

    bench_flower.worker_main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
