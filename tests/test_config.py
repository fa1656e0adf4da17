"""Settings: presets, --set overrides with types, validation and the stable config hash."""

import pytest
import torch

from fedbench.engine.config import apply_overrides, preset_config
from fedbench.engine.registry import load_registry
from fedbench.engine.resolve import RunSpec, resolve
from fedbench.errors import FedbenchError
from fedbench.storage import stable_hash

REGISTRY = load_registry()


def resolved_config(*assignments: str) -> dict:
    return resolve(RunSpec("fedavg", preset="quick", overrides=list(assignments)), REGISTRY).config


def test_set_coerces_to_the_type_of_the_default():
    config = resolved_config(
        "train.lr=0.5", "train.rounds=3", "eval.history=false", "model.channels=4,8"
    )
    assert config["train"]["lr"] == 0.5 and config["train"]["rounds"] == 3
    assert config["eval"]["history"] is False and config["model"]["channels"] == [4, 8]


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("train.lr", "malformed --set"),
        ("=3", "malformed --set"),
        ("train.nope=1", "unknown setting 'train.nope'"),
        ("nope.x=1", "unknown setting 'nope.x'"),
        ("train=1", "unknown setting 'train'"),
        ("train.rounds=abc", "expects an integer"),
        ("eval.history=maybe", "expects true or false"),
    ],
)
def test_bad_assignments_name_the_problem(assignment, message):
    with pytest.raises(FedbenchError, match=message):
        apply_overrides(preset_config("quick"), [assignment])


@pytest.mark.parametrize(
    "key",
    [
        "train.rounds=0",
        "train.batch_size=-1",
        "train.lr=0",
        "train.optimizer=rmsprop",
        "model.channels=4",
    ],
)
def test_unusable_values_are_rejected(key):
    with pytest.raises(FedbenchError):
        resolved_config(key)


def test_unknown_preset():
    with pytest.raises(FedbenchError, match="unknown preset 'huge'; known: quick, default, paper"):
        preset_config("huge")


def test_hash_is_stable_and_order_free():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def test_sgd_momentum_is_a_setting():
    from fedbench.engine.clients import optimizer_factory

    config = resolved_config("train.optimizer=sgd", "train.momentum=0.5")
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = optimizer_factory(config["train"])([param])
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["momentum"] == 0.5
    assert resolved_config()["train"]["momentum"] == 0.9  # as it was built in before
    for bad in ("train.momentum=1", "train.momentum=-0.1"):
        with pytest.raises(FedbenchError, match="train.momentum"):
            resolved_config(bad)


def test_adamw_decays_weights_apart_from_the_gradient():
    """AdamW (FLamby's Fed-IXI optimizer): with a zero gradient Adam leaves a weight where it is,
    AdamW shrinks it by lr * 0.01 (torch's default decoupled weight decay)."""
    from fedbench.engine.clients import optimizer_factory

    moved = {}
    for name in ("adam", "adamw"):
        param = torch.nn.Parameter(torch.ones(2))
        optimizer = optimizer_factory(resolved_config(f"train.optimizer={name}")["train"])([param])
        param.grad = torch.zeros(2)
        optimizer.step()
        moved[name] = 1 - param.detach()
    lr = resolved_config()["train"]["lr"]
    assert torch.equal(moved["adam"], torch.zeros(2))
    torch.testing.assert_close(moved["adamw"], torch.full((2,), lr * 0.01))
