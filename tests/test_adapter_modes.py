"""Each adapter says how its paper adapts (issue 28): online over the stream, episodic (reset per
image), per batch, or not at all; the run record keeps it."""

from __future__ import annotations

from fedbench.adapter import Adapter
from fedbench.engine.registry import load_registry
from fedbench.engine.resolve import RunSpec, resolve
from fedbench.engine.run import run_identity

MODES = {"online", "episodic", "per batch", "none"}


def test_every_adapter_declares_a_mode_and_those_that_learn_are_not_none():
    registry = load_registry()
    for name in registry.names("adapters"):
        adapter = registry.get("adapters", name)
        assert adapter.mode in MODES, name
        learns = "epochs" in adapter.defaults or "lr" in adapter.defaults
        assert (adapter.mode != "none") == (learns or name == "bn-adapt"), name
    assert registry.get("adapters", "memo").mode == "episodic"
    assert registry.get("adapters", "tent").mode == "online"
    assert Adapter.mode == "none"


def test_the_record_keeps_the_adapters_mode(tmp_path):
    registry = load_registry()
    spec = RunSpec(method="fedavg", adapter="memo", preset="quick", results_dir=tmp_path)
    assert run_identity(resolve(spec, registry))["adapter_mode"] == "episodic"
    plain = RunSpec(method="fedavg", holdout="none", preset="quick", results_dir=tmp_path)
    assert "adapter_mode" not in run_identity(resolve(plain, registry))
