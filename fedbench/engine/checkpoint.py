"""Torch files that are written atomically and read back safely: per-round checkpoints of a
federation in training (so a killed run resumes where it stopped and ends with the same record
as an uninterrupted one) and the federation cache. Loaded with `torch.load(weights_only=True)`,
so a file can hold tensors, numbers, strings, lists and dicts, never code. Optimizer state needs
no saving: optimizers are re-created every round. A file that loads but does not fit (other
keys, shapes or clients) is named in one warning and ignored: these are fedbench's own files,
trained again and overwritten."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedbench.storage import write_atomic

#: what a checkpoint's "training" snapshot holds (see Training.snapshot)
SNAPSHOT_KEYS = (
    "global_state",
    "client_states",
    "method_state",
    "generator",
    "torch_rng",
    "cost",
    "sampler",
    "participation",
)
Shapes = dict[str, torch.Size]


class Unusable(Exception):
    """A file fedbench wrote once that cannot be used now; the message says why."""


def save(path: Path, payload: dict[str, Any]) -> None:
    """torch.save through a temp file and a rename: a kill never leaves half a file."""
    write_atomic(path, lambda handle: torch.save(payload, handle))


def load(path: Path, device: torch.device) -> dict[str, Any] | None:
    """What `save` wrote, or None when there is no file; Unusable when it is not one (a torch
    file of plain data holding a dict)."""
    if not Path(path).is_file():
        return None
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise Unusable(f"unreadable ({type(exc).__name__})") from None
    if not isinstance(payload, dict):
        raise Unusable(f"holds a {type(payload).__name__}, not a dict")
    return payload


def warn_ignored(path: Path, kind: str, why: str, then: str) -> None:
    """One warning line on stderr (stdout stays clean for --json)."""
    print(f"warning: ignoring the {kind} {path}: {why}; {then}", file=sys.stderr)


def load_fitting(
    path: Path,
    device: torch.device,
    problem: Callable[[dict[str, Any]], str | None],
    kind: str,
    then: str,
) -> dict[str, Any] | None:
    """What `save` wrote when `problem` finds nothing wrong with it; None when there is no
    file, or (named in one warning: "ignoring the KIND PATH: WHY; THEN") when it does not fit."""
    try:
        payload = load(path, device)
        why = None if payload is None else problem(payload)
    except Unusable as exc:
        payload, why = None, str(exc)
    if why:
        warn_ignored(path, kind, why, then)
        return None
    return payload


def model_shapes(build_model: Any) -> Shapes:
    """The state-dict shapes of a fresh model, built without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        return {key: value.shape for key, value in build_model().state_dict().items()}


def state_problem(state: Any, shapes: Shapes, what: str) -> str | None:
    """Why `state` cannot be loaded into the model whose state has `shapes`, or None."""
    if not isinstance(state, dict):
        return f"{what} is a {type(state).__name__}, not a state"
    missing = [key for key in shapes if key not in state]
    extra = [key for key in state if key not in shapes]
    if missing or extra:
        names = (["lacks " + missing[0]] if missing else []) + (
            ["has " + extra[0]] if extra else []
        )
        return f"{what} {' and '.join(names)} (other keys than the model's)"
    for key, shape in shapes.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or value.shape != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            return f"{what} has {key} of shape {got}, the model {tuple(shape)}"
    return None


def states_problem(states: Any, shapes: Shapes, count: int, what: str) -> str | None:
    """Why `states` is not a list of `count` states that fit the model, or None."""
    if not isinstance(states, list | tuple):
        return f"{what} is a {type(states).__name__}, not a list"
    if len(states) != count:
        return f"{what} holds {len(states)} models for {count} clients"
    for i, state in enumerate(states):
        problem = state_problem(state, shapes, f"{what}[{i}]")
        if problem:
            return problem
    return None


def missing_keys(payload: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    """'lacks a, b' for the keys `payload` does not hold, or None."""
    missing = [key for key in keys if key not in payload]
    return f"lacks {', '.join(missing)}" if missing else None


def snapshot_problem(
    saved: dict[str, Any], shapes: Shapes, clients: int, rounds: int
) -> str | None:
    """Why a checkpoint cannot resume a training of `clients` clients and `rounds` rounds of
    the model with `shapes` (see train_federation), or None."""
    problem = missing_keys(saved, ("round", "training", "progress"))
    if problem:
        return problem
    round_index, training, progress = saved["round"], saved["training"], saved["progress"]
    if isinstance(round_index, bool) or not isinstance(round_index, int):
        return f"its round is {round_index!r}, not a number"
    if not 0 <= round_index <= rounds:
        return f"its round {round_index} is outside 0..{rounds}"
    if not isinstance(training, dict):
        return "its training state is not a dict"
    problem = missing_keys(training, SNAPSHOT_KEYS)
    if problem:
        return f"its training state {problem}"
    if not isinstance(progress, dict) or missing_keys(progress, ("history", "best")):
        return "its progress lacks history or best"
    return state_problem(training["global_state"], shapes, "the global model") or states_problem(
        training["client_states"], shapes, clients, "the client models"
    )
