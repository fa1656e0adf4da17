"""VPTTA (Chen et al., CVPR 2024) against its definition: a zero prompt leaves the image as it is
and no pass is the `none` adapter; the prompt scales only the low-frequency square's amplitude,
by hand on tiny images; the BatchNorm alignment loss, the warm-up, the memory bank's retrieval
and one whole step by hand; the model never moves."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from conftest import predict, toy_builder, toy_data
from torch import nn

from fedbench.adapter import AdaptContext, TrainedFederation
from fedbench.data import UnlabeledImages
from fedbench.engine.registry import load_registry
from fedbench.errors import FedbenchError
from fedbench.task import SegmentationTask
from fedbench.tuning import space_problems
from fedbench_plugins.vptta import (
    VPTTA,
    Alignment,
    PromptBank,
    Stream,
    apply_prompt,
    low_frequency_key,
    prompt_side,
    use_alignment,
    warm_moment,
)

CPU = torch.device("cpu")
REGISTRY = load_registry()


def none_of(toy) -> torch.Tensor:
    return predict(REGISTRY.get("adapters", "none")({}), toy, batch_size=1)


# --- the prompt ---------------------------------------------------------------------------


def test_a_zero_prompt_leaves_the_image_unchanged():
    images = torch.randn(2, 3, 8, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(apply_prompt(images, torch.zeros(3, 3, 3)), images)


def test_no_pass_and_no_step_are_none(toy):
    assert torch.equal(predict(VPTTA({"epochs": 0}), toy), none_of(toy))
    frozen = VPTTA({"lr": 0.0, "warm_n": 0.0, "epochs": 2, "neighbours": 2, "bank_size": 4})
    assert torch.equal(predict(frozen, toy), none_of(toy))  # the prompt stays zero
    assert frozen.adapted == 2 * 16


@pytest.mark.parametrize("size", [8, 7])
def test_the_prompt_scales_only_the_low_frequency_square(size):
    # the zero frequency sits at (size // 2, size // 2) after fftshift: the 3 x 3 square around
    # it has its amplitude times 1 + P, its phase kept; every other frequency is untouched
    image = torch.randn(1, 1, size, size, dtype=torch.float64)
    prompt = torch.tensor([[[0.1, 0.2, 0.3], [0.4, -0.5, 0.4], [0.3, 0.2, 0.1]]])  # P(-k) = P(k)
    before = torch.fft.fftshift(torch.fft.fft2(image), dim=(-2, -1))[0, 0]
    after = torch.fft.fftshift(torch.fft.fft2(apply_prompt(image, prompt)), dim=(-2, -1))[0, 0]
    c = size // 2
    inside = torch.zeros(size, size, dtype=torch.bool)
    inside[c - 1 : c + 2, c - 1 : c + 2] = True
    torch.testing.assert_close(after[~inside], before[~inside])
    factor = 1 + prompt[0].double()
    torch.testing.assert_close(
        after.abs()[inside].view(3, 3), before.abs()[inside].view(3, 3) * factor
    )
    torch.testing.assert_close(after.angle()[inside], before.angle()[inside])
    # an asymmetric prompt acts through its mean with its mirror image, still only inside
    lopsided = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, 0.6], [0.0, 0.0, 0.0]]])
    after = torch.fft.fftshift(torch.fft.fft2(apply_prompt(image, lopsided)), dim=(-2, -1))[0, 0]
    torch.testing.assert_close(after[~inside], before[~inside])
    for column, gain in ((c - 1, 1.3), (c, 1.0), (c + 1, 1.3)):
        torch.testing.assert_close(after[c, column], before[c, column] * gain)


def test_a_one_pixel_prompt_shifts_the_image_by_its_mean():
    # s = 1: only the zero frequency, i.e. the mean: x' = x + P * mean(x), per channel
    image = torch.randn(1, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    prompt = torch.tensor([[[0.3]], [[-2.0]]], dtype=torch.float64)
    means = image.mean((-2, -1), keepdim=True)
    expected = image + prompt.view(1, 2, 1, 1) * means
    torch.testing.assert_close(apply_prompt(image, prompt), expected)


def test_the_key_is_the_low_frequency_amplitude():
    image = torch.tensor([[[1.0, -3.0], [0.5, 0.0]], [[2.0, 2.0], [2.0, 2.0]]])
    assert low_frequency_key(image, 1).tolist() == [1.5, 8.0]  # |sum| per channel
    flat = torch.zeros(1, 8, 8)
    flat[0, 0, 0] = 1.0  # an impulse: amplitude 1 at every frequency
    assert low_frequency_key(flat, 3).tolist() == [1.0] * 9


@pytest.mark.parametrize(
    ("size", "ratio", "side"),
    [(512, 0.01, 5), (384, 0.01, 3), (64, 0.01, 1), (256, 0.01, 1), (400, 0.02, 7)],
)
def test_prompt_side(size, ratio, side):
    assert prompt_side(size, size + 10, ratio) == side  # odd, from the shorter side


# --- the alignment loss and the warm-up ---------------------------------------------------


def one_norm() -> nn.Module:
    """One BatchNorm layer of two channels with set running statistics and affine weights."""
    norm = nn.BatchNorm2d(2)
    with torch.no_grad():
        norm.running_mean.copy_(torch.tensor([0.5, -1.0]))
        norm.running_var.copy_(torch.tensor([4.0, 1.0]))
        norm.weight.copy_(torch.tensor([1.5, 1.0]))
        norm.bias.copy_(torch.tensor([-0.25, 0.0]))
    return nn.Sequential(norm).eval()


#: channel 0 holds 1, 2, 3, 4 (mean 2.5, unbiased std sqrt(5/3)); channel 1 0, 0, 0, 2 (0.5, 1)
PIXELS = ([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 2.0])


@pytest.mark.parametrize("moment", [0.0, 0.25])
def test_the_alignment_loss_and_normalisation_by_hand(moment):
    model, alignment = one_norm(), Alignment(moment=moment, recording=True)
    use_alignment(model, alignment)
    x = torch.tensor(PIXELS).view(1, 2, 2, 2)
    out = model(x)
    loss, running = 0.0, ((0.5, 4.0), (-1.0, 1.0))
    for c, (pixels, (mean, var)) in enumerate(zip(PIXELS, running)):
        mu, sd = statistics.mean(pixels), statistics.stdev(pixels)
        mean = moment * mu + (1 - moment) * mean  # the warm-up's mix (one image: its own)
        var = moment * sd**2 + (1 - moment) * var
        loss += (abs(mu - mean) + abs(sd - math.sqrt(var))) / 2  # mean over channels
        w, b = (1.5, 1.0)[c], (-0.25, 0.0)[c]
        expected = [(v - mean) / math.sqrt(var + 1e-5) * w + b for v in pixels]
        assert out[0, c].flatten().tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    (term,) = alignment.terms
    assert term.item() == pytest.approx(loss, rel=1e-5)
    if moment == 0:
        assert loss == pytest.approx(2.0 / 2 + 1.5 / 2 + (2 - math.sqrt(5 / 3)) / 2, rel=1e-12)


def test_every_running_norm_records_a_term_and_only_while_recording():
    model, alignment = nn.Sequential(one_norm(), nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)), Alignment()
    use_alignment(model.eval(), alignment)
    model(torch.randn(1, 2, 3, 3))
    assert alignment.terms == []
    alignment.recording = True
    model(torch.randn(1, 2, 3, 3))
    assert len(alignment.terms) == 2


def test_warm_up_by_hand():
    assert warm_moment(1, 5.0) == pytest.approx(1 / 1.2)
    assert warm_moment(100, 5.0) == pytest.approx(1 / 3)  # sqrt(100) / 5 + 1 = 3
    assert warm_moment(7, 0.0) == 0.0


# --- the memory bank ----------------------------------------------------------------------


def test_the_bank_recalls_the_nearest_prompts_by_hand():
    bank = PromptBank(size=3, neighbours=2)
    for key, value in (((1.0, 0.0), 1.0), ((0.0, 1.0), 2.0)):
        bank.store(torch.tensor(key), torch.tensor([[[value]]]))
    assert bank.ready()
    bank.store(torch.tensor((1.0, 1.0)), torch.tensor([[[4.0]]]))
    # query (1, 0.2): cosines 0.981, 0.196, 0.832; the two nearest are keys 1 and 3
    query = torch.tensor((1.0, 0.2))
    cos1, cos3 = 1 / math.sqrt(1.04), 1.2 / (math.sqrt(2) * math.sqrt(1.04))
    w1 = 1 / (1 + math.exp((cos3 - cos1) / 0.2))  # softmax(cosine / 0.2) over the two
    assert bank.recall(query).item() == pytest.approx(w1 * 1.0 + (1 - w1) * 4.0, rel=1e-6)
    bank.store(torch.tensor((0.0, -1.0)), torch.tensor([[[8.0]]]))  # the first one leaves
    assert [p.item() for p in bank.prompts] == [2.0, 4.0, 8.0]


def test_the_bank_needs_k_entries():
    bank = PromptBank(size=4, neighbours=2)
    bank.store(torch.ones(2), torch.zeros(1, 1, 1))
    assert not bank.ready()
    bank.store(torch.ones(2), torch.zeros(1, 1, 1))
    assert bank.ready()


def test_the_prompt_starts_from_the_bank():
    # lr 0: the image is predicted with the recalled prompt itself
    model = one_norm()
    adapter = VPTTA({"lr": 0.0, "warm_n": 0.0})
    prompt = torch.zeros(2, 1, 1, requires_grad=True)
    bank = PromptBank(size=2, neighbours=1)
    bank.store(torch.tensor([1.0, 0.0]), torch.tensor([[[0.5]], [[-1.0]]]))
    bank.store(torch.tensor([0.0, 1.0]), torch.tensor([[[3.0]], [[3.0]]]))
    stream = Stream(model, prompt, torch.optim.Adam([prompt], lr=0.0), bank, Alignment())
    use_alignment(model, stream.alignment)
    image = torch.tensor(PIXELS).view(2, 2, 2)  # key (|10|, |2|): nearest to (1, 0)
    out = adapter.adapt_and_predict(stream, image)
    recalled = torch.tensor([[[0.5]], [[-1.0]]])
    assert torch.equal(prompt.detach(), recalled)
    with torch.no_grad():
        torch.testing.assert_close(out, model(apply_prompt(image.unsqueeze(0), recalled)))
    assert len(bank.keys) == 2 and torch.equal(bank.prompts[-1], recalled)


# --- one whole step -----------------------------------------------------------------------


class OneChannelNorm(nn.Module):
    """One BatchNorm layer of one channel, running mean 0.5 and variance 2."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(1)
        with torch.no_grad():
            self.norm.running_mean.fill_(0.5)
            self.norm.running_var.fill_(2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


def test_one_step_by_hand():
    # one image, a 1 x 1 prompt v: x' = x + v mean(x), so mean(x') = (1 + v) mean(x) and the
    # std is unchanged; the loss |mean(x') - 0.5| + |std - sqrt 2| has slope mean(x) = 2 at
    # v = 0; Adam's first step is lr * g / (|g| + eps): v = -lr
    built = OneChannelNorm()
    federation = TrainedFederation(OneChannelNorm, built.state_dict(), [], [], CPU)
    image = torch.tensor([[[1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [3.0, 1.0, 2.0]]])  # mean 2
    ctx = AdaptContext(1, 0, SegmentationTask(in_channels=1))
    lr = 0.1
    adapter = VPTTA({"lr": lr, "warm_n": 0.0})
    out = adapter.predict(federation, UnlabeledImages(image.unsqueeze(0)), ctx)
    v = -lr * 2 / (2 + 1e-8)
    expected = (image + v * 2.0 - 0.5) / math.sqrt(2.0 + 1e-5)
    torch.testing.assert_close(out[0], expected)
    assert adapter.adapted == 1


def test_the_model_never_moves(toy):
    data, federation, images = toy
    built = []

    def build():
        built.append(toy_builder(data)())
        return built[-1]

    fed = TrainedFederation(build, federation.global_state, [], [], CPU)
    VPTTA({"epochs": 2, "ratio": 0.2}).predict(fed, images, AdaptContext(4, 0, data.task))
    after = built[0].state_dict()
    assert all(torch.equal(after[k], v) for k, v in federation.global_state.items())
    assert all(p.grad is None for p in built[0].parameters())


def test_it_changes_the_prediction(toy):
    assert not torch.allclose(predict(VPTTA({}), toy), none_of(toy))
    assert not torch.allclose(predict(VPTTA({"warm_n": 0.0, "ratio": 0.2}), toy), none_of(toy))


def test_the_search_space_is_valid():
    assert space_problems(VPTTA.search_space, "adapter", VPTTA.defaults) == []


def test_a_model_without_running_statistics_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2))
    with pytest.raises(FedbenchError, match="running statistics"):
        VPTTA({}).check(REGISTRY.get("methods", "fedavg"), model, SegmentationTask(in_channels=1))


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("epochs", -1),
        ("bank_size", 0),
        ("neighbours", 0),
        ("neighbours", 41),
        ("lr", -1.0),
        ("warm_n", -1.0),
        ("ratio", 0.0),
        ("ratio", 1.5),
    ],
)
def test_vptta_settings_are_validated(setting, value):
    model = toy_builder(toy_data())()
    with pytest.raises(FedbenchError, match=f"adapter.{setting}"):
        VPTTA({setting: value}).check(REGISTRY.get("methods", "fedavg"), model, toy_data().task)


def test_volumes_are_refused_in_one_line():
    from fedbench.errors import FedbenchError as Refusal
    from fedbench.volumes import VolumeSegmentationTask
    from fedbench_plugins.fedavg import FedAvg
    from fedbench_plugins.unet3d import UNet3D
    from fedbench_plugins.vptta import VPTTA

    task = VolumeSegmentationTask(in_channels=1, patch=(8, 8, 8))
    model = UNet3D().build(task, UNet3D.defaults)
    with pytest.raises(Refusal, match="adapter 'vptta' prompts a 2D image's amplitude spectrum"):
        VPTTA({**VPTTA.defaults}).check(FedAvg, model, task)
