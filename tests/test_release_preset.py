"""`--preset paper` is the IOP-FL release's setup (issue 14, item 7): the release's plain U-Net
with BatchNorm (7,763,074 parameters, ../shared/reference/iopfl.md 1.3), its soft Dice over the
whole batch (1.4) and Adam with amsgrad (1.1); the quick and default presets are unchanged."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from conftest import SHARED, toy_config, toy_data, toy_train
from monai.losses import DiceCELoss, DiceLoss

from fedbench.engine.clients import optimizer_factory
from fedbench.engine.config import preset_config, validate
from fedbench.engine.registry import load_registry
from fedbench.engine.resolve import RunSpec, resolve
from fedbench.errors import FedbenchError
from fedbench.models import normalization_modules, output_layer
from fedbench.task import SegmentationTask
from fedbench_datasets.fundus import Fundus
from fedbench_datasets.prostate import Prostate
from fedbench_plugins.fedavg import FedAvg
from fedbench_plugins.release_unet import ReleaseUNetModel

CPU = torch.device("cpu")
SAMPLES = SHARED / "data" / "realdata" / "midss_multisite_samples"
BAD_LOSS = "setting data.loss must be one of dice_ce, soft_dice_batch, got 'focal'"


def release_net(in_channels: int = 3, classes: int = 2, features: int = 32) -> torch.nn.Module:
    task = SegmentationTask(in_channels=in_channels, class_names=["c"] * (classes - 1))
    return ReleaseUNetModel().build(task, {"features": features})


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def hand_count(c_in: int, classes: int, f: int) -> int:
    """The U-Net's parameters by hand: a level [conv3x3 a->b, BN, conv3x3 b->b, BN] has
    9ab + 9b^2 + 2 * 2b; a transposed 2x2 conv 2w->w with bias 8w^2 + w; the head fk + k."""

    def level(a: int, b: int) -> int:
        return 9 * a * b + 9 * b * b + 4 * b

    widths = [f, 2 * f, 4 * f, 8 * f]
    encoder = sum(level(a, b) for a, b in zip([c_in, *widths[:-1]], widths))
    decoder = sum(8 * w * w + w + level(2 * w, w) for w in widths)
    return encoder + level(8 * f, 16 * f) + decoder + f * classes + classes


# The network


def test_release_unet_has_the_release_parameter_count():
    # the reference's 7,763,074 for the main path; the unused head (3,076) is left out
    assert count(release_net()) == 7_763_074 == hand_count(3, 2, 32)
    assert count(release_net(1, 3, 8)) == hand_count(1, 3, 8)


def test_release_unet_maps_images_to_class_logits_of_the_same_size():
    model = release_net(1, 3, 4)
    x = torch.randn(2, 1, 32, 48)
    assert model(x).shape == (2, 3, 32, 48)
    name, head = output_layer(model)
    assert name == "head" and head.kernel_size == (1, 1) and head.out_channels == 3


def test_release_unet_uses_batchnorm_and_bias_free_3x3_convs():
    model = release_net(3, 2, 4)
    norms = normalization_modules(model)
    assert len(norms) == 18  # two per level: 4 down, the bottleneck, 4 up
    assert all(type(m) is torch.nn.BatchNorm2d for _, m in norms)
    convs = [m for m in model.modules() if type(m) is torch.nn.Conv2d]
    assert all(m.bias is None for m in convs if m.kernel_size == (3, 3))
    ups = [m for m in model.modules() if type(m) is torch.nn.ConvTranspose2d]
    assert [m.out_channels for m in ups] == [32, 16, 8, 4] and all(m.bias is not None for m in ups)


def test_release_unet_pickles_and_refuses_bad_widths():
    model = release_net(1, 2, 2).eval()
    x = torch.randn(1, 1, 16, 16)
    torch.testing.assert_close(pickle.loads(pickle.dumps(model))(x), model(x))
    for bad in (0, -3, True, 2.5):
        with pytest.raises(FedbenchError, match="setting model.features must be a positive"):
            ReleaseUNetModel.check({"features": bad})


# The loss

# Two 1x2 images, 2 classes; the class-1 logit d over a class-0 logit 0 gives p1 = 1/(1+e^-d).
LOGITS_D = torch.tensor([[math.log(3), -math.log(3)], [0.0, math.log(3)]], dtype=torch.float64)
LABELS = torch.tensor([[[1, 0]], [[0, 0]]])  # [N, H, W]: one prostate pixel in the batch
EPS = 1e-5


def logits() -> torch.Tensor:
    d = LOGITS_D.view(2, 1, 1, 2)
    return torch.cat([torch.zeros_like(d), d], dim=1)  # [N, C, H, W]


def soft_dice(pairs: list[tuple[float, float, float]]) -> float:
    """1 - mean over classes of (2 sum py + eps) / (sum p + sum y + eps)."""
    return 1 - sum((2 * py + EPS) / (p + y + EPS) for py, p, y in pairs) / len(pairs)


def test_soft_dice_batch_is_the_release_formula_by_hand():
    # p1 = .75, .25 | .5, .75; over the batch: class 1 sum p 2.25, sum y 1, sum py .75;
    # class 0 (background, included) sum p 1.75, sum y 3, sum py .25*0 + .75 + .5 + .25 = 1.5
    expected = soft_dice([(1.5, 1.75, 3.0), (0.75, 2.25, 1.0)])
    loss = SegmentationTask(in_channels=1, loss_name="soft_dice_batch").loss(logits(), LABELS)
    assert loss.item() == pytest.approx(expected, rel=0, abs=1e-12)


def test_soft_dice_over_the_batch_is_not_per_sample_dice():
    task = SegmentationTask(in_channels=1, loss_name="soft_dice_batch")
    per_sample = DiceLoss(to_onehot_y=True, softmax=True, smooth_nr=EPS, smooth_dr=EPS)
    out, labels = logits(), LABELS.unsqueeze(1)
    # sample 1 has no prostate: per sample its class-1 Dice is about 0, over the batch it is not
    by_hand = soft_dice([(0.75, 1, 1), (0.75, 1, 1)]) + soft_dice([(0.75, 0.75, 2), (0, 1.25, 0)])
    assert per_sample(out, labels).item() == pytest.approx(by_hand / 2, abs=1e-12)
    assert abs(task.loss(out, LABELS).item() - by_hand / 2) > 0.03  # 0.4534 against 0.4886
    # one image: the batch is the sample, and the two agree
    one = task.loss(out[:1], LABELS[:1])
    assert one.item() == pytest.approx(per_sample(out[:1], labels[:1]).item(), abs=1e-12)


def test_the_default_loss_is_still_monai_dice_ce():
    task = SegmentationTask(in_channels=1)
    monai = DiceCELoss(to_onehot_y=True, softmax=True)
    assert task.loss_name == "dice_ce"
    assert torch.equal(task.loss(logits(), LABELS), monai(logits(), LABELS.unsqueeze(1)))


def test_an_unknown_loss_is_one_error_naming_data_loss():
    with pytest.raises(FedbenchError) as error:
        SegmentationTask(in_channels=1, loss_name="focal")
    assert str(error.value) == BAD_LOSS
    with pytest.raises(FedbenchError) as error:
        resolve(RunSpec("fedavg", overrides=["data.loss=focal"]), load_registry())
    assert str(error.value) == BAD_LOSS


# amsgrad


def test_amsgrad_is_a_checked_setting_of_adam():
    param = torch.nn.Parameter(torch.zeros(2))
    train = preset_config("default")["train"]
    assert optimizer_factory(train)([param]).param_groups[0]["amsgrad"] is False
    adam = optimizer_factory({**train, "amsgrad": True})([param])
    assert type(adam) is torch.optim.Adam and adam.param_groups[0]["amsgrad"] is True
    config = preset_config("default")
    config["train"]["amsgrad"] = 1
    with pytest.raises(FedbenchError, match="^setting train.amsgrad must be true or false, got 1$"):
        validate(config)
    with pytest.raises(FedbenchError, match="setting train.amsgrad expects true or false"):
        resolve(RunSpec("fedavg", overrides=["train.amsgrad=maybe"]), load_registry())


class OptimizerSpy(FedAvg):
    """Records whether each local update's optimizer uses amsgrad."""

    seen: list[bool] = []

    def local_update(self, model, ctx):
        optimizer = ctx.make_optimizer(model.parameters())
        OptimizerSpy.seen.append(optimizer.param_groups[0]["amsgrad"])
        return super().local_update(model, ctx)


def test_local_training_uses_the_amsgrad_setting():
    data = toy_data()
    for amsgrad in (True, False):
        config = toy_config(1)
        config["train"]["amsgrad"] = amsgrad
        OptimizerSpy.seen = []
        toy_train(data, data.sites, OptimizerSpy, config, 0, CPU)
        assert OptimizerSpy.seen == [amsgrad] * len(data.sites)


# The presets


def resolved(dataset: str, preset: str, *overrides: str) -> dict:
    spec = RunSpec("iopfl", dataset=dataset, preset=preset, overrides=list(overrides))
    return resolve(spec, load_registry()).config


@pytest.mark.parametrize("dataset", ["synth-prostate", "prostate", "fundus"])
def test_paper_is_the_release_setup(dataset):
    config = resolved(dataset, "paper")
    assert config["model"] == {"name": "release-unet", "features": 32}
    assert config["data"]["loss"] == "soft_dice_batch" and config["data"]["size"] == 384
    train = config["train"]
    assert (train["optimizer"], train["lr"], train["amsgrad"]) == ("adam", 1e-3, True)
    assert (train["batch_size"], train["local_epochs"], train["rounds"]) == (5, 1, 100)


@pytest.mark.parametrize("preset", ["quick", "default"])
def test_quick_and_default_are_unchanged(preset):
    config = resolved("synth-prostate", preset)
    assert config["model"]["name"] == "unet"
    assert config["data"]["loss"] == "dice_ce" and config["train"]["amsgrad"] is False


def test_paper_model_can_still_be_overridden():
    config = resolved("synth-prostate", "paper", "model.name=unet")
    assert config["model"] == {"name": "unet", "channels": [32, 64, 128, 256, 512], "res_units": 1}
    assert config["data"]["loss"] == "soft_dice_batch"  # the rest of the release stays
    assert resolved("synth-prostate", "paper", "data.loss=dice_ce")["data"]["loss"] == "dice_ce"


def test_paper_leaves_flamby_datasets_their_own_setup():
    config = resolved("fed-tcga-brca", "paper")
    assert config["model"]["name"] == "dataset-baseline"
    assert config["train"]["amsgrad"] is False and "loss" not in config["data"]


def test_the_paper_run_builds_the_release_network_and_loss(tmp_path):
    small = ["data.size=32", "data.cases_per_site=4", "data.num_sites=2"]
    run = resolve(RunSpec("fedavg", preset="paper", overrides=small), load_registry())
    data = run.dataset.load(run.config["data"], 0, tmp_path)
    assert data.task.loss_name == "soft_dice_batch"
    assert count(run.build_model(data.task)) == hand_count(1, 2, 32)


@pytest.mark.parametrize(
    ("dataset", "folder", "site"),
    [(Prostate, "ProstateSlice", "RUNMC"), (Fundus, "Fundus", "Domain1")],
)
def test_real_datasets_pass_their_loss_to_the_task(dataset, folder, site, tmp_path):
    if not (SAMPLES / folder).is_dir():
        pytest.skip(f"../shared's {folder} samples are not present")
    cfg = {**dataset.defaults, "path": str(SAMPLES / folder), "size": 32, "sites": [site]}
    data = dataset().load({**cfg, "loss": "soft_dice_batch"}, 0, tmp_path)
    assert data.task.loss_name == "soft_dice_batch"
    assert dataset().load(cfg, 0, tmp_path).task.loss_name == "dice_ce"


def test_routing_over_the_release_unet_freezes_exactly_the_bottleneck_routers():
    from fedbench_plugins.routed_conv import RoutedConv, build_routed_model

    torch.manual_seed(0)
    experts = [release_net(1, 2, 2) for _ in range(3)]
    routed = build_routed_model(experts[0], experts[1:], frozen_bottleneck=True)
    layers = {n: m for n, m in routed.named_modules() if isinstance(m, RoutedConv)}
    assert len(layers) == 2 * 9 + 4 + 1  # every 3x3 conv, transposed conv and the head
    frozen = {n for n, m in layers.items() if not m.router[0].weight.requires_grad}
    assert frozen == {"bottom.0", "bottom.3"}
    assert routed(torch.randn(2, 1, 16, 16)).shape == (2, 2, 16, 16)
