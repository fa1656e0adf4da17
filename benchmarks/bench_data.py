"""Data-side costs of fedbench on the embedded synth-prostate dataset.

1. Waiting for data: the share of local training time a default-preset FedAvg run spends inside
   `Split.batches` (shuffling, indexing, stacking a batch), measured by wrapping that iterator and
   `Method.local_update` with perf_counter clocks; the goal is under 5%. The run is the
   default preset (64 px, 10 cases x 8 slices per site, 6 sites, the default U-Net) shortened to
   DATA_ROUNDS rounds: every round does the same work, so the share does not depend on the count.
   The engine's own profiler (`PROFILE`, "data loading" against "local training") is printed
   next to it as a cross-check.
2. The embedded dataset: time to generate and cache it in a fresh cache directory, and to load
   it back from a cache (which must not regenerate it), interleaved for CACHED_LOADS rounds
   after a warm-up round (benchmarks/interleave.py); best rounds and the per-round spread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from interleave import interleaved

import fedbench.engine.training as engine
import fedbench_datasets.synth_phantom as phantom
import fedbench_datasets.synth_prostate as synth
from fedbench.adapter import TrainedFederation
from fedbench.data import FederatedData, Split
from fedbench.engine.config import Config, preset_config
from fedbench.engine.profiling import PROFILE
from fedbench_plugins.fedavg import FedAvg
from fedbench_plugins.unet import UNet

DATA_ROUNDS = 3
GOAL_SHARE = 0.05
CACHED_LOADS = 5
T = TypeVar("T")


@dataclass
class Clock:
    """Accumulated seconds."""

    seconds: float = 0.0


def timed_iterator(iterator: Iterator[T], clock: Clock) -> Iterator[T]:
    """Yield from `iterator`, adding the time spent producing each item (and the final
    StopIteration) to `clock`, but not the time the consumer spends between items."""
    while True:
        start = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            clock.seconds += time.perf_counter() - start
            return
        clock.seconds += time.perf_counter() - start
        yield item


def timed_call(function: Callable[..., T], clock: Clock) -> Callable[..., T]:
    """`function`, adding the wall time of every call to `clock`."""

    def wrapper(*args: Any, **kwargs: Any) -> T:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            clock.seconds += time.perf_counter() - start

    return wrapper


def preset_data_config(preset: str) -> dict[str, Any]:
    """synth-prostate's `data.*` settings for a preset, as the runner merges them."""
    dataset = synth.SynthProstate()
    return {**dataset.defaults, **dataset.preset(preset).get("data", {})}


def default_setup(cache_dir: Path) -> tuple[FederatedData, Config]:
    """The default-preset synth-prostate data and FedAvg config, DATA_ROUNDS rounds long."""
    config = preset_config("default")
    config["data"] = preset_data_config("default")
    config["train"]["rounds"] = DATA_ROUNDS
    config["method"], config["adapter"] = {}, {}
    config["model"] = {"name": "unet", **UNet.defaults}
    return synth.SynthProstate().load(config["data"], 0, cache_dir), config


def test_data_wait_share(benchmark: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Share of local training time spent waiting for batches in a default-preset run."""
    data, config = default_setup(tmp_path)
    waiting, training = Clock(), Clock()
    batches = Split.batches

    def timed_batches(self: Split, *args: Any, **kwargs: Any) -> Iterator[Any]:
        return timed_iterator(batches(self, *args, **kwargs), waiting)

    monkeypatch.setattr(Split, "batches", timed_batches)
    monkeypatch.setattr(FedAvg, "local_update", timed_call(FedAvg.local_update, training))
    PROFILE.reset()

    def build() -> torch.nn.Module:
        return UNet().build(data.task, config["model"])

    def run() -> TrainedFederation:
        cpu = torch.device("cpu")
        return engine.train_federation(data, data.sites, FedAvg, build, config, 0, cpu)

    result = benchmark.pedantic(run, rounds=1, iterations=1)
    profiled = PROFILE.summary()
    share = waiting.seconds / training.seconds
    profiler_share = profiled["data loading"] / (
        profiled["data loading"] + profiled["local training"]
    )
    steps = result.cost["client_steps"]
    print(
        f"\ndata wait {waiting.seconds:.3f} s of {training.seconds:.2f} s local training "
        f"({steps} steps, {DATA_ROUNDS} default-preset rounds, whole run "
        f"{benchmark.stats.stats.mean:.2f} s): share {100 * share:.2f}% "
        f"(goal < {100 * GOAL_SHARE:.0f}%: {'met' if share < GOAL_SHARE else 'NOT met'}); "
        f"engine profiler says {100 * profiler_share:.2f}%; "
        f"{1e3 * waiting.seconds / steps:.2f} ms per batch"
    )
    assert 0 < waiting.seconds < training.seconds, "the clocks were not reached"


@pytest.mark.parametrize("preset", ["quick", "default"])
def test_dataset_generate_and_cache(
    benchmark: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, preset: str
) -> None:
    """Generating and caching the dataset in a fresh directory against loading it from a cache
    written before, the two interleaved round by round."""
    dataset, cfg = synth.SynthProstate(), preset_data_config(preset)
    generating = Clock()
    generated = timed_call(phantom.generate, generating)
    cached_dir, fresh_dirs = tmp_path / "cached", iter(range(1000))
    dataset.load(cfg, 0, cached_dir)

    def must_not_generate(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a cached load regenerated the dataset")

    def fresh_load() -> FederatedData:
        phantom._upsampler.cache_clear()  # as cold as a new process, whatever ran before
        monkeypatch.setattr(phantom, "generate", generated)
        return dataset.load(cfg, 0, tmp_path / f"fresh-{next(fresh_dirs)}")

    def cached_load() -> FederatedData:
        monkeypatch.setattr(phantom, "generate", must_not_generate)
        return dataset.load(cfg, 0, cached_dir)

    timings = interleaved(
        {"fresh": fresh_load, "cached": cached_load}, rounds=CACHED_LOADS, iterations=4
    )
    benchmark.pedantic(cached_load, rounds=CACHED_LOADS, iterations=1)
    cache_files = list((cached_dir / synth.CACHE_SUBDIR).glob("*.npz"))
    assert len(cache_files) == 1, "the fresh load did not write exactly one cache file"
    fresh_s, generate_s = timings.best("fresh"), generating.seconds / (4 * (CACHED_LOADS + 1))
    print(
        f"\nsynth-prostate {preset} ({cfg['size']} px, {cfg['num_sites']} sites x "
        f"{cfg['cases_per_site']} cases x {cfg['slices_per_case']} slices): fresh cache "
        f"{fresh_s:.2f} s (generate {generate_s:.2f} s on average), from cache "
        f"{timings.best('cached'):.3f} s (best of {CACHED_LOADS}), fresh/cached "
        f"{timings.describe('fresh', 'cached')}; cache file "
        f"{cache_files[0].stat().st_size / 2**20:.2f} MiB"
    )
