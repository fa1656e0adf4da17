"""The line between a method's code and the engine: every hook is called through `call`, which
names the method and the hook when it fails, and what a hook returns is checked here before the
engine uses it. A wrong return is one line saying what was expected, never a bare KeyError later."""

from __future__ import annotations

from typing import Any

import torch

from fedbench.errors import PluginFailure, blamed_on
from fedbench.method import Method, State


def call(method: Method, hook: str, *args: Any) -> Any:
    """`method.<hook>(*args)`; an exception in it is one PluginFailure naming the method, its
    side (server or client) and the hook."""
    side = "server" if method.client is None else f"client {method.client}"
    with blamed_on(f"method '{method.name}' failed in {hook} ({side})"):
        return getattr(method, hook)(*args)


def described(value: Any) -> str:
    """A returned value in a few words: 'None', 'a list', 'a dict holding a float at "w"'."""
    if value is None:
        return "None"
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"a dict with the key {key!r}, not a string"
            if not isinstance(item, torch.Tensor):
                return f"a dict holding {type(item).__name__} at '{key}'"
    return f"a {type(value).__name__}"


def tensors(method: Method, hook: str, value: Any, what: str) -> State:
    """`value` when it is a dict of str to tensor; else one line naming the hook."""
    ok = isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )
    if not ok:
        raise PluginFailure(
            f"method '{method.name}': {hook} returned {described(value)}; expected {what}"
        )
    return value


def extras(method: Method, hook: str, value: Any) -> State:
    """A message of extra tensors (`local_update`'s, `server_payload`'s)."""
    return tensors(method, hook, value, "a dict of str to torch.Tensor ({} for nothing to send)")


def like(method: Method, hook: str, value: Any, reference: State) -> State:
    """A state with exactly `reference`'s keys, shapes and dtypes (`server_update` against the
    shared global state; `personalized_state` and `unseen_site_state` against the model's)."""
    what = f"a dict of the {len(reference)} keys it was given, with their shapes and dtypes"
    state = tensors(method, hook, value, what)
    missing = [k for k in reference if k not in state]
    unknown = [k for k in state if k not in reference]
    if missing or unknown:
        parts = [
            f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unknown", unknown))
            if keys
        ]
        raise PluginFailure(
            f"method '{method.name}': {hook} returned {'; '.join(parts)}; expected {what}"
        )
    for key, tensor in state.items():
        want = reference[key]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise PluginFailure(
                f"method '{method.name}': {hook} returned '{key}' as {str(tensor.dtype)[6:]} "
                f"{list(tensor.shape)}; expected {str(want.dtype)[6:]} {list(want.shape)}"
            )
    return state


def copied(state: State) -> State:
    """A message as it arrives: tensors of its own, so no side changes the other's in place."""
    return {k: v.detach().clone() for k, v in state.items()}
