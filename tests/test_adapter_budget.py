"""One test-time budget for every adapter: `adapter.epochs` means the same passes with the same
default per preset, every adapter streams the same batches (a trailing single image joins the
previous batch), and each of the release's routing quirks is its own flag."""

from __future__ import annotations

import pytest
import torch
from test_iopfl_routing import K, context, federation, routed_convs, small_unet

import fedbench_plugins.iopfl_routing as ir
import fedbench_plugins.routed_conv as rc
from fedbench.adapter import ADAPTATION_EPOCHS, online_batches
from fedbench.data import UnlabeledImages
from fedbench.engine.registry import load_registry
from fedbench.engine.resolve import RunSpec, resolve
from fedbench_plugins.bn_adapt import BNAdapt
from fedbench_plugins.sar import SAR
from fedbench_plugins.tent import Tent

REGISTRY = load_registry()
ADAPTING = [
    n for n in REGISTRY.names("adapters") if "epochs" in REGISTRY.get("adapters", n).defaults
]


@pytest.mark.parametrize("preset", sorted(ADAPTATION_EPOCHS))
def test_every_adapting_adapter_gets_the_same_epochs_per_preset(preset):
    assert {"tent", "sar", "iopfl-routing"} <= set(ADAPTING)
    for name in ADAPTING:
        run = resolve(RunSpec("fedavg", adapter=name, preset=preset), REGISTRY)
        assert run.config["adapter"]["epochs"] == ADAPTATION_EPOCHS[preset], name


def test_a_trailing_single_image_joins_the_previous_batch():
    images = UnlabeledImages(torch.randn(9, 1, 8, 8))
    assert [len(b) for b in online_batches(images, 4)] == [4, 5]
    assert [len(b) for b in online_batches(images, 3)] == [3, 3, 3]
    assert [len(b) for b in online_batches(images, 1)] == [1] * 9


def test_batch_statistics_adapters_normalize_the_last_image_with_its_neighbours():
    fed, images = federation(), UnlabeledImages(torch.randn(9, 1, 16, 16))
    ctx = context()  # batch size 4: batches of 4 and 5
    outputs = BNAdapt({}).predict(fed, images, ctx)
    tail = BNAdapt({}).predict(fed, UnlabeledImages(images.inputs[4:]), ctx)
    torch.testing.assert_close(outputs[4:], tail)
    alone = BNAdapt({}).predict(fed, UnlabeledImages(images.inputs[8:]), ctx)
    assert not torch.allclose(outputs[8:], alone)


@pytest.mark.parametrize("adapter_cls", [Tent, SAR])
def test_zero_epochs_predict_without_updating_which_is_bn_adapt(adapter_cls):
    fed, images = federation(), UnlabeledImages(torch.randn(9, 1, 16, 16))
    plain = BNAdapt({}).predict(fed, images, context())
    adapted = adapter_cls({**adapter_cls.defaults, "epochs": 0}).predict(fed, images, context())
    torch.testing.assert_close(adapted, plain)
    one = adapter_cls({**adapter_cls.defaults, "epochs": 1, "lr": 0.1}).predict(
        fed, images, context()
    )
    assert not torch.allclose(one, plain)


def build(**quirks: bool):
    return rc.build_routed_model(small_unet(0), [small_unet(i + 1) for i in range(K)], **quirks)


def test_drop_expert_alone_changes_only_the_expert_lists():
    model = build(drop_expert=True)
    for layer in routed_convs(model).values():
        transposed = isinstance(layer, rc.RoutedConvTranspose)
        assert layer.num_experts == (K + 1 if transposed else K)
        assert all(p.requires_grad for p in layer.router.parameters())


def test_frozen_bottleneck_alone_freezes_only_the_widest_routers():
    model = build(frozen_bottleneck=True)
    widest = max(layer.out_channels for layer in routed_convs(model).values())
    for layer in routed_convs(model).values():
        assert layer.num_experts == K + 1
        trainable = all(p.requires_grad for p in layer.router.parameters())
        assert trainable == (layer.out_channels != widest)


def test_reseed_alone_repeats_the_noise_of_every_batch():
    images = UnlabeledImages(torch.randn(4, 1, 16, 16).repeat(2, 1, 1, 1))  # two equal batches
    for reseed in (True, False):
        torch.manual_seed(0)
        p = {**ir.IOPFLRouting.defaults, "epochs": 1, "lr": 0.0, "quirk_reseed": reseed}
        out = ir.adapt_online(build(), online_batches(images, 4), p, 0, torch.device("cpu"))
        assert torch.equal(out[:4], out[4:]) == reseed  # lr 0: only the router dropout masks vary
