"""fedbench's messages as Flower's records: a state dict of tensors is an ArrayRecord (numpy
arrays, so float32 and integer tensors cross bit for bit), anything else a client keeps between
rounds (its method's `state_dict`, its random stream) one array of the bytes torch saves."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedbench.method import State

if TYPE_CHECKING:
    from flwr.app import ArrayRecord


def to_record(state: State) -> ArrayRecord:
    """A state dict as an ArrayRecord, keys in order (Flower's own conversion)."""
    from flwr.app import ArrayRecord

    return ArrayRecord(dict(state))


def from_record(record: ArrayRecord, device: torch.device | None = None) -> State:
    """The state dict an ArrayRecord holds (tensors of their own, on `device`: the CPU unless
    said, as the receiving side's engine keeps its states on its run's device)."""
    return {key: tensor.to(device) for key, tensor in record.to_torch_state_dict().items()}


def to_blob(value: Any) -> ArrayRecord:
    """Any value torch can save (tensors, numbers, lists, dicts) as a one-array record."""
    from flwr.app import Array, ArrayRecord

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return ArrayRecord({"blob": Array(np.frombuffer(buffer.getvalue(), dtype=np.uint8))})


def from_blob(record: ArrayRecord) -> Any:
    """What `to_blob` saved (written by this node itself: never another party's bytes)."""
    data = record["blob"].numpy().tobytes()
    return torch.load(io.BytesIO(data), weights_only=False)


def wire_bytes(obj: Any) -> int:
    """The bytes Flower serializes for a message or record: each object's `deflate()`, its
    children's included (how Flower 1.42 ships them), without the transport's framing."""
    children = obj.children or {}
    return len(obj.deflate()) + sum(wire_bytes(child) for child in children.values())
