"""Tests of the IOP-FL routing adapter: vectorised routed convs, routing spaces, quirks, frozen
experts, and the shape and label-freedom of its predictions."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from fedbench.adapter import AdaptContext, TrainedFederation, online_batches
from fedbench.data import UnlabeledImages
from fedbench.errors import FedbenchError
from fedbench.task import SegmentationTask
from fedbench_plugins import iopfl_routing as ir
from fedbench_plugins import routed_conv as rc
from fedbench_plugins.unet import UNet

CFG = {"channels": [4, 8, 16], "res_units": 0}
TASK = SegmentationTask(in_channels=1)
K = 5


def small_unet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return UNet().build(TASK, CFG)


def experts_of(layer_type: type, seed: int = 0, **kwargs) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [layer_type(**kwargs) for _ in range(3)]


def routed_convs(model: nn.Module) -> dict[str, rc.RoutedConv]:
    return {n: m for n, m in model.named_modules() if isinstance(m, rc.RoutedConv)}


CONV_CASES = [
    (nn.Conv2d, {"in_channels": 3, "out_channels": 5, "kernel_size": 3, "stride": 2, "padding": 1}),
    (nn.Conv2d, {"in_channels": 4, "out_channels": 2, "kernel_size": 1}),
    (
        nn.ConvTranspose2d,
        {
            "in_channels": 6,
            "out_channels": 3,
            "kernel_size": 3,
            "stride": 2,
            "padding": 1,
            "output_padding": 1,
        },
    ),
    # volumes (issue 26): the same rule in 3D
    (nn.Conv3d, {"in_channels": 3, "out_channels": 5, "kernel_size": 3, "stride": 2, "padding": 1}),
    (
        nn.ConvTranspose3d,
        {"in_channels": 4, "out_channels": 2, "kernel_size": 2, "stride": 2},
    ),
]


def spatial(layer_type: type, side: int) -> tuple[int, ...]:
    """An input's spatial shape for the layer: square, or a short volume for 3D layers."""
    three_d = layer_type in (nn.Conv3d, nn.ConvTranspose3d)
    return (5, side, side) if three_d else (side, side)


@pytest.mark.parametrize(("layer_type", "kwargs"), CONV_CASES)
def test_vectorised_equals_per_image_loop(layer_type: type, kwargs: dict) -> None:
    experts = experts_of(layer_type, **kwargs)
    layer = rc.RoutedConv.from_layers(experts)
    x = torch.randn(4, kwargs["in_channels"], *spatial(layer_type, 9))
    weights = torch.rand(4, 3)
    fast = layer.mixed_forward(x, weights)
    slow = rc.per_image_reference(layer, x, weights)
    assert fast.shape == slow.shape == experts[0](x).shape
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("layer_type", "kwargs"), CONV_CASES)
def test_one_hot_weights_give_that_experts_convolution(layer_type: type, kwargs: dict) -> None:
    experts = experts_of(layer_type, **kwargs)
    layer = rc.RoutedConv.from_layers(experts)
    x = torch.randn(3, kwargs["in_channels"], *spatial(layer_type, 8))
    chosen = torch.tensor([0, 2, 1])
    out = layer.mixed_forward(x, nn.functional.one_hot(chosen, 3).float())
    for b, e in enumerate(chosen.tolist()):
        torch.testing.assert_close(out[b : b + 1], experts[e](x[b : b + 1]), atol=1e-5, rtol=1e-5)


def test_forward_uses_router_weights() -> None:
    layer = rc.RoutedConv.from_layers(
        experts_of(nn.Conv2d, in_channels=2, out_channels=3, kernel_size=3)
    )
    layer.eval()
    x = torch.randn(2, 2, 6, 6)
    weights = layer.routing_weights(x)
    assert weights.shape == (2, 3) and bool(((weights > 0) & (weights < 1)).all())
    torch.testing.assert_close(layer(x), layer.mixed_forward(x, weights))


@pytest.mark.parametrize(("space", "count"), [("both", K + 1), ("global", 1), ("personalized", K)])
def test_space_sets_expert_count(space: str, count: int) -> None:
    model = rc.build_routed_model(small_unet(0), [small_unet(i + 1) for i in range(K)], space)
    layers = routed_convs(model)
    assert len(layers) == 5  # 3 Conv2d + 2 ConvTranspose2d in this U-Net
    assert {layer.num_experts for layer in layers.values()} == {count}
    assert not any(isinstance(m, nn.Conv2d | nn.ConvTranspose2d) for m in model.modules())


def test_unknown_space_is_a_clear_error() -> None:
    with pytest.raises(FedbenchError, match="unknown space"):
        rc.build_routed_model(small_unet(0), [small_unet(1)], "local")


def test_experts_come_from_matching_layers() -> None:
    glob, personal = small_unet(0), [small_unet(i + 1) for i in range(K)]
    model = rc.build_routed_model(glob, personal, "both")
    name, layer = next(iter(routed_convs(model).items()))
    sources = [dict(m.named_modules())[name] for m in [*personal, glob]]
    for e, source in enumerate(sources):
        assert torch.equal(layer.expert_weight[e], source.weight)
        assert torch.equal(layer.expert_bias[e], source.bias)


def test_quirks_drop_last_expert_in_convs_and_freeze_bottleneck() -> None:
    model = rc.build_routed_model(
        small_unet(0),
        [small_unet(i + 1) for i in range(K)],
        drop_expert=True,
        frozen_bottleneck=True,
    )
    widest = max(layer.out_channels for layer in routed_convs(model).values())
    frozen = []
    for layer in routed_convs(model).values():
        transposed = isinstance(layer, rc.RoutedConvTranspose)
        assert layer.num_experts == (K + 1 if transposed else K)
        trainable = all(p.requires_grad for p in layer.router.parameters())
        assert trainable == (layer.out_channels != widest)
        frozen += [] if trainable else [layer]
    assert len(frozen) == 1 and frozen[0].out_channels == 16


def test_trainable_parameters_are_routers_and_norm_affine() -> None:
    model = rc.build_routed_model(small_unet(0), [small_unet(i + 1) for i in range(K)])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in n or ".adn.N." in n for n in trainable)
    assert sum(".adn.N." in n for n in trainable) == 2 * 4  # 4 BatchNorms, weight + bias
    assert all(
        n in dict(model.named_buffers())
        for n in [f"{k}.expert_weight" for k in routed_convs(model)]
    )
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.running_mean is None and not bn.track_running_stats


def federation(num_personalized: int = K) -> TrainedFederation:
    states = [small_unet(i).state_dict() for i in range(num_personalized + 1)]
    return TrainedFederation(
        build_model=lambda: UNet().build(TASK, CFG),
        global_state=states[0],
        personalized=states[1:],
        site_names=[f"site{i}" for i in range(num_personalized)],
        device=torch.device("cpu"),
    )


def context() -> AdaptContext:
    return AdaptContext(batch_size=4, seed=0, task=SegmentationTask(in_channels=1))


def test_predict_returns_probabilities() -> None:
    images = UnlabeledImages(torch.randn(9, 1, 16, 16))  # batches of 4, 4, 1 -> 4, 5
    adapter = ir.IOPFLRouting({**ir.IOPFLRouting.defaults, "epochs": 2})
    probs = adapter.predict(federation(), images, context())
    assert probs.shape == (9, 2, 16, 16) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(1), torch.ones(9, 16, 16))
    again = adapter.predict(federation(), images, context())
    torch.testing.assert_close(probs, again)  # seeded from ctx.seed


def test_predict_rejects_unknown_space() -> None:
    adapter = ir.IOPFLRouting({**ir.IOPFLRouting.defaults, "space": "nope"})
    with pytest.raises(FedbenchError, match="space"):
        adapter.predict(federation(), UnlabeledImages(torch.randn(2, 1, 16, 16)), context())


def test_adaptation_changes_routers_and_keeps_experts() -> None:
    fed = federation()
    glob = fed.model(fed.global_state)
    model = rc.build_routed_model(
        glob, [fed.model(s) for s in fed.personalized], drop_expert=True, frozen_bottleneck=True
    )
    experts = {n: b.clone() for n, b in model.named_buffers()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = online_batches(UnlabeledImages(torch.randn(6, 1, 32, 32)), 3)
    p = {**ir.IOPFLRouting.defaults, "epochs": 1, "quirk_reseed": True}
    probs = ir.adapt_online(model, batches, p, seed=0, device=torch.device("cpu"))
    assert probs.shape == (6, 2, 32, 32)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, experts[name]), name
    for name, param in model.named_parameters():
        assert torch.equal(param, params[name]) != param.requires_grad, name
    assert torch.equal(
        glob.state_dict()["model.0.conv.weight"], fed.global_state["model.0.conv.weight"]
    )


def test_trailing_single_image_joins_previous_batch() -> None:
    sizes = [len(b) for b in online_batches(UnlabeledImages(torch.randn(9, 1, 4, 4)), 4)]
    assert sizes == [4, 5]
    sizes = [len(b) for b in online_batches(UnlabeledImages(torch.randn(3, 1, 4, 4)), 1)]
    assert sizes == [1, 1, 1]


def test_perturbation_is_inverted() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 2, 8, 8)
    view, flips, k = ir.perturb(x, noise_std=0.0)
    torch.testing.assert_close(ir.unperturb(view, flips, k), x)
    view, flips, k = ir.perturb(torch.randn(2, 1, 8, 6), noise_std=0.0)
    assert k == 0 and view.shape == (2, 1, 8, 6)


def test_a_volume_is_perturbed_and_shape_scored_in_its_slices() -> None:
    torch.manual_seed(1)
    volume = torch.randn(4, 2, 3, 8, 8)  # [B, C, D, H, W]
    view, flips, k = ir.perturb(volume, noise_std=0.0)
    torch.testing.assert_close(ir.unperturb(view, flips, k), volume)
    for b in range(4):  # slices stay slices: depth is never flipped or rotated
        for d in range(3):
            expected = volume[b, :, d].flip(-2) if flips[b] else volume[b, :, d]
            torch.testing.assert_close(view[b, :, d], torch.rot90(expected, k, dims=(-2, -1)))
    probs = torch.rand(2, 3, 4, 8, 8).softmax(1)
    slices = probs.transpose(1, 2).flatten(0, 1)  # the 8 slices as 2D images
    torch.testing.assert_close(ir.shape_loss(probs), ir.shape_loss(slices))


def test_losses() -> None:
    uniform = torch.full((3, 2, 8, 8), 0.5)
    # each element contributes 0.5 (normalised by log 2): summed over 3 images -> 1.5 = B / C
    torch.testing.assert_close(ir.entropy_loss(uniform), torch.tensor(1.5), atol=1e-4, rtol=0)
    assert ir.shape_loss(uniform).item() == 0.0
    blob = torch.zeros(1, 2, 32, 32)
    blob[:, 1, 10:20, 10:20] = 1.0
    blob[:, 0] = 1 - blob[:, 1]
    assert ir.shape_loss(blob).item() > 0


def test_unlabeled_images_hold_inputs_only() -> None:
    # label-freedom itself is tested behaviourally by the conformance kit (labels shuffled)
    assert [f.name for f in dataclasses.fields(UnlabeledImages)] == ["inputs"]


def test_hook_registers_the_adapter() -> None:
    assert ir.fedbench_adapters() == [ir.IOPFLRouting]
    assert ir.IOPFLRouting.name == "iopfl-routing"
