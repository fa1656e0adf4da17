"""`train.local_steps`: a budget of batches per local pass (FLamby's num_updates) instead of one
pass over the client's data; absent unless set, so no existing run's settings hash changes."""

from __future__ import annotations

import pytest
import torch
from conftest import sgd_config, toy_config, toy_rounds
from test_bad_settings import RUN, one_line

from fedbench.engine.config import apply_overrides, preset_config, validate
from fedbench.errors import FedbenchError
from fedbench.method import LocalContext
from fedbench_plugins.fedavg import FedAvg
from fedbench_plugins.scaffold import Scaffold

BATCH = 4  # toy_config's batch size; the toy sites hold 8, 12 and 6 training images


#: client -> the training-image indices of each batch one local pass gave `Recording`
SEEN: dict[int, list[list[int]]] = {}


class Recording(FedAvg):
    """FedAvg that first draws one local pass and keeps what it gave, then trains as usual."""

    def local_update(self, model: torch.nn.Module, ctx: LocalContext) -> dict:
        seen = SEEN.setdefault(ctx.client, [])
        flat = ctx.split.inputs.flatten(1)
        for inputs, _ in ctx.batches():
            rows = inputs.flatten(1)
            seen.append([int((flat == row).all(1).nonzero()[0]) for row in rows])
        return super().local_update(model, ctx)


def with_steps(config: dict, steps: int, epochs: int = 1) -> dict:
    config = apply_overrides(config, [f"train.local_steps={steps}"])
    config["train"]["local_epochs"] = epochs
    validate(config)
    return config


def test_each_client_takes_exactly_the_budget_per_round(data):
    fed = toy_rounds(FedAvg, with_steps(toy_config(), 5), data, 2)
    assert fed.cost["client_steps"] == 2 * 3 * 5  # rounds x clients x budget
    plain = toy_rounds(FedAvg, toy_config(), data, 2)
    assert plain.cost["client_steps"] == 2 * (2 + 3 + 2)  # one pass: 8, 12, 6 images of 4


def test_the_budget_counts_per_local_epoch(data):
    fed = toy_rounds(FedAvg, with_steps(toy_config(), 3, epochs=2), data, 1)
    assert fed.cost["client_steps"] == 1 * 3 * 2 * 3


def test_a_budget_past_the_data_continues_through_reshuffled_passes(data):
    SEEN.clear()
    toy_rounds(Recording, with_steps(toy_config(), 5), data, 1)
    seen = SEEN[2]  # 6 images: passes of batches 4 + 2
    assert [len(b) for b in seen] == [4, 2, 4, 2, 4]
    assert sorted(seen[0] + seen[1]) == sorted(seen[2] + seen[3]) == list(range(6))
    SEEN.clear()
    toy_rounds(Recording, toy_config(), data, 1)
    assert [len(b) for b in SEEN[2]] == [4, 2]  # no budget: one pass


def test_scaffold_counts_its_steps_from_the_budget(data):
    fed = toy_rounds(Scaffold, with_steps(sgd_config(1), 4), data, 1)
    assert fed.cost["client_steps"] == 3 * 4


def test_absent_unless_set_so_existing_settings_keep_their_hash():
    assert "local_steps" not in preset_config("quick")["train"]
    config = apply_overrides(preset_config("quick"), ["train.local_steps=100"])
    assert config["train"]["local_steps"] == 100


@pytest.mark.parametrize("value", [-1, 1.5, True, "many"])
def test_a_bad_budget_is_refused_naming_the_setting(value):
    config = preset_config("quick")
    config["train"]["local_steps"] = value
    with pytest.raises(FedbenchError) as caught:
        validate(config)
    assert str(caught.value) == (
        "setting train.local_steps must be an integer of at least 0 (0: a pass over the "
        f"client's data), got {value!r}"
    )


def test_the_command_line_refuses_a_bad_budget_in_one_line(tmp_path):
    line = one_line([*RUN, "--set", "train.local_steps=-2"], tmp_path)
    assert line.startswith("error: setting train.local_steps must be an integer of at least 0")
    line = one_line([*RUN, "--set", "train.local_steps=ten"], tmp_path)
    assert line == "error: setting train.local_steps expects an integer, got 'ten'"
    line = one_line([*RUN, "--set", "train.local_step=3"], tmp_path)
    assert "train.local_steps" in line  # the unknown-setting line lists it among the known
