"""Adapters against their definitions where a wrong definition still runs and still predicts:
SAR on a confidently trained model (not bn-adapt in disguise), which parameters TENT and SAR
adapt, and IOP-FL routing's losses computed by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedbench.adapter import AdaptContext, TrainedFederation
from fedbench.data import UnlabeledImages
from fedbench.models import affine_parameters, normalization_state_keys
from fedbench.task import SegmentationTask
from fedbench_plugins import iopfl_routing as ir
from fedbench_plugins.bn_adapt import BNAdapt
from fedbench_plugins.sar import SAR
from fedbench_plugins.tent import Tent
from fedbench_plugins.unet import UNet

TASK = SegmentationTask(in_channels=1)
CFG = {"channels": [8, 16], "res_units": 0}
CPU = torch.device("cpu")


def squares(n: int, seed: int, gain: float = 1.0, offset: float = 0.0, noise: float = 0.3):
    """32x32 images, each with one bright square of side 5-10 (about 4% of the pixels)."""
    gen = torch.Generator().manual_seed(seed)
    targets = torch.zeros(n, 32, 32, dtype=torch.long)
    for i in range(n):
        side = int(torch.randint(5, 11, (1,), generator=gen))
        y, x = torch.randint(1, 31 - side, (2,), generator=gen).tolist()
        targets[i, y : y + side, x : x + side] = 1
    inputs = gain * targets.unsqueeze(1).float() + offset
    return inputs + noise * torch.randn(n, 1, 32, 32, generator=gen), targets


class Recorder:
    """Builds the U-Net and keeps every module it builds, to look inside an adapter's model."""

    def __init__(self) -> None:
        self.built: list[nn.Module] = []

    def __call__(self) -> nn.Module:
        self.built.append(UNet().build(TASK, CFG))
        return self.built[-1]


@pytest.fixture(scope="module")
def trained():
    """A U-Net trained to near-certain background (mean pixel entropy ~3% of ln 2, as the
    federations of synth-prostate), and an unseen site of 32 shifted images."""
    torch.manual_seed(0)
    model = UNet().build(TASK, CFG)
    inputs, targets = squares(64, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        chosen = torch.randint(0, 64, (8,))
        optimizer.zero_grad()
        F.cross_entropy(model(inputs[chosen]), targets[chosen]).backward()
        optimizer.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    unseen, _ = squares(32, seed=1, gain=0.7, offset=0.3, noise=0.4)
    return state, UnlabeledImages(unseen)


def federation(state: dict, builder=None) -> TrainedFederation:
    return TrainedFederation(
        build_model=builder or Recorder(),
        global_state=state,
        personalized=[state],
        site_names=["site0"],
        device=CPU,
    )


CTX = AdaptContext(batch_size=4, seed=0, task=TASK)


# --- SAR on a trained model --------------------------------------------------------------------


def test_sar_defaults_adapt_a_confident_model_without_recovering_every_step(trained):
    state, images = trained
    plain = BNAdapt({}).predict(federation(state), images, CTX)
    entropy = -(plain.softmax(1) * plain.log_softmax(1)).sum(1).mean().item()
    assert entropy < 0.05 * math.log(2)  # confident: SAR's old absolute rule reset every step
    sar = SAR({"epochs": 2})
    adapted = sar.predict(federation(state), images, CTX)
    changed = int((adapted.argmax(1) != plain.argmax(1)).sum())
    assert changed >= 5, changed  # bn-adapt's masks, moved by SAR's own steps
    assert sar.updates == 2 * 8  # 32 images in batches of 4, two passes: a step on each
    assert sar.recoveries < sar.updates


def test_sar_recovers_when_entropy_minimisation_runs_away(trained):
    # at lr 0.5 the reliable pixels' entropy falls far below the source model's on the same
    # batches (towards a trivial, certain solution): the average ratio crosses 0.2
    state, images = trained
    runaway = SAR({"epochs": 5, "lr": 0.5})
    runaway.predict(federation(state), images, CTX)
    assert runaway.recoveries >= 1
    unguarded = SAR({"epochs": 5, "lr": 0.5, "reset": 0.0})
    unguarded.predict(federation(state), images, CTX)
    assert unguarded.recoveries == 0


# --- which parameters TENT and SAR adapt -------------------------------------------------------


@pytest.mark.parametrize(
    "adapter", [Tent({"epochs": 2}), SAR({"epochs": 2, "reset": 0.0})], ids=["tent", "sar"]
)
def test_only_normalization_affine_weights_change(trained, adapter):
    state, images = trained
    recorder = Recorder()
    adapter.predict(federation(state, recorder), images, CTX)
    adapted = recorder.built[0].state_dict()  # the model the adapter stepped
    norm = normalization_state_keys(recorder.built[0])
    changed = {k for k, v in state.items() if k in adapted and not torch.equal(adapted[k], v)}
    affine = {k for k in norm if k.endswith(("weight", "bias"))}
    assert changed and changed <= affine, sorted(changed - affine)


def test_affine_parameters_are_the_normalization_weights_and_freeze_the_rest():
    model = UNet().build(TASK, CFG)
    chosen = affine_parameters(model)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    expected = [p for m in norms for p in (m.weight, m.bias)]
    assert {id(p) for p in chosen} == {id(p) for p in expected} and len(chosen) == len(expected)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in expected}


# --- IOP-FL routing's losses by hand -----------------------------------------------------------


def test_shape_loss_counts_the_21_by_21_band_around_one_pixel():
    # one certain foreground pixel far from the borders: max-pool 21x21 is 1 on 21 x 21 = 441
    # positions, min-pool is 0 everywhere, so the Frobenius norm is sqrt(441) = 21
    probs = torch.zeros(1, 2, 40, 40)
    probs[0, 1, 20, 20] = 1.0
    probs[0, 0] = 1 - probs[0, 1]
    assert ir.shape_loss(probs).item() == pytest.approx(21.0)
    # near a corner the window is clipped: rows and columns 0..10 around (0, 0) -> 11 x 11
    corner = torch.zeros(1, 2, 40, 40)
    corner[0, 1, 0, 0] = 1.0
    assert ir.shape_loss(corner).item() == pytest.approx(11.0)


def test_entropy_loss_by_hand():
    # two images, one pixel: (0.9, 0.1) and (0.5, 0.5); summed over the batch, averaged over
    # classes and pixels, over log 2 (the release's 1e-6 inside the log, so rel 1e-5)
    probs = torch.tensor([[0.9, 0.1], [0.5, 0.5]], dtype=torch.float64).view(2, 2, 1, 1)
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) + math.log(2)
    assert ir.entropy_loss(probs).item() == pytest.approx(h / 2 / math.log(2), rel=1e-5)


class Pointwise(nn.Module):
    """A per-pixel model: any flip or rotation of its input moves its output the same way."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1).double()
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.5, -2.0], dtype=torch.float64).view(2, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.2, -0.1], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_consistency_maps_the_perturbed_prediction_back():
    # without noise, a per-pixel model's prediction on the flipped and rotated view, mapped
    # back, is its prediction on the batch: the loss is 0. Not mapped back, it is not.
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = Pointwise()
    torch.manual_seed(3)
    view, flips, k = ir.perturb(x, 0.0)
    assert bool(flips.any()) or k != 0  # the seed moves some images
    with torch.no_grad():
        unmapped = F.mse_loss(model(view).softmax(1), model(x).softmax(1)).item()
        torch.manual_seed(3)
        loss = ir.consistency_loss(model, x, 0.0).item()
    assert unmapped > 1e-3 and loss < 1e-12


def test_consistency_with_noise_by_hand():
    # with noise n, mapped back, the view is x + n: the loss is MSE(softmax f(x + n), softmax f(x))
    x = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = Pointwise()
    torch.manual_seed(5)
    view, flips, k = ir.perturb(x, 0.5)
    noisy = ir.unperturb(view, flips, k)
    assert not torch.allclose(noisy, x)
    with torch.no_grad():
        expected = F.mse_loss(model(noisy).softmax(1), model(x).softmax(1)).item()
        torch.manual_seed(5)
        assert ir.consistency_loss(model, x, 0.5).item() == pytest.approx(expected, rel=1e-12)


def test_release_weights_are_the_defaults():
    # IOP-FL release: 10 * entropy + 0.1 * consistency + 1e-6 * shape
    d = ir.IOPFLRouting.defaults
    assert (d["entropy_weight"], d["consistency_weight"], d["shape_weight"]) == (10.0, 0.1, 1e-6)


@pytest.mark.parametrize("term", ["entropy", "consistency", "shape"])
def test_each_weight_scales_its_own_term(term):
    x = torch.randn(4, 1, 24, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model = Pointwise()
    weights = {"entropy_weight": 0.0, "consistency_weight": 0.0, "shape_weight": 0.0}
    p = {**ir.IOPFLRouting.defaults, **weights, f"{term}_weight": 3.0}
    with torch.no_grad():
        probs = model(x).softmax(1)
        torch.manual_seed(7)
        alone = {
            "entropy": lambda: ir.entropy_loss(probs),
            "consistency": lambda: ir.consistency_loss(model, x, float(p["noise_std"])),
            "shape": lambda: ir.shape_loss(probs),
        }[term]().item()
        torch.manual_seed(7)
        total = ir.adaptation_loss(model, x, p).item()
    assert alone > 0 and total == pytest.approx(3.0 * alone, rel=1e-12)
