"""The Flower bridge's overhead: one FedAvg federation (synth-prostate, quick preset, 6 sites,
ROUNDS rounds, no validation) trained by fedbench in this process (`train_federation`) and on
Flower's simulation engine through the bridge (`fedbench.flower.run.simulation_trainer`: Ray
actors as nodes, each loading its own site, the engine's Server behind a Flower Strategy). Both
train bit-identical models on one thread per client (tests/test_flower_simulation.py); here each
runs as it does by default on this machine (in-process: torch's threads; Flower: the nodes share
the cores, one actor per core).

The variants alternate REPEATS times (order rotated), so a machine that slows down slows both.
Printed: the best and median of the whole training call (Flower's includes starting and stopping
Ray and each actor's imports) and of the steady rounds (rounds 2..ROUNDS, from the round
callback's time stamps), with their ratios. Skipped without the `flower` extra."""

from __future__ import annotations

import importlib.util
import statistics
import time
from pathlib import Path

import pytest
import torch

ROUNDS = 10
REPEATS = 3
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("flwr") is None, reason="needs fedbench[flower]"
)


def timed(train, stamps: list[float]) -> float:
    """Seconds of one training call; `stamps` gets each round's end."""
    start = time.perf_counter()
    train(lambda round_index, scores, replayed: stamps.append(time.perf_counter()))
    return time.perf_counter() - start


def test_flower_simulation_against_in_process(benchmark, tmp_path: Path) -> None:
    from fedbench.engine.registry import load_registry
    from fedbench.engine.resolve import RunSpec, resolve
    from fedbench.engine.training import train_federation
    from fedbench.flower.run import simulation_trainer

    overrides = [f"train.rounds={ROUNDS}", "eval.history=false"]
    spec = RunSpec("fedavg", dataset="synth-prostate", preset="quick", overrides=overrides)
    spec.results_dir = tmp_path
    run = resolve(spec, load_registry())
    data = run.dataset.load(run.config["data"], 0, tmp_path / "cache")
    args = (data, data.sites, run.method, lambda: run.build_model(data.task), run.config, 0)
    cpu = torch.device("cpu")
    trainers = {
        "in-process": lambda on_round: train_federation(*args, cpu, on_round),
        "flower": lambda on_round: simulation_trainer(spec)(*args, cpu, on_round),
    }
    calls: dict[str, list[float]] = {name: [] for name in trainers}
    steady: dict[str, list[float]] = {name: [] for name in trainers}
    for repeat in range(REPEATS):
        names = list(trainers)[repeat % 2 :] + list(trainers)[: repeat % 2]
        for name in names:
            stamps: list[float] = []
            calls[name].append(timed(trainers[name], stamps))
            assert len(stamps) == ROUNDS
            steady[name].append((stamps[-1] - stamps[0]) / (ROUNDS - 1))
    benchmark.pedantic(lambda: None, rounds=1)  # the timings are the interleaved ones above
    for label, table in (("training call", calls), ("steady round", steady)):
        best = {name: min(values) for name, values in table.items()}
        median = {name: statistics.median(values) for name, values in table.items()}
        print(
            f"\n{label}: in-process best {best['in-process']:.2f} s "
            f"(median {median['in-process']:.2f}), Flower best {best['flower']:.2f} s "
            f"(median {median['flower']:.2f}); Flower / in-process "
            f"{best['flower'] / best['in-process']:.2f}x best, "
            f"{median['flower'] / median['in-process']:.2f}x median"
        )
