"""SAR (Niu et al., ICLR 2023) and MEMO (Zhang et al., NeurIPS 2022) against their definitions:
limiting cases equal to simpler adapters, and small examples computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import predict, toy_builder, toy_data

from fedbench.adapter import AdaptContext
from fedbench.data import UnlabeledImages
from fedbench.engine.registry import load_registry
from fedbench.errors import FedbenchError
from fedbench.task import Task
from fedbench_plugins.memo import (
    MEMO,
    augment,
    dihedral_views,
    invert,
    marginal_entropy,
    transform,
    use_prior_statistics,
    views_loss,
)
from fedbench_plugins.sar import (
    SAR,
    Recovery,
    ascend,
    reliable_entropy,
    restore,
    sar_step,
    source_level,
)

CPU = torch.device("cpu")
REGISTRY = load_registry()
#: SAR without its three ingredients, on tent's optimizer
SAR_AS_TENT = {"rho": 0.0, "margin": math.inf, "reset": 0.0, "optimizer": "adam"}


def builtin(name: str, **params) -> object:
    return REGISTRY.get("adapters", name)(params)


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def entropy_of(p: float) -> float:
    """Entropy of the two-class distribution (p, 1 - p), by hand."""
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


# --- SAR ---------------------------------------------------------------------------------------


def test_sar_without_filter_sam_and_recovery_is_tent_bit_for_bit(toy):
    tent = predict(builtin("tent", epochs=2), toy)
    sar = predict(SAR({**SAR_AS_TENT, "epochs": 2}), toy)
    assert torch.equal(sar, tent)


@pytest.mark.parametrize(
    "change", [{"rho": 0.05}, {"margin": 0.4}, {"optimizer": "sgd"}], ids=["rho", "filter", "sgd"]
)
def test_each_sar_ingredient_changes_the_result(toy, change):
    tent = predict(builtin("tent", epochs=1), toy)
    assert not torch.equal(predict(SAR({**SAR_AS_TENT, **change}), toy), tent)


def test_reliable_filter_by_hand():
    # four pixels of a two-class map: logits (z, 0), z = 0, 5, 3, 2; E0 = 0.4 ln 2 = 0.277
    logits = torch.tensor([[[[0.0, 5.0, 3.0, 2.0]], [[0.0] * 4]]], dtype=torch.float64)
    loss, mask = reliable_entropy(logits, 0.4 * math.log(2))
    entropies = [entropy_of(sigmoid(z)) for z in (0.0, 5.0, 3.0, 2.0)]  # .693 .040 .192 .364
    assert mask.tolist() == [[[False, True, True, False]]]
    assert loss.item() == pytest.approx((entropies[1] + entropies[2]) / 2, rel=1e-12)


class ShiftedLogits(torch.nn.Module):
    """Logits (z + w * u, 0) per pixel, w a trainable scalar from 0; the input is ignored."""

    def __init__(self, z: list[float], u: list[float]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.0, dtype=torch.float64))
        self.z = torch.tensor(z, dtype=torch.float64)
        self.u = torch.tensor(u, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.stack([self.z + self.w * self.u, torch.zeros_like(self.z)])
        return scores.view(1, 2, 1, -1).expand(len(x), -1, -1, -1)


def test_sar_step_by_hand():
    # pixels z = 0, 5, 3, 2 moved by w * u, u = 0, 0, 1, -1; E0 = 0.4 ln 2 = 0.277, and
    # dH(sigmoid(l))/dl = -l p (1 - p). At w = 0 z = 5, 3 are reliable, the gradient is
    # negative, so the ascent goes to w' = -rho = -0.5: logits 0, 5, 2.5, 2.5. The last pixel is
    # reliable there (H = 0.269) but was not at w: it stays out. The step: the mean over the two
    # kept pixels of the gradient at w', of which z = 5 (u = 0) gives nothing.
    model, rho, lr = ShiftedLogits([0.0, 5.0, 3.0, 2.0], [0.0, 0.0, 1.0, -1.0]), 0.5, 0.1
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss = sar_step(model, torch.zeros(1, 1, 1, 4), [model.w], optimizer, 0.4, rho)
    p = sigmoid(2.5)  # (rel 1e-9: SAM's 1e-12 in rho / (||g|| + 1e-12) moves w' a hair)
    assert model.w.item() == pytest.approx(-lr * (-2.5 * p * (1 - p)) / 2, rel=1e-9)
    expected = (entropy_of(sigmoid(5.0)) + entropy_of(p)) / 2  # in nats
    assert loss == pytest.approx(expected, rel=1e-9)


def test_sar_optimizers():
    w = [torch.nn.Parameter(torch.zeros(1))]
    sgd = SAR({"optimizer": "sgd"}).optimizer(w)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9
    adam = SAR({}).optimizer(w)  # the default: tent's Adam and lr
    assert type(adam) is torch.optim.Adam and adam.defaults["lr"] == 1e-3


def test_sam_ascent_by_hand_and_exact_restore():
    a = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor([3.0], requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])  # ||g|| = 5
    saved = ascend([a, b], rho=0.5)
    assert torch.allclose(a.detach(), torch.tensor([1.3, 2.0]))
    assert torch.allclose(b.detach(), torch.tensor([3.4]))
    restore([a, b], saved)
    assert a.tolist() == [1.0, 2.0] and b.tolist() == [3.0]


def test_sar_recovered_after_every_batch_is_bn_adapt(toy):
    # a threshold above any loss ratio restores the initial weights after every batch
    sar = SAR({"reset": 1e9, "epochs": 2})
    recovered = predict(sar, toy)
    assert torch.equal(recovered, predict(builtin("bn-adapt"), toy))
    assert sar.recoveries == sar.updates == 2 * 4  # 16 images in batches of 4, two passes
    assert not torch.equal(predict(SAR({"reset": 0.0}), toy), predict(builtin("bn-adapt"), toy))


def test_recovery_average_by_hand():
    recovery = Recovery(threshold=0.5)
    assert not recovery.collapsed(2.0, 2.0)  # ratio 1: the average starts there
    assert not recovery.collapsed(0.1, 1.0)  # 0.9 * 1 + 0.1 * 0.1 = 0.91
    assert recovery.ema == pytest.approx(0.91)
    assert not recovery.collapsed(5.0, None)  # no source level: the batch is left out
    assert recovery.ema == pytest.approx(0.91)
    fresh = Recovery(threshold=0.5)
    assert fresh.collapsed(0.4, 1.0) and fresh.ema is None  # 0.4 < 0.5: reset, restart


def test_source_level_is_the_source_models_filtered_entropy():
    # pixels z = 0, 5, 3, 2 (as above): 0 and 2 are unreliable at E0 = 0.4 ln 2
    source = ShiftedLogits([0.0, 5.0, 3.0, 2.0], [0.0] * 4)
    level = source_level(source, torch.zeros(1, 1, 1, 4), 0.4)
    assert level == pytest.approx((entropy_of(sigmoid(5.0)) + entropy_of(sigmoid(3.0))) / 2)
    assert source_level(source, torch.zeros(1, 1, 1, 4), 1e-12) is None  # nothing reliable


def test_sar_steps_nowhere_without_a_reliable_pixel(toy):
    assert torch.equal(predict(SAR({"margin": 1e-12}), toy), predict(builtin("bn-adapt"), toy))


@pytest.mark.parametrize(
    ("setting", "value"),
    [("optimizer", "rmsprop"), ("rho", -0.1), ("margin", 0.0), ("reset", -1.0), ("epochs", -1)],
)
def test_sar_settings_are_validated(setting, value):
    model = toy_builder(toy_data())()
    with pytest.raises(FedbenchError, match=f"adapter.{setting}"):
        SAR({setting: value}).check(REGISTRY.get("methods", "fedavg"), model, toy_data().task)


# --- MEMO --------------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [{"steps": 0}, {"lr": 0.0}], ids=["steps0", "lr0"])
def test_memo_without_a_step_or_bn_prior_is_none(toy, params):
    memo = predict(MEMO({**params, "prior_strength": -1.0}), toy)
    assert torch.equal(memo, predict(builtin("none"), toy, batch_size=1))  # one image a pass
    assert torch.allclose(memo, predict(builtin("none"), toy), atol=1e-5)  # batches of four


def test_memo_steps_change_the_prediction(toy):
    memo = MEMO({"lr": 0.1, "prior_strength": -1.0})
    assert not torch.equal(predict(memo, toy), predict(builtin("none"), toy, 1))


def test_marginal_entropy_by_hand():
    # one pixel, two copies: softmax (0.9, 0.1) and (0.5, 0.5); marginal (0.7, 0.3)
    logits = torch.tensor([[0.9, 0.1], [0.5, 0.5]], dtype=torch.float64).log().view(2, 2, 1, 1)
    assert marginal_entropy(logits).item() == pytest.approx(entropy_of(0.7), rel=1e-12)
    # two pixels: the mean over pixels of each pixel's marginal entropy
    two = torch.cat([logits, logits.flip(1)], dim=3)  # second pixel: (0.1, 0.9) and (0.5, 0.5)
    assert marginal_entropy(two).item() == pytest.approx(entropy_of(0.7), rel=1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (2, 3, 4, 6)], ids=["square", "oblong"])
def test_inverse_maps_every_view_back_exactly(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    views = dihedral_views(8, square=shape[2] == shape[3])
    images = {tuple(transform(x, v).flatten().tolist()) for v in views}
    assert len(images) == (8 if shape[2] == shape[3] else 4)  # distinct elements of D4
    pointwise = torch.nn.Conv2d(3, 2, 1)  # a per-pixel model: mapping its outputs back works
    for view in views:
        assert torch.equal(invert(transform(x, view), view), x)
        with torch.no_grad():
            assert torch.equal(invert(pointwise(transform(x, view)), view), pointwise(x))


def test_views_are_mapped_back_before_averaging():
    # a per-pixel model sees each copy as the image moved; mapped back, all B copies agree, so
    # the marginal entropy is the entropy of the model's prediction on the image itself
    image = torch.randn(1, 5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    pointwise = torch.nn.Conv2d(1, 2, 1).double()
    views = dihedral_views(8, square=True)
    copies = augment(image, views, 0.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        direct = marginal_entropy(pointwise(image.unsqueeze(0)))
        assert views_loss(pointwise, copies, views).item() == pytest.approx(direct.item())


def test_augment_without_intensity_is_the_views():
    image = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(1))
    views = dihedral_views(3, square=True)
    copies = augment(image, views, 0.0, torch.Generator().manual_seed(0))
    assert all(torch.equal(copies[i], transform(image, v)) for i, v in enumerate(views))
    jittered = augment(image, views, 0.1, torch.Generator().manual_seed(0))
    assert not torch.equal(jittered, copies)


def test_memo_step_by_hand():
    # a per-pixel two-class model, logits (w0 x + c0, w1 x + c1). Mapped back, copy i at a pixel
    # sees x (1 + a_i) + b_i s (gain a_i, offset b_i, s the image's std), so with d_i = (w1 -
    # w0) x_i + c1 - c0 and q_i = sigmoid(d_i) the marginal is m = mean_i q_i and, per pixel,
    # dH(m)/d(w1 - w0) = log((1 - m) / m) mean_i q_i (1 - q_i) x_i (and without x_i for c1 -
    # c0); the loss is the mean over pixels. w1 gets -lr g, w0 gets +lr g.
    views, lr, intensity = 8, 0.5, 0.3
    image = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    model = torch.nn.Conv2d(1, 2, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([0.3, -0.8], dtype=torch.float64).view(2, 1, 1, 1))
        model.bias.copy_(torch.tensor([0.1, 0.4], dtype=torch.float64))
    draws = (torch.rand(views, 2, generator=torch.Generator().manual_seed(9)) * 2 - 1) * intensity
    gain, offset = draws[:, 0].double().view(-1, 1, 1), draws[:, 1].double().view(-1, 1, 1)
    x = image[0] * (1 + gain) + offset * image.std()  # [B, H, W], each copy mapped back
    q = torch.sigmoid((-0.8 - 0.3) * x + (0.4 - 0.1))
    m = q.mean(0)
    slope = ((1 - m) / m).log()
    g_w = (slope * (q * (1 - q) * x).mean(0)).mean().item()
    g_c = (slope * (q * (1 - q)).mean(0)).mean().item()
    memo = MEMO({"lr": lr, "augmentations": views, "intensity": intensity, "prior_strength": -1})
    out = memo.adapt_and_predict(model, image, torch.Generator().manual_seed(9))
    expected_w = [0.3 + lr * g_w, -0.8 - lr * g_w]
    expected_c = [0.1 + lr * g_c, 0.4 - lr * g_c]
    assert abs(g_w) > 1e-3 and abs(g_c) > 1e-3  # the step moves the weights
    assert model.weight.flatten().tolist() == pytest.approx(expected_w, rel=1e-9)
    assert model.bias.tolist() == pytest.approx(expected_c, rel=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(out, model(image.unsqueeze(0)).float())


def test_single_point_batch_norm_by_hand():
    # N = 16: statistics 16/17 running + 1/17 the input's own (unbiased variance)
    bn = torch.nn.BatchNorm2d(2).double().eval()
    bn.running_mean.copy_(torch.tensor([1.0, -1.0]))
    bn.running_var.copy_(torch.tensor([4.0, 0.25]))
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, 1.0]))
    x = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    running = bn(x)
    mean = (16 * bn.running_mean + x.mean((0, 2, 3))) / 17
    var = (16 * bn.running_var + x.var((0, 2, 3))) / 17
    scale = (bn.weight / (var + bn.eps).sqrt()).view(1, 2, 1, 1)
    expected = (x - mean.view(1, 2, 1, 1)) * scale + bn.bias.view(1, 2, 1, 1)
    model = torch.nn.Sequential(bn)
    assert torch.equal(use_prior_statistics(model, -1.0)(x), running)  # < 0: running only
    assert torch.equal(use_prior_statistics(model, math.inf)(x), running)  # and inf
    torch.testing.assert_close(use_prior_statistics(model, 16.0)(x), expected)
    assert bn.running_mean.tolist() == [1.0, -1.0]  # the running statistics are not updated


def test_memo_resets_between_images(toy):
    data, federation, images = toy
    same = UnlabeledImages(images.inputs[:1].repeat(3, 1, 1, 1))
    memo = MEMO({"lr": 0.1, "intensity": 0.0})
    outputs = memo.predict(federation, same, AdaptContext(4, 0, data.task))
    assert torch.equal(outputs[1], outputs[0]) and torch.equal(outputs[2], outputs[0])


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("steps", -1),
        ("augmentations", 0),
        ("lr", -1.0),
        ("intensity", -1.0),
        ("prior_strength", math.nan),
    ],
)
def test_memo_settings_are_validated(setting, value):
    model = toy_builder(toy_data())()
    with pytest.raises(FedbenchError, match=f"adapter.{setting}"):
        MEMO({setting: value}).check(REGISTRY.get("methods", "fedavg"), model, toy_data().task)


# --- both --------------------------------------------------------------------------------------


class TabularTask(Task):
    """A task without dense predictions."""

    dense_prediction = False


@pytest.mark.parametrize("adapter", [SAR, MEMO], ids=["sar", "memo"])
def test_outputs_ignore_labels_and_leave_the_federation(toy, adapter):
    data, federation, _ = toy
    before = {k: v.clone() for k, v in federation.global_state.items()}
    first = predict(adapter({}), toy)
    site = data.sites[0]
    for split in (site.train, site.val, site.test):
        split.targets.copy_(1 - split.targets)
    assert torch.equal(predict(adapter({}), toy), first)
    assert all(torch.equal(v, before[k]) for k, v in federation.global_state.items())
    with pytest.raises(FedbenchError, match="segmentation tasks only"):
        adapter({}).check(REGISTRY.get("methods", "fedavg"), toy_builder(data)(), TabularTask())


def test_sar_needs_normalization_and_memo_does_not():
    bare = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3))
    fedavg = REGISTRY.get("methods", "fedavg")
    with pytest.raises(FedbenchError, match="needs normalization layers"):
        SAR({}).check(fedavg, bare, toy_data().task)
    MEMO({}).check(fedavg, bare, toy_data().task)
