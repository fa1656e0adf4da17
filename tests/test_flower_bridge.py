"""The Flower bridge's parts without a running Flower (issue 27): records carry tensors bit for
bit, a node's failure is an error reply naming its site, a missing or failed reply is one line
naming the site and the round, the project `fedbench flower new` writes is one Flower accepts,
and what the bridge does not do is refused in one line. Needs the `flower` extra."""

from __future__ import annotations

import importlib.util
import tomllib
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("flwr") is None, reason="needs fedbench[flower]"
)


def test_states_cross_as_records_bit_for_bit():
    from fedbench.flower.records import from_blob, from_record, to_blob, to_record

    state = {
        "w": torch.randn(3, 4),
        "count": torch.tensor(7, dtype=torch.int64),  # a 0-d buffer stays 0-d
        "half": torch.randn(5).double(),
    }
    back = from_record(to_record(state))
    assert list(back) == list(state)
    for key, tensor in state.items():
        assert back[key].dtype == tensor.dtype and back[key].shape == tensor.shape
        assert torch.equal(back[key], tensor)
    kept = {"step": 3, "momentum": {"w": torch.ones(2)}, "stream": torch.Generator().get_state()}
    restored = from_blob(to_blob(kept))
    assert restored["step"] == 3 and torch.equal(restored["stream"], kept["stream"])


def reply(node_id: int, error: tuple[int, str] | None = None):
    """What the exchange reads of a node's reply (Flower builds real ones only inside a run)."""
    return SimpleNamespace(
        metadata=SimpleNamespace(src_node_id=node_id),
        has_error=lambda: error is not None,
        error=SimpleNamespace(code=error[0], reason=error[1]) if error else None,
        content={},
        deflate=lambda: b"reply",
        children=None,
    )


def exchange():
    from fedbench.flower.strategy import Exchange

    return Exchange(grid=None, nodes={0: 10, 1: 11, 2: 12}, sites=["A", "B", "C"], timeout=5)


def test_a_failed_reply_names_the_site_and_the_round():
    from fedbench.errors import Diverged
    from fedbench.flower.node import DIVERGED, FAILED
    from fedbench.flower.strategy import ClientFailed

    with pytest.raises(ClientFailed, match=r"^site B: ValueError: bad \(round 3, training\)$"):
        exchange().checked(
            [0, 1], [reply(10), reply(11, (FAILED, "site B: ValueError: bad"))], 3, "training"
        )
    with pytest.raises(Diverged, match="site C: .*round 2"):
        exchange().checked([2], [reply(12, (DIVERGED, "site C: Diverged: nan"))], 2, "training")


def test_a_missing_reply_names_the_silent_site():
    from fedbench.flower.strategy import ClientFailed

    with pytest.raises(
        ClientFailed, match=r"^site A, C: no reply in round 4 \(validation\): none within 5 s"
    ):
        exchange().checked([0, 1, 2], [reply(11)], 4, "validation")


def test_a_node_the_superlink_lost_is_named_with_flowers_reason():
    from fedbench.flower.strategy import ClientFailed

    lost = reply(1, (5, "Error: Node Unavailable - no heartbeat"))  # from the SuperLink itself
    with pytest.raises(
        ClientFailed, match=r"^site B: no reply in round 2 \(training\): Error: Node"
    ):
        exchange().checked([0, 1], [reply(10), lost], 2, "training")


def test_a_node_that_fails_answers_with_one_line_naming_its_site():
    from fedbench.errors import Diverged, FedbenchError
    from fedbench.flower.node import DIVERGED, FAILED, failure

    code, line = failure(FedbenchError("unknown dataset 'x';\n known: a, b"), "BMC")
    assert (code, line) == (FAILED, "site BMC: FedbenchError: unknown dataset 'x'; known: a, b")
    assert failure(Diverged("loss became nan"), "HK")[0] == DIVERGED


def test_what_the_bridge_does_not_do_is_one_line():
    from fedbench.engine.registry import load_registry
    from fedbench.errors import FedbenchError
    from fedbench.flower.federation import supported

    registry = load_registry()
    config = {"eval": {"val_best": False}}
    with pytest.raises(FedbenchError, match="pools every site's data"):
        supported(registry.get("methods", "central"), config)
    with pytest.raises(FedbenchError, match="eval.val_best=false"):
        supported(registry.get("methods", "fedavg"), {"eval": {"val_best": True}})
    supported(registry.get("methods", "fedavg"), config)


def test_flower_new_writes_a_project_flower_accepts(tmp_path):
    from flwr.common.config import validate_config

    from fedbench.cli import app

    folder = tmp_path / "app"
    args = ["flower", "new", str(folder), "--method", "ditto", "--preset", "quick"]
    result = CliRunner().invoke(app, [*args, "--set", "data.num_sites=3"])
    assert result.exit_code == 0, result.output
    config = tomllib.loads((folder / "pyproject.toml").read_text())
    valid, errors, _ = validate_config(config, project_dir=folder)
    assert valid, errors
    run_config = config["tool"]["flwr"]["app"]["config"]
    assert run_config["method"] == "ditto" and run_config["settings"] == "data.num_sites=3"
    assert run_config["results-dir"] == str((folder / "results").resolve())
    readme = (folder / "README.md").read_text()
    assert "site='RUNMC'" in readme and "site='I2CVB'" in readme and "site='UCL'" not in readme
    again = CliRunner().invoke(app, args)  # the folder now holds the project: left as it is
    assert again.exit_code != 0 and "not an empty folder" in again.stderr
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "fedbench_app.py",
        "pyproject.toml",
    ]


def test_flower_new_checks_the_names_before_writing(tmp_path):
    from fedbench.cli import app

    result = CliRunner().invoke(app, ["flower", "new", str(tmp_path / "x"), "--method", "nope"])
    assert result.exit_code != 0 and "unknown method" in result.stderr
    assert not (tmp_path / "x").exists()


def test_the_plan_round_trips_through_a_run_config():
    from fedbench.flower.plan import Plan

    plan = Plan("fedprox", "synth-prostate", 3, "quick", ("method.mu=0.1", "data.sites=RUNMC,BMC"))
    assert Plan.from_run_config(plan.run_config()) == plan
    assert SimpleNamespace(**plan.run_config()).seed == 3
