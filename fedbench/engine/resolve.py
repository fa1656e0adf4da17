"""From what the user asked (a RunSpec) to a Run: every name looked up in the registry, every
setting fixed (preset, component defaults, `--set`), the device chosen."""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedbench import __version__
from fedbench.engine.config import (
    Config,
    apply_overrides,
    check_seed,
    deep_merge,
    parse_assignment,
    preset_config,
    validate,
)
from fedbench.engine.sources import source_hash
from fedbench.errors import FedbenchError, unknown_name
from fedbench.storage import stable_hash

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedbench.adapter import Adapter
    from fedbench.data import Dataset
    from fedbench.engine.registry import Registry
    from fedbench.method import Method
    from fedbench.models import Model
    from fedbench.task import Task


@dataclass
class RunSpec:
    """What the user asked for on the command line."""

    method: str
    adapter: str | None = None
    dataset: str = "synth-prostate"
    holdout: str = "all"
    seed: int = 0
    preset: str = "default"
    device: str = "auto"
    rounds: int | None = None
    overrides: list[str] = field(default_factory=list)
    results_dir: Path = Path("results")
    checkpoint_every: int = 1
    keep_checkpoints: bool = False
    #: processes training the federations (fedbench.engine.federations); None: one per CPU
    workers: int | None = None
    #: the study file's name and this cell's variant label, kept in the record (not hashed)
    study: str | None = None
    variant: str | None = None
    #: where the cell's settings came from when `fedbench tune` chose them (not hashed)
    tuning: dict[str, Any] | None = None


@dataclass
class Run:
    """A RunSpec with every name looked up and every setting fixed."""

    spec: RunSpec
    method: type[Method]
    adapter: type[Adapter] | None
    dataset: Dataset
    model: type[Model]
    config: Config
    device: torch.device
    #: fedbench's version and each used plugin's source hash, read at resolve time
    code: dict[str, str] = field(default_factory=dict)
    #: what trains a federation, with `train_federation`'s signature: None for the in-process
    #: engine; a bridge's own (fedbench.flower), which marks its runs in `config["backend"]`
    trainer: Callable[..., Any] | None = None

    @property
    def adapter_name(self) -> str | None:
        return self.adapter.name if self.adapter else None

    @property
    def config_hash(self) -> str:
        return stable_hash(
            {
                "config": self.config,
                "method": self.method.name,
                "adapter": self.adapter_name,
                "dataset": self.dataset.name,
                "seed": self.spec.seed,
                "code": self.code,
            }
        )

    def build_model(self, task: Task) -> nn.Module:
        """A fresh network of the configured model for `task`, as the method trains it."""
        network = self.model().build(task, self.config["model"])
        return self.method.network(network, task, self.config)

    def federation_identity(self, holdout: str | None, data: str) -> dict[str, Any]:
        """Everything that changes a trained federation, `data` the data's fingerprint; adapter
        settings deliberately left out, so every adapter shares the federation."""
        return {
            "data": data,
            "config": {k: v for k, v in self.config.items() if k != "adapter"},
            "method": self.method.name,
            "dataset": self.dataset.name,
            "seed": self.spec.seed,
            "holdout": holdout,
            "device": self.device.type,
            "code": {k: v for k, v in self.code.items() if k != "adapter"},
        }


def code_versions(**plugins: type | None) -> dict[str, str]:
    """The fedbench version and a hash of the source files of each plugin a run uses (its module
    and the modules of its package it imports): edited code is never mistaken for finished work
    (config hash, federation cache)."""
    hashes = {role: source_hash(cls) for role, cls in plugins.items() if cls is not None}
    return {"fedbench": __version__, **hashes}


def pick_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FedbenchError(
            "--device cuda was asked for, but CUDA is not available on this machine"
        )
    if name not in ("cpu", "cuda"):
        raise FedbenchError(f"unknown device '{name}'; known: auto, cpu, cuda")
    return torch.device(name)


def chosen_model(overrides: list[str], default: str) -> str:
    """The `model.name` the last `--set model.name=...` names, else the dataset's default (see
    `dataset_model`): it must be known before the model's own settings are merged in."""
    name = default
    for text in overrides:
        path, value = parse_assignment(text)
        if path == ["model", "name"]:
            name = value
    return name


def dataset_model(dataset: Dataset, wanted: Config) -> str:
    """The network a dataset's runs use: the `model.name` its preset `wanted` names (the IOP-FL
    datasets' `paper` preset names the release's U-Net), else its `model`."""
    return wanted.get("model", {}).get("name", dataset.model)


def resolve(spec: RunSpec, registry: Registry) -> Run:
    """Look every name up and build the full config (preset, component defaults, --set)."""
    method = registry.get("methods", spec.method)
    dataset = registry.get("datasets", spec.dataset)()
    adapter = registry.get("adapters", spec.adapter) if spec.adapter else None
    if spec.holdout == "none":
        adapter = None
    elif adapter is None:
        adapter = registry.get("adapters", method.default_adapter)
    wanted = dataset.preset(spec.preset)
    model = registry.get("models", chosen_model(spec.overrides, dataset_model(dataset, wanted)))
    config = preset_config(spec.preset)
    config["data"] = copy.deepcopy(dataset.defaults)
    config = deep_merge(config, wanted)
    config["model"] = {"name": model.name, **deep_merge(model.defaults, model.preset(spec.preset))}
    config["method"] = copy.deepcopy(method.defaults)
    config["adapter"] = deep_merge(adapter.defaults, adapter.preset(spec.preset)) if adapter else {}
    check_seed(spec.seed)
    if spec.rounds is not None:
        if any(text.partition("=")[0].strip() == "train.rounds" for text in spec.overrides):
            raise FedbenchError("--rounds and --set train.rounds both given; use one of them")
        config["train"]["rounds"] = spec.rounds
    config = apply_overrides(config, spec.overrides)
    validate(config)
    model.check(config["model"])
    check_image_size(model, config)
    method.check_settings(config)
    code = code_versions(method=method, dataset=type(dataset), model=model, adapter=adapter)
    return Run(spec, method, adapter, dataset, model, config, pick_device(spec.device), code)


#: image sizes that agree modulo this take the same path through up to six stride-2 layers
SIZE_PERIOD = 64


def probe_size(size: int) -> int:
    """A size at most 2 * SIZE_PERIOD that a network of stride-2 layers treats as `size` (a
    large image is never pushed through a wide network just to check it)."""
    return size if size <= 2 * SIZE_PERIOD else SIZE_PERIOD + size % SIZE_PERIOD


@functools.lru_cache(maxsize=64)
def takes_size(model: type[Model], model_json: str, size: int) -> bool | None:
    """Whether the network of these settings maps a size x size image to a same-sized output
    (None: it cannot be built for a stand-in one-channel task, so it is not checked). Built
    once per settings, without touching the global RNG."""
    import torch

    from fedbench.task import SegmentationTask

    with torch.random.fork_rng(devices=[]):
        try:
            network = model().build(SegmentationTask(1, ["x"]), json.loads(model_json)).eval()
        except Exception:
            return None
        try:
            with torch.no_grad():
                output = network(torch.zeros(1, 1, size, size))
        except Exception:
            return False
    return isinstance(output, torch.Tensor) and tuple(output.shape[-2:]) == (size, size)


def check_image_size(model: type[Model], config: Config) -> None:
    """Refuse, naming `data.size`, an image size the configured network cannot take (a U-Net
    whose levels halve the image needs a multiple of 2 ** levels), before any training."""
    size = config.get("data", {}).get("size")
    if size is None:
        return
    settings = json.dumps(config["model"], sort_keys=True)
    if takes_size(model, settings, probe_size(size)) is not False:
        return
    powers = [2**k for k in range(1, 7)]
    multiple = next((m for m in powers if takes_size(model, settings, SIZE_PERIOD + m)), None)
    problem = f"setting data.size={size} does not fit model '{model.name}'"
    if multiple is None:
        raise FedbenchError(f"{problem}: it fails on {size}x{size} images")
    below = max(multiple, size // multiple * multiple)
    raise FedbenchError(
        f"{problem}: it takes sizes that are a multiple of {multiple} "
        f"(e.g. {below} or {below + multiple})"
    )


def holdout_sites(text: str, site_names: list[str] | None) -> list[str] | None:
    """Parse --holdout all|none|SITE,... into the sites to hold out, each once, in order. With
    the dataset's sites unknown (None), 'all' gives None and named sites are not checked."""
    if text == "none":
        return []
    if text == "all":
        chosen = list(site_names) if site_names is not None else None
    else:
        chosen = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
        if not chosen:
            raise FedbenchError(f"bad --holdout '{text}': expected all, none or SITE,SITE")
        for name in chosen if site_names is not None else ():
            if name not in site_names:
                raise unknown_name("site", name, site_names)
    if site_names is not None and chosen and len(site_names) - 1 < 2:
        raise FedbenchError(
            f"holding out a site leaves {len(site_names) - 1} training site(s); at least two needed"
        )
    return chosen
