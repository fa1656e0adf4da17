"""CoTTA (Wang et al., CVPR 2022) against its definition: one step with no restore, no teacher
lag and no augmentation is a self-training step computed by hand; restore_prob 1 puts the
student back on the source after every step; lr 0 is the `none` adapter; the EMA, the
restore, the confidence rule and the flip-undoing augmentation average by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import predict, toy_builder, toy_data
from torch import nn

from fedbench.adapter import AdaptContext, TrainedFederation
from fedbench.engine.registry import load_registry
from fedbench.errors import FedbenchError
from fedbench.tuning import space_problems
from fedbench_plugins.cotta import (
    CoTTA,
    Models,
    augment,
    averaged_prediction,
    confidence,
    ema_update,
    soft_cross_entropy,
    stochastic_restore,
)

CPU = torch.device("cpu")
REGISTRY = load_registry()
#: no teacher lag, no restore, never augmented (every confidence is above 0)
PLAIN = {"ema": 0.0, "restore_prob": 0.0, "threshold": 0.0}


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def pixel_model(weight: tuple[float, float], bias: tuple[float, float]) -> nn.Module:
    """Per pixel, logits (w0 x + b0, w1 x + b1) of a one-channel image."""
    conv = nn.Conv2d(1, 2, 1).double()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(weight, dtype=torch.float64).view(2, 1, 1, 1))
        conv.bias.copy_(torch.tensor(bias, dtype=torch.float64))
    return conv


# --- the limiting cases -------------------------------------------------------------------


def test_one_step_is_a_self_training_step_by_hand():
    # student logits (0.5 x + 0.1, -0.3 x + 0.2), teacher's (x, 0), pixels x = 1 and -2; the
    # loss is the mean over pixels of -sum_c q_c log p_c, so dL/dz_c = (p_c - q_c) / 2
    student = pixel_model((0.5, -0.3), (0.1, 0.2))
    teacher = pixel_model((1.0, 0.0), (0.0, 0.0))
    models = Models(student, teacher, copy.deepcopy(student).requires_grad_(False))
    batch = torch.tensor([[[[1.0, -2.0]]]], dtype=torch.float64)
    lr, cotta = 0.1, CoTTA(PLAIN)
    cotta.step(models, batch, torch.optim.SGD(student.parameters(), lr=lr), torch.Generator())
    grad_w, grad_b = [0.0, 0.0], [0.0, 0.0]
    for x in (1.0, -2.0):
        p1 = sigmoid((-0.3 * x + 0.2) - (0.5 * x + 0.1))  # student's class-1 probability
        q1 = sigmoid(0.0 - x)  # teacher's
        for c, diff in ((0, (1 - p1) - (1 - q1)), (1, p1 - q1)):
            grad_w[c] += diff * x / 2
            grad_b[c] += diff / 2
    expected_w = [0.5 - lr * grad_w[0], -0.3 - lr * grad_w[1]]
    expected_b = [0.1 - lr * grad_b[0], 0.2 - lr * grad_b[1]]
    assert student.weight.flatten().tolist() == pytest.approx(expected_w, rel=1e-12)
    assert student.bias.tolist() == pytest.approx(expected_b, rel=1e-12)
    # ema 0: the teacher is the student after the step; restore 0: nothing reset
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))
    assert cotta.augmented == 0


def test_restore_prob_one_puts_the_student_back_after_every_step(toy):
    data, federation, images = toy
    models = Models.of(federation.model(federation.global_state))
    source = [p.detach().clone() for p in models.student.parameters()]
    optimizer = torch.optim.Adam(models.student.parameters(), lr=1e-2)
    cotta, generator = CoTTA({"restore_prob": 1.0}), torch.Generator().manual_seed(0)
    for batch in images.batches(4):
        cotta.step(models, batch, optimizer, generator)
        assert all(torch.equal(p, s) for p, s in zip(models.student.parameters(), source))
    # the teacher took 0.1% of each stepped student before the restore: it moved
    moved = [not torch.equal(t, s) for t, s in zip(models.teacher.parameters(), source)]
    assert any(moved)


def test_restore_prob_one_in_a_whole_pass(toy):
    data, federation, images = toy
    built = []

    def build():
        built.append(toy_builder(data)())
        return built[-1]

    fed = TrainedFederation(build, federation.global_state, [], [], CPU)
    cotta = CoTTA({"restore_prob": 1.0, "epochs": 2})
    outputs = cotta.predict(fed, images, AdaptContext(4, 0, data.task))
    student = built[0].state_dict()
    assert all(torch.equal(student[k], v) for k, v in federation.global_state.items())
    # the predictions are the teacher's, which moved: not the (restored) student's
    assert not torch.equal(outputs, predict(REGISTRY.get("adapters", "none")({}), toy))


def test_lr_zero_is_none(toy):
    none = REGISTRY.get("adapters", "none")({})
    cotta = CoTTA({"lr": 0.0, "epochs": 2})
    assert torch.equal(predict(cotta, toy), predict(none, toy))
    assert cotta.augmented == 2 * 16  # the toy model is unsure everywhere: copies were used


def test_it_changes_the_prediction(toy):
    none = REGISTRY.get("adapters", "none")({})
    assert not torch.allclose(predict(CoTTA({}), toy), predict(none, toy))


# --- the ingredients by hand --------------------------------------------------------------


def test_soft_cross_entropy_by_hand():
    # two pixels of two classes: logits (0, 1) and (2, 0), targets (0.25, 0.75) and (1, 0)
    logits = torch.tensor([[[[0.0, 2.0]], [[1.0, 0.0]]]], dtype=torch.float64)
    target = torch.tensor([[[[0.25, 1.0]], [[0.75, 0.0]]]], dtype=torch.float64)
    first = -(0.25 * math.log(sigmoid(-1.0)) + 0.75 * math.log(sigmoid(1.0)))
    second = -math.log(sigmoid(2.0))
    assert soft_cross_entropy(logits, target).item() == pytest.approx((first + second) / 2)


def test_confidence_by_hand():
    # image 0: pixels with class-0 logits 3 and -1 (class 1 at 0); image 1: both at 0
    logits = torch.tensor([[[[3.0, -1.0]], [[0.0, 0.0]]], [[[0.0, 0.0]], [[0.0, 0.0]]]])
    expected = [(sigmoid(3.0) + sigmoid(1.0)) / 2, 0.5]
    assert confidence(logits).tolist() == pytest.approx(expected, rel=1e-6)


def test_ema_by_hand():
    teacher, student = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    teacher.weight.data.fill_(1.0)
    student.weight.data.fill_(3.0)
    ema_update(teacher, student, keep=0.75)
    assert teacher.weight.item() == 1.5  # 0.75 * 1 + 0.25 * 3
    ema_update(teacher, student, keep=1.0)
    assert teacher.weight.item() == 1.5
    ema_update(teacher, student, keep=0.0)
    assert teacher.weight.item() == 3.0


def test_stochastic_restore_by_hand():
    params, source = [torch.zeros(10000), torch.zeros(3)], [torch.ones(10000), torch.ones(3)]
    stochastic_restore(params, source, 0.3, torch.Generator().manual_seed(5))
    draws = torch.Generator().manual_seed(5)
    for p in params:  # the same draws, in the same order: reset where u < 0.3
        assert torch.equal(p, (torch.rand(p.shape, generator=draws) < 0.3).float())
    assert 0.29 < params[0].mean().item() < 0.31  # sd 0.005
    stochastic_restore(params, source, 1.0, torch.Generator())
    assert all(torch.equal(p, s) for p, s in zip(params, source))


def test_the_augmentation_average_undoes_its_flips():
    # a per-pixel model commutes with flips: without intensity changes every copy, flipped
    # back, gives the image's own softmax map, which a flip left in place would change
    teacher = pixel_model((2.0, -1.0), (0.0, 0.5))
    batch = torch.tensor([[[[0.0, 1.0, 3.0], [2.0, -1.0, 0.5]]]], dtype=torch.float64)
    plain = teacher(batch).softmax(1)
    assert not torch.allclose(teacher(batch.flip(-1)).softmax(1), plain)
    draws = torch.Generator().manual_seed(0)
    flips = [augment(batch, True, 0.0, draws)[1] for _ in range(16)]
    assert any(flips) and not all(flips)  # the same draws as the average's below
    averaged = averaged_prediction(teacher, batch, 16, True, 0.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(averaged, plain)


def test_only_the_unsure_images_get_the_average():
    # anchor logits (4 x, 0): image 0 (x = 1) is sure, image 1 (x = 0.1, -0.1) at 0.6 is not
    anchor = pixel_model((4.0, 0.0), (0.0, 0.0))
    teacher = pixel_model((1.0, -1.0), (0.0, 0.0))
    models = Models(copy.deepcopy(teacher), teacher, anchor)
    batch = torch.tensor([[[[1.0, 1.0]]], [[[0.1, -0.1]]]], dtype=torch.float64)
    cotta = CoTTA({"threshold": 0.9, "intensity": 0.5})
    target = cotta.pseudo_label(models, batch, torch.Generator().manual_seed(0))
    plain = teacher(batch).softmax(1).detach()
    assert torch.equal(target[0], plain[0]) and cotta.augmented == 1
    assert not torch.allclose(target[1], plain[1])  # copies x (1 + a) + b std(x), std > 0
    assert torch.allclose(target.sum(1), torch.ones(2, 1, 2, dtype=torch.float64))


def test_the_threshold_decides_the_copies(toy):
    never, always = CoTTA({"threshold": 0.0}), CoTTA({"threshold": 1.01, "epochs": 2})
    predict(never, toy)
    predict(always, toy)
    assert never.augmented == 0 and always.augmented == 2 * 16


def test_the_search_space_is_valid():
    assert space_problems(CoTTA.search_space, "adapter", CoTTA.defaults) == []


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("epochs", -1),
        ("augmentations", 0),
        ("lr", -1.0),
        ("intensity", -0.1),
        ("ema", 1.5),
        ("restore_prob", -0.1),
        ("threshold", math.nan),
        ("flip", "no"),
    ],
)
def test_cotta_settings_are_validated(setting, value):
    model = toy_builder(toy_data())()
    with pytest.raises(FedbenchError, match=f"adapter.{setting}"):
        CoTTA({setting: value}).check(REGISTRY.get("methods", "fedavg"), model, toy_data().task)
