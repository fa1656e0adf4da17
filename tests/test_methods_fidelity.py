"""FedRoD's generic model, LG-FedAvg's global layers and APFL's adaptive alpha against their
papers (issue 24): each test recomputes the definition by hand and fails on the old behaviour
(a uniform-prior generic model, an output-layer-only global part, alpha fixed by default)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import LR, same_states, sgd_config, toy_config, toy_data, toy_rounds, toy_training
from torch import nn

from fedbench.errors import FedbenchError
from fedbench.method import ClientUpdate
from fedbench.models import output_layer_keys
from fedbench.task import SegmentationTask
from fedbench_plugins.apfl import APFL
from fedbench_plugins.fedavg import FedAvg
from fedbench_plugins.fedrod import FedRoD
from fedbench_plugins.lg_fedavg import LGFedAvg
from fedbench_plugins.release_unet import ReleaseUNetModel
from fedbench_plugins.unet import UNet

CPU = torch.device("cpu")
TASK = SegmentationTask(in_channels=1, class_names=["square"])


def logits(fed, state: dict, inputs: torch.Tensor) -> torch.Tensor:
    model = fed.build_model()
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(inputs)


def pooled_prior(splits) -> torch.Tensor:
    """(N_c + 1) / (N + C) over every train label (pixel) of `splits`, written out."""
    counts = torch.tensor(
        [sum(int((s.targets == c).sum()) for s in splits) for c in range(2)], dtype=torch.float64
    )
    return (counts + 1) / (counts.sum() + 2)


# FedRoD: the generic model targets the federation's pooled prior


def test_fedrod_generic_model_is_logit_adjusted_to_the_pooled_prior(data):
    fed = toy_rounds(FedRoD, sgd_config(2), data, 2)
    prior = pooled_prior([c.train for c in fed.clients])
    assert prior[1] < 0.15, "the toy clients' foreground share is small"
    bias = fed.server.bias_key
    assert bias in output_layer_keys(fed.model)
    generic = fed.result([], None).global_state
    raw = fed.global_state
    expected = (raw[bias].double() + prior.log()).float()
    assert torch.equal(generic[bias], expected), "bias + log pi_g, exactly"
    assert all(torch.equal(generic[k], raw[k]) for k in raw if k != bias)
    inputs = torch.cat([site.test.inputs for site in data.sites])
    shift = logits(fed, generic, inputs) - logits(fed, raw, inputs)
    for c in range(2):  # every pixel's class-c logit moves by log pi_g,c
        torch.testing.assert_close(shift[:, c], torch.full_like(shift[:, c], math.log(prior[c])))
    uniform = logits(fed, raw, inputs).softmax(1)  # the balanced (uniform-prior) posterior
    bayes = uniform * prior.float().reshape(1, 2, 1, 1)
    adjusted = logits(fed, generic, inputs).softmax(1)
    torch.testing.assert_close(adjusted, bayes / bayes.sum(1, keepdim=True), rtol=1e-4, atol=1e-5)
    assert adjusted[:, 1].mean() < uniform[:, 1].mean(), "less foreground than a uniform prior"


def test_fedrod_sends_its_counts_once_and_they_are_counted(data):
    received: list[list[ClientUpdate]] = []

    class Spy(FedRoD):
        def server_update(self, previous, updates):
            received.append(list(updates))
            return super().server_update(previous, updates)

    fed = toy_rounds(Spy, toy_config(2), data, 2)
    first, second = received
    for update, split in zip(first, [c.train for c in fed.clients], strict=True):
        by_hand = torch.tensor([int((split.targets == c).sum()) for c in range(2)])
        assert set(update.extras) == {"class_counts"}
        assert torch.equal(update.extras["class_counts"], by_hand)
    assert all(u.extras == {} for u in second), "sent once"
    fedavg = toy_rounds(FedAvg, toy_config(2), data, 2)
    assert fed.cost["bytes_up"] == fedavg.cost["bytes_up"] + len(data.sites) * 2 * 8
    assert fed.cost["bytes_down"] == fedavg.cost["bytes_down"]


def test_fedrod_prior_comes_from_the_clients_that_took_part(data):
    cfg = toy_config(1)
    cfg["train"]["clients_per_round"] = 1
    fed = toy_rounds(FedRoD, cfg, data, 1)
    (chosen,) = fed.participation
    assert [c is not None for c in fed.server.counts] == [i in chosen for i in range(3)]
    only = pooled_prior([fed.clients[i].train for i in chosen])
    torch.testing.assert_close(fed.server.global_prior(), only, rtol=0, atol=0)


def test_fedrod_without_personal_heads_scores_the_adjusted_generic_model(data):
    fed = toy_rounds(FedRoD, toy_config(2, personal_head=False), data, 1)
    # pi_g reaches a client in the next round's payload: after round 1 none has one yet
    for i in range(len(data.sites)):
        assert same_states(fed.personalized(i), fed.global_state)
    fed.run_round()
    generic, _ = fed.unseen_site_model()
    assert not same_states(generic, fed.global_state)
    for i in range(len(data.sites)):
        assert same_states(fed.personalized(i), generic)
    fedavg = toy_rounds(FedAvg, toy_config(2), data, 2)
    # down: round 2 sends every client pi_g (2 float64s); up: the 2 int64 counts, sent once
    assert fed.cost["bytes_down"] == fedavg.cost["bytes_down"] + len(data.sites) * 2 * 8
    assert fed.cost["bytes_up"] == fedavg.cost["bytes_up"] + len(data.sites) * 2 * 8


def test_fedrod_refuses_an_output_layer_without_bias():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1, bias=False))
    with pytest.raises(FedbenchError, match="no bias"):
        FedRoD({}, 2).shared_keys(model)


# LG-FedAvg: the layers run after the deepest level are global

#: the up path of MONAI's U-Net (the third entry of each level's Sequential), written out by
#: hand for four levels: every key under these is global, everything else local
UNET_DECODER = ("model.1.submodule.1.submodule.2.", "model.1.submodule.2.", "model.2.")
RELEASE_DECODER = ("up.", "decode.", "head.")


def parameter_share(model: nn.Module, keys: list[str]) -> float:
    params = dict(model.named_parameters())
    return sum(params[k].numel() for k in keys if k in params) / sum(
        p.numel() for p in params.values()
    )


@pytest.mark.parametrize("res_units", [0, 1])
def test_lg_fedavg_shares_the_decoder_of_the_default_unet(res_units):
    model = UNet().build(TASK, {**UNet.defaults, "res_units": res_units})
    expected = [k for k in model.state_dict() if k.startswith(UNET_DECODER)]
    shared = LGFedAvg({}, 3).shared_keys(model)
    assert shared == expected
    assert set(output_layer_keys(model)) < set(shared), "more than the output layer"
    assert parameter_share(model, shared) > 0.35
    assert not any(k.startswith("model.0.") for k in shared), "the encoder stays local"


def test_lg_fedavg_shares_the_decoder_of_the_release_unet():
    model = ReleaseUNetModel().build(SegmentationTask(3, ["a"]), {"features": 4})
    expected = [k for k in model.state_dict() if k.startswith(RELEASE_DECODER)]
    shared = LGFedAvg({}, 3).shared_keys(model)
    assert shared == expected
    assert parameter_share(model, shared) > 0.35


class Backwards(nn.Module):
    """A tiny encoder-decoder registering its layers in reverse: execution order decides."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(4, 2, 1)
        self.decoder = nn.Sequential(nn.ConvTranspose2d(8, 4, 2, stride=2), nn.BatchNorm2d(4))
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encoder(x)))


def test_lg_fedavg_follows_execution_order_not_registration():
    model = Backwards()
    shared = LGFedAvg({}, 2).shared_keys(model)
    assert shared == [k for k in model.state_dict() if k.startswith(("head.", "decoder."))]


def test_lg_fedavg_round_sends_the_decoder_and_keeps_each_encoder(data):
    received: list[list[ClientUpdate]] = []

    class Spy(LGFedAvg):
        def server_update(self, previous, updates):
            received.append(list(updates))
            return super().server_update(previous, updates)

    cfg = toy_config(1)
    cfg["model"].update(channels=[8, 16, 32])
    fed = toy_training(data, data.sites, Spy, cfg, 0, CPU)
    fed.run_round()
    decoder = {
        k for k in fed.model.state_dict() if k.startswith(("model.1.submodule.2.", "model.2."))
    }
    assert all(set(u.state) == decoder for u in received[0])
    personal = [fed.personalized(i) for i in range(len(data.sites))]
    for k in decoder:
        assert all(torch.equal(p[k], fed.global_state[k]) for p in personal), k
    encoder = [k for k in personal[0] if k not in decoder and personal[0][k].is_floating_point()]
    assert all(any(not torch.equal(personal[0][k], p[k]) for p in personal) for k in encoder)


# APFL: adaptive alpha by default, stepped with the models' step size


class AlphaLog(APFL):
    steps: list[tuple[float, float, float, float]] = []

    def move_alpha(self, grad, rate):
        before = self.alpha
        super().move_alpha(grad, rate)
        AlphaLog.steps.append((before, grad, rate, self.alpha))


def test_apfl_alpha_adapts_by_default_with_the_models_step_size():
    data = toy_data()
    AlphaLog.steps = []
    cfg = sgd_config(2)
    assert cfg["method"] == {}, "APFL's defaults"
    fed = toy_rounds(AlphaLog, cfg, data, 2)
    assert AlphaLog.steps, "alpha stepped"
    for before, grad, rate, after in AlphaLog.steps:
        assert rate == LR == cfg["train"]["lr"]
        assert after == min(1.0, max(0.0, before - LR * grad))
    assert all(c.method.alpha != 0.5 for c in fed.clients), "every client's alpha moved"


def test_apfl_alpha_stays_fixed_when_asked():
    data = toy_data()
    AlphaLog.steps = []
    fed = toy_rounds(AlphaLog, toy_config(2, adaptive=False, alpha=0.25), data, 2)
    alphas = [c.method.alpha for c in fed.clients]
    assert AlphaLog.steps == [] and alphas == [0.25] * len(data.sites)
