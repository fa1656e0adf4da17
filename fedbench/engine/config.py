"""Run configuration: presets, `--set KEY=VALUE` overrides and validation. Components (dataset,
model, method, adapter) add their own sections from their `defaults` and `preset()`."""

from __future__ import annotations

import copy
import math
from typing import Any

from fedbench.errors import FedbenchError
from fedbench.task import check_loss

Config = dict[str, Any]

BASE: Config = {
    "train": {
        "rounds": 12,
        "local_epochs": 1,
        "batch_size": 8,
        "lr": 2e-3,
        "optimizer": "adam",
        "momentum": 0.9,  # SGD only
        "amsgrad": False,  # Adam only; the IOP-FL release's Adam uses it
        # "all", a count (an integer >= 1) or a fraction in (0, 1] of the clients per round
        "clients_per_round": "all",
    },
    "eval": {"batch_size": 64, "val_best": False, "history": True},
}

# What each preset changes on top of BASE; components add their own preset values.
PRESETS: dict[str, Config] = {
    "quick": {"train": {"rounds": 2, "batch_size": 8}},
    "default": {},
    # The IOP-FL scale: Adam 1e-3, batch 5, 100 rounds (meant for a GPU); the model's widths
    # come from the model plugin's own preset, and the IOP-FL datasets' own presets add the
    # release's network, loss and amsgrad.
    "paper": {
        "train": {"rounds": 100, "batch_size": 5, "lr": 1e-3, "optimizer": "adam"},
        "eval": {"batch_size": 16},
    },
}

POSITIVE = ("train.rounds", "train.local_epochs", "train.batch_size", "train.lr", "eval.batch_size")
OPTIMIZERS = ("adam", "adamw", "sgd")
PRECISIONS = ("fp32", "bf16")  # fedbench.engine.precision applies them
#: settings a config holds only once `--set` gives them, each with the value its type is read
#: from, so that adding one changes no existing run's settings (nor their hash). Local steps:
#: each local pass is that many batches, through reshuffled passes (FLamby's num_updates).
#: Precision (fp32, or bf16 autocast of the local forward pass and loss), the channels-last
#: layout and PyTorch's deterministic mode: fedbench.engine.precision.
OPTIONAL: dict[str, Any] = {
    "train.local_steps": 0,
    "train.precision": "fp32",
    "train.channels_last": False,
    "train.deterministic": False,
}


def deep_merge(base: Config, override: Config) -> Config:
    """A copy of `base` with `override` merged in, section by section."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def preset_config(preset: str) -> Config:
    if preset not in PRESETS:
        raise FedbenchError(f"unknown preset '{preset}'; known: {', '.join(PRESETS)}")
    return deep_merge(BASE, PRESETS[preset])


def parse_assignment(text: str) -> tuple[list[str], str]:
    """'train.lr=0.01' -> (['train', 'lr'], '0.01'), or one clear error."""
    key, sep, value = text.partition("=")
    path = key.strip().split(".")
    if not sep or not key.strip() or any(not part for part in path):
        raise FedbenchError(f"malformed --set '{text}': expected KEY=VALUE, e.g. train.lr=0.01")
    return path, value.strip()


def coerce(value: str, like: Any, key: str) -> Any:
    """Convert a command-line string to the type of the setting's current value."""
    try:
        if isinstance(like, bool):
            lowered = value.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if isinstance(like, int):
            return int(value)
        if isinstance(like, float):
            return float(value)
        if isinstance(like, list):
            items = [v for v in value.strip("[]").split(",") if v.strip()]
            kind = type(like[0]) if like else str
            return [kind(v.strip()) for v in items]
    except ValueError:
        expected = {bool: "true or false", int: "an integer", float: "a number", list: "a list"}
        raise FedbenchError(
            f"setting {key} expects {expected[type(like)]}, got '{value}'"
        ) from None
    return None if value.lower() in ("none", "null") else value


def apply_overrides(config: Config, assignments: list[str]) -> Config:
    """Apply `--set` assignments; a key that no component declared is an error."""
    out = copy.deepcopy(config)
    for text in assignments:
        path, raw = parse_assignment(text)
        node = out
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                raise FedbenchError(f"unknown setting '{'.'.join(path)}'; known: {known_keys(out)}")
            node = node[part]
        if ".".join(path) in OPTIONAL:  # an optional setting joins the config once set
            node.setdefault(path[-1], OPTIONAL[".".join(path)])
        if path[-1] not in node or isinstance(node[path[-1]], dict):
            raise FedbenchError(f"unknown setting '{'.'.join(path)}'; known: {known_keys(out)}")
        node[path[-1]] = coerce(raw, node[path[-1]], ".".join(path))
    return out


def flatten(config: Config, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def known_keys(config: Config) -> str:
    """Every setting `config` has, and the optional ones of its sections."""
    optional = {key for key in OPTIONAL if key.split(".")[0] in config}
    return ", ".join(sorted(set(flatten(config)) | optional))


#: seeds seed numpy's and torch's generators alike, so they must fit numpy's 32 bits
MAX_SEED = 2**32 - 1


def check_seed(seed: int) -> int:
    """A seed every generator accepts, or one clear error."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise FedbenchError(f"seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    return seed


def as_number(text: Any) -> Any:
    """'3' -> 3, '0.5' -> 0.5, 'all' -> 'all'; anything else unchanged (a non-number is None)."""
    if not isinstance(text, str):
        return text
    word = text.strip().lower()
    for kind in (int, float):
        try:
            return kind(word)
        except ValueError:
            pass
    return word if word == "all" else None


def clients_per_round(setting: Any, num_clients: int) -> int:
    """How many of `num_clients` take part in a round under `train.clients_per_round`: all, a
    count (at most all) or a fraction (rounded half up, at least one); one clear error
    otherwise."""
    value = as_number(setting)
    if value == "all":
        return num_clients
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return min(value, num_clients)
    if isinstance(value, float) and 0 < value <= 1:
        return max(1, min(num_clients, math.floor(value * num_clients + 0.5)))
    raise FedbenchError(
        "setting train.clients_per_round must be 'all', a count >= 1 or a fraction in (0, 1], "
        f"got {setting!r}"
    )


def check_size(size: Any) -> int:
    """An image size (pixels per side) of at least 1, or one clear error."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise FedbenchError(f"setting data.size must be an integer of at least 1, got {size!r}")
    return size


def check_local_steps(steps: Any) -> int:
    """A local-step budget: 0 (a pass over the client's data) or more batches."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise FedbenchError(
            "setting train.local_steps must be an integer of at least 0 (0: a pass over the "
            f"client's data), got {steps!r}"
        )
    return steps


def validate(config: Config) -> None:
    """Reject settings no run can use, naming the setting."""
    flat = flatten(config)
    for key in POSITIVE:
        value = flat.get(key)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value <= 0:
            raise FedbenchError(f"setting {key} must be a positive finite number, got {value!r}")
    clients_per_round(flat["train.clients_per_round"], 1)
    momentum = flat["train.momentum"]
    if isinstance(momentum, bool) or not isinstance(momentum, int | float) or not 0 <= momentum < 1:
        raise FedbenchError(f"setting train.momentum must be in [0, 1), got {momentum!r}")
    if not isinstance(flat["train.amsgrad"], bool):
        raise FedbenchError(
            f"setting train.amsgrad must be true or false, got {flat['train.amsgrad']!r}"
        )
    if "data.loss" in flat:  # segmentation datasets declare it (fedbench.task.LOSSES)
        check_loss(flat["data.loss"])
    if "data.size" in flat:  # image datasets declare it; resolve checks it fits the model
        check_size(flat["data.size"])
    if "train.local_steps" in flat:  # OPTIONAL: only once set
        check_local_steps(flat["train.local_steps"])
    if flat.get("train.precision", "fp32") not in PRECISIONS:
        raise FedbenchError(
            f"setting train.precision must be one of {', '.join(PRECISIONS)}, "
            f"not '{flat['train.precision']}'"
        )
    if flat["train.optimizer"] not in OPTIMIZERS:
        raise FedbenchError(
            f"setting train.optimizer must be one of {', '.join(OPTIMIZERS)}, "
            f"got '{flat['train.optimizer']}'"
        )
