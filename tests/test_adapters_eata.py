"""EATA (Niu et al., ICML 2022) against its definition: with every sample kept, no reweighting
and no Fisher anchor it is TENT, step for step; its selection, weighting, diversity filter and
Fisher regularizer computed by hand on a few logits."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import predict, toy_builder, toy_data
from torch import nn

from fedbench.adapter import AdaptContext
from fedbench.engine.registry import load_registry
from fedbench.errors import FedbenchError
from fedbench.models import affine_parameters, use_batch_statistics
from fedbench_plugins.eata import (
    Eata,
    FisherAnchor,
    Redundancy,
    image_predictions,
    pseudo_label_fisher,
    weighted_entropy,
)
from fedbench_plugins.tent import Tent, mean_entropy

CPU = torch.device("cpu")
REGISTRY = load_registry()
#: EATA with every pixel and image kept, weights all 1 and no Fisher term: TENT
EATA_AS_TENT = {"margin": math.inf, "d_margin": math.inf, "reweight": False, "fisher_alpha": 0.0}
E0 = 0.4 * math.log(2)  # the paper's margin on two classes: 0.277 nats


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def entropy_of(p: float) -> float:
    """Entropy of the two-class distribution (p, 1 - p), by hand."""
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def two_class(z: list[list[float]]) -> torch.Tensor:
    """[N, 2, 1, P] logits (z, 0) per pixel: the background's probability is sigmoid(z)."""
    zt = torch.tensor(z, dtype=torch.float64)
    return torch.stack([zt, torch.zeros_like(zt)], 1).unsqueeze(2)


# --- the limiting case: TENT ---------------------------------------------------------------


def tiny_model() -> nn.Module:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    return use_batch_statistics(nn.Sequential(*net, nn.Conv2d(4, 2, 1)).double()).train()


def test_one_step_with_everything_kept_is_tents_step():
    batch = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours, tents = tiny_model(), tiny_model()
    ours_params, tent_params = affine_parameters(ours), affine_parameters(tents)
    ours_opt = torch.optim.Adam(ours_params, lr=1e-2)
    tent_opt = torch.optim.Adam(tent_params, lr=1e-2)
    assert Eata(EATA_AS_TENT).step(ours, batch, ours_opt, Redundancy(math.inf), None)
    mean_entropy(tents(batch)).backward()  # tent's step, as Tent.predict takes it
    tent_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ours_params, tent_params))
    assert not torch.equal(ours_params[0], affine_parameters(tiny_model())[0])  # it moved


def test_eata_with_everything_kept_is_tent_bit_for_bit(toy):
    eata = Eata({**EATA_AS_TENT, "epochs": 2})
    assert torch.equal(predict(eata, toy), predict(Tent({"epochs": 2}), toy))
    assert eata.updates == 2 * 4 and eata.redundant == 0  # 16 images in batches of 4


@pytest.mark.parametrize(
    "change",
    [{"margin": 0.8}, {"d_margin": 0.0}, {"fisher_alpha": 2000.0}],
    ids=["filter", "diversity", "fisher"],
)
def test_each_eata_ingredient_changes_the_result(toy, change):
    tent = predict(Tent({"epochs": 2}), toy)
    assert not torch.equal(predict(Eata({**EATA_AS_TENT, "epochs": 2, **change}), toy), tent)


def test_the_weighting_alone_changes_the_result(toy):
    # E0 = 1.01 ln 2 keeps every two-class pixel, so without weights this is tent; with not
    tent = predict(Tent({"epochs": 2}), toy)
    kept = {**EATA_AS_TENT, "epochs": 2, "margin": 1.01}
    assert torch.equal(predict(Eata(kept), toy), tent)
    assert not torch.equal(predict(Eata({**kept, "reweight": True}), toy), tent)


def test_no_fisher_batch_is_eta(toy):
    eta = predict(Eata({"d_margin": math.inf, "fisher_alpha": 0.0, "epochs": 2}), toy)
    unmeasured = Eata({"d_margin": math.inf, "fisher_batches": 0, "epochs": 2})
    assert torch.equal(predict(unmeasured, toy), eta)


# --- selection and weighting by hand -------------------------------------------------------


def test_selection_and_weighting_by_hand():
    # two images of four pixels, logits (z, 0); the second image is dropped (redundant)
    logits = two_class([[0.0, 5.0, 3.0, 2.0], [4.0, 4.0, 4.0, 4.0]])
    loss, mask = weighted_entropy(logits, E0, torch.tensor([True, False]), reweight=True)
    h = {z: entropy_of(sigmoid(z)) for z in (0.0, 5.0, 3.0, 2.0)}  # .693 .040 .192 .364
    assert mask.tolist() == [[[False, True, True, False]], [[False] * 4]]
    weighted = [h[z] / math.exp(h[z] - E0) for z in (5.0, 3.0)]  # 1 / exp(E - E0) each
    assert loss.item() == pytest.approx(sum(weighted) / 2, rel=1e-12)
    plain, _ = weighted_entropy(logits, E0, torch.tensor([True, False]), reweight=False)
    assert plain.item() == pytest.approx((h[5.0] + h[3.0]) / 2, rel=1e-12)


def test_image_predictions_are_the_foreground_maps():
    # one image, three classes, two pixels: softmax per pixel, class 0 (background) left out
    logits = torch.tensor([[[[0.0, 1.0]], [[1.0, 0.0]], [[2.0, 0.0]]]], dtype=torch.float64)
    e, e2 = math.e, math.e**2
    first = [e / (1 + e + e2), e2 / (1 + e + e2)]  # pixel 1: exp(0, 1, 2) / sum
    second = [1 / (e + 2), 1 / (e + 2)]  # pixel 2: exp(1, 0, 0) / sum
    expected = [first[0], second[0], first[1], second[1]]  # class-major, then pixels
    (found,) = image_predictions(logits).tolist()
    assert found == pytest.approx(expected, rel=1e-12)


def test_diversity_filter_by_hand():
    redundancy = Redundancy(d_margin=0.8)
    first = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert redundancy.novel(first).tolist() == [True, True]  # nothing seen: all novel
    redundancy.update(first)
    assert redundancy.average.tolist() == [0.5, 0.5]  # the first batch's mean
    # cos((1, 0), (.5, .5)) = 0.707 < 0.8: novel; cos((1, 1), (.5, .5)) = 1: redundant
    assert redundancy.novel(torch.tensor([[1.0, 0.0], [1.0, 1.0]])).tolist() == [True, False]
    redundancy.update(torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    assert redundancy.average.tolist() == pytest.approx([0.55, 0.45])  # 0.9 old + 0.1 new
    redundancy.update(first[:0])  # nothing selected: unchanged
    assert redundancy.average.tolist() == pytest.approx([0.55, 0.45])


class ShiftedLogits(nn.Module):
    """Logits (z + w * u, 0) per pixel of each image, w a trainable scalar from 0; the input
    only sets the batch size (its first `len(x)` images)."""

    def __init__(self, z: list[list[float]], u: list[list[float]]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.0, dtype=torch.float64))
        self.z = torch.tensor(z, dtype=torch.float64)
        self.u = torch.tensor(u, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shifted = self.z[: len(x)] + self.w * self.u[: len(x)]
        return torch.stack([shifted, torch.zeros_like(shifted)], 1).unsqueeze(2)


def test_eata_step_by_hand():
    # image 0: z = 0, 4, 2 (only z = 4 is below E0); image 1 repeats the average: redundant,
    # though its z = 3, 5 are reliable. The loss is w4 * H(4), w4 = exp(E0 - H(4)) held fixed,
    # and dH(sigmoid(l))/dl = -l p (1 - p); u = 1 at that pixel, so w' = -lr * w4 * dH/dl.
    model = ShiftedLogits([[0.0, 4.0, 2.0], [3.0, 5.0, 1.0]], [[1.0, 1.0, -1.0], [1.0] * 3])
    batch, lr = torch.zeros(2, 1, 1, 3), 0.1
    maps = image_predictions(model(batch))
    redundancy = Redundancy(0.9, average=maps[1].clone())  # cos(map 0, map 1) = 0.40
    eata = Eata({"margin": 0.4})
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    assert eata.step(model, batch, optimizer, redundancy, None) and eata.redundant == 1
    p = sigmoid(4.0)
    w4 = math.exp(E0 - entropy_of(p))
    assert model.w.item() == pytest.approx(-lr * w4 * (-4.0 * p * (1 - p)), rel=1e-12)
    assert torch.allclose(redundancy.average, 0.9 * maps[1] + 0.1 * maps[0])  # image 0 only


def test_no_step_without_a_counted_pixel():
    model = ShiftedLogits([[0.0, 0.5]], [[1.0, 1.0]])  # entropies .69 and .67: none reliable
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    redundancy = Redundancy(0.9)
    assert not Eata({}).step(model, torch.zeros(1, 1, 1, 2), optimizer, redundancy, None)
    assert model.w.item() == 0.0 and redundancy.average is None


def test_pseudo_label_fisher_by_hand():
    # pixels l = 2 (label 0) and -1 (label 1), u = 1, 2: dCE/dl = -sigmoid(-l) for label 0 and
    # sigmoid(l) for label 1; the gradient is the mean over pixels of dCE/dl * u, squared
    source = ShiftedLogits([[2.0, -1.0]], [[1.0, 2.0]])
    (fisher,) = pseudo_label_fisher(source, [source.w], torch.zeros(1, 1, 1, 2))
    grad = (-sigmoid(-2.0) * 1.0 + sigmoid(-1.0) * 2.0) / 2
    assert fisher.item() == pytest.approx(grad**2, rel=1e-12)
    assert source.w.grad is None  # left clean for the next estimate


def test_fisher_penalty_by_hand():
    params = [torch.tensor([0.0, 1.0]), torch.tensor(1.0)]
    anchor = FisherAnchor(params, batches=2)
    anchor.add([torch.tensor([1.0, 2.0]), torch.tensor(3.0)])
    anchor.add([torch.tensor([3.0, 0.0]), torch.tensor(1.0)])  # mean F: (2, 1) and 2
    assert anchor.penalty().item() == 0.0  # at the initial weights
    params[0] += torch.tensor([1.0, 2.0])
    params[1] -= 2.0
    # 2 * 1^2 + 1 * 2^2 + 2 * (-2)^2 = 14
    assert anchor.penalty().item() == pytest.approx(14.0)


def test_the_fisher_anchor_holds_the_weights_back(toy):
    data, federation, _ = toy
    initial = affine_parameters(federation.model(federation.global_state))

    def drift(alpha: float) -> float:
        built = []

        def build():
            built.append(toy_builder(data)())
            return built[-1]

        fed = type(federation)(build, federation.global_state, [], [], CPU)
        Eata({"d_margin": math.inf, "fisher_alpha": alpha, "epochs": 2}).predict(
            fed, toy[2], AdaptContext(4, 0, data.task)
        )
        moved = affine_parameters(built[0])
        return sum(float((a - b).detach().pow(2).sum()) for a, b in zip(moved, initial))

    assert drift(1e7) < drift(0.0)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("margin", 0.0),
        ("d_margin", -1.0),
        ("fisher_alpha", -1.0),
        ("lr", -1.0),
        ("epochs", -1),
        ("fisher_batches", -1),
        ("reweight", "yes"),
        ("margin", math.inf),
    ],
)
def test_eata_settings_are_validated(setting, value):
    model = toy_builder(toy_data())()
    with pytest.raises(FedbenchError, match=f"adapter.{setting}"):
        Eata({setting: value}).check(REGISTRY.get("methods", "fedavg"), model, toy_data().task)
