"""DUA (Mirza et al., CVPR 2022) against its definition: the decaying momentum by hand, the
running-statistics recursion of one BatchNorm layer over two images by hand, no momentum is the
`none` adapter, only running statistics move, and labels are never read."""

from __future__ import annotations

import pytest
import torch
from conftest import predict, toy_builder, toy_data
from torch import nn

from fedbench.adapter import AdaptContext, TrainedFederation
from fedbench.data import UnlabeledImages
from fedbench.engine.registry import load_registry
from fedbench.errors import FedbenchError
from fedbench.task import SegmentationTask
from fedbench_plugins.dua import Dua, augment, momentum_at

CPU = torch.device("cpu")
REGISTRY = load_registry()
#: one copy per image, as it is
PLAIN = {"augmentations": 1, "intensity": 0.0, "flip": False}


def test_momentum_schedule_by_hand():
    assert [momentum_at(t, 0.1, 0.94, 0.005) for t in range(3)] == pytest.approx(
        [0.1, 0.094, 0.08836]
    )
    # 0.1 * 0.94^48 = 0.00513 is still above the floor, 0.1 * 0.94^49 = 0.00482 is not
    assert momentum_at(48, 0.1, 0.94, 0.005) == pytest.approx(0.1 * 0.94**48)
    assert momentum_at(48, 0.1, 0.94, 0.005) > 0.005
    assert momentum_at(49, 0.1, 0.94, 0.005) == 0.005
    assert momentum_at(1000, 0.1, 0.94, 0.005) == 0.005
    assert momentum_at(7, 0.3, 1.0, 0.0) == 0.3  # omega = 1: constant


def test_the_momentum_goes_on_decaying_over_passes(toy):
    dua = Dua({"epochs": 2, "augmentations": 2})
    predict(dua, toy)
    assert len(dua.momenta) == 2 * 16  # one update per image and pass
    assert dua.momenta == [max(0.1 * 0.94**t, 0.005) for t in range(32)]


class OneNorm(nn.Module):
    """A single BatchNorm layer, its affine weights and running statistics set away from the
    defaults (mean 0.5, variance 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(1).double()
        with torch.no_grad():
            self.norm.weight.fill_(1.5)
            self.norm.bias.fill_(-0.25)
            self.norm.running_mean.fill_(0.5)
            self.norm.running_var.fill_(2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


@pytest.mark.parametrize("decay", [1.0, 0.5], ids=["omega1", "omega0.5"])
def test_running_statistics_recursion_by_hand(decay):
    # per image t: running <- (1 - m_t) running + m_t * (the image's mean, unbiased variance),
    # m_t = 0.3 decay^t; then the image is normalised with the updated running statistics
    built = OneNorm()
    federation = TrainedFederation(OneNorm, built.state_dict(), [], [], CPU)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 1, 4, 5, generator=gen, dtype=torch.float64) * 3 + 1
    ctx = AdaptContext(2, 0, SegmentationTask(in_channels=1))
    dua = Dua({**PLAIN, "momentum": 0.3, "decay": decay, "min_momentum": 0.0})
    outputs = dua.predict(federation, UnlabeledImages(images), ctx)
    mean, var = 0.5, 2.0
    for t, image in enumerate(images):
        m = 0.3 * decay**t
        mean = (1 - m) * mean + m * image.mean().item()
        var = (1 - m) * var + m * image.var(unbiased=True).item()
        expected = (image - mean) / (var + 1e-5) ** 0.5 * 1.5 - 0.25
        torch.testing.assert_close(outputs[t].double(), expected, rtol=1e-6, atol=1e-6)
    assert dua.momenta == pytest.approx([0.3, 0.3 * decay])


@pytest.mark.parametrize("params", [{"momentum": 0.0, "min_momentum": 0.0}, {"epochs": 0}])
def test_without_momentum_or_a_pass_it_is_none(toy, params):
    none = REGISTRY.get("adapters", "none")({})
    assert torch.equal(predict(Dua(params), toy), predict(none, toy, batch_size=1))


def test_it_changes_the_prediction(toy):
    none = REGISTRY.get("adapters", "none")({})
    assert not torch.allclose(predict(Dua({}), toy), predict(none, toy, batch_size=1))


def test_only_running_statistics_move(toy):
    data, federation, images = toy
    built = []

    def build():
        built.append(toy_builder(data)())
        return built[-1]

    fed = TrainedFederation(build, federation.global_state, [], [], CPU)
    Dua({"augmentations": 4}).predict(fed, images, AdaptContext(4, 0, data.task))
    after, before = built[0].state_dict(), federation.global_state
    moved = {k for k in before if not torch.equal(after[k], before[k])}
    assert moved and all(
        k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in moved
    )
    assert all(p.grad is None for p in built[0].parameters())


def test_augment_flips_and_jitters_within_bounds():
    image = torch.randn(2, 6, 6, generator=torch.Generator().manual_seed(1))
    same = augment(image, 3, 0.0, False, torch.Generator().manual_seed(0))
    assert all(torch.equal(copy, image) for copy in same)
    flipped = augment(image, 32, 0.0, True, torch.Generator().manual_seed(0))
    plain = [torch.equal(c, image) for c in flipped]
    mirrored = [torch.equal(c, image.flip(-1)) for c in flipped]
    assert all(p or m for p, m in zip(plain, mirrored))  # each copy is the image or its flip
    assert any(plain) and any(mirrored)
    jittered = augment(image, 8, 0.1, False, torch.Generator().manual_seed(0))
    for copy in jittered:
        # copy = x (1 + a) + b std(x): solve for a and b from two pixels, check the bounds
        x, y = image.flatten(), copy.flatten()
        a = (y[1] - y[0]) / (x[1] - x[0]) - 1
        b = (y[0] - x[0] * (1 + a)) / image.std()
        assert abs(a) <= 0.1 + 1e-5 and abs(b) <= 0.1 + 1e-5
        torch.testing.assert_close(copy, image * (1 + a) + b * image.std())


def test_the_labels_are_never_read(toy):
    data, _, _ = toy
    site = data.sites[0]
    first = predict(Dua({"augmentations": 4}), toy)
    splits = (site.train, site.val, site.test)
    kept = [split.targets.clone() for split in splits]
    try:
        for split in splits:  # every label of the unseen site, changed in place
            split.targets.copy_(1 - split.targets)
        assert torch.equal(predict(Dua({"augmentations": 4}), toy), first)
    finally:
        for split, targets in zip(splits, kept):
            split.targets.copy_(targets)


def test_a_model_without_running_statistics_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2))
    task = SegmentationTask(in_channels=1)
    with pytest.raises(FedbenchError, match="running statistics"):
        Dua({}).check(REGISTRY.get("methods", "fedavg"), model, task)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("epochs", -1),
        ("augmentations", 0),
        ("momentum", 1.5),
        ("decay", -0.1),
        ("min_momentum", 2.0),
        ("intensity", -1.0),
        ("flip", "no"),
    ],
)
def test_dua_settings_are_validated(setting, value):
    model = toy_builder(toy_data())()
    with pytest.raises(FedbenchError, match=f"adapter.{setting}"):
        Dua({setting: value}).check(REGISTRY.get("methods", "fedavg"), model, toy_data().task)
