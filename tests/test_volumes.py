"""fedbench.volumes: foreground-oversampled training patches and sliding-window prediction,
checked against whole-volume prediction (issue 26)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedbench.errors import FedbenchError
from fedbench.volumes import sample_patches, sliding_window_predict


def volumes(n: int = 3, shape: tuple[int, ...] = (12, 20, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random volumes, each with one small foreground cube at a random place."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, *shape, generator=g)
    y = torch.zeros(n, *shape, dtype=torch.int64)
    for i in range(n):
        corner = [int(torch.randint(s - 2, (1,), generator=g)) for s in shape]
        y[(i, *(slice(c, c + 2) for c in corner))] = 1
    return x, y


def test_foreground_patches_always_hold_foreground_and_uniform_ones_rarely_do():
    x, y = volumes(n=40)
    g = torch.Generator().manual_seed(1)
    _, fg = sample_patches(x, y, (4, 4, 4), 1.0, g)
    _, uniform = sample_patches(x, y, (4, 4, 4), 0.0, g)
    assert all(patch.any() for patch in fg)
    assert sum(bool(patch.any()) for patch in uniform) < 20  # 8 of 3840 voxels are foreground


def test_patches_are_crops_of_their_volume_and_repeat_with_the_stream():
    x, y = volumes()
    px, py = sample_patches(x, y, (5, 6, 7), 0.5, torch.Generator().manual_seed(3))
    again = sample_patches(x, y, (5, 6, 7), 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(px, again[0]) and torch.equal(py, again[1])
    assert px.shape == (3, 1, 5, 6, 7) and py.shape == (3, 5, 6, 7)
    for i in range(3):  # each patch sits somewhere in its own volume
        found = any(
            torch.equal(x[i, :, a : a + 5, b : b + 6, c : c + 7], px[i])
            for a in range(8)
            for b in range(15)
            for c in range(10)
        )
        assert found


def test_a_patch_larger_than_the_volume_is_zero_padded():
    x, y = volumes(n=1, shape=(4, 6, 6))
    px, py = sample_patches(x, y, (8, 6, 6), 1.0, torch.Generator().manual_seed(0))
    assert px.shape == (1, 1, 8, 6, 6)
    assert torch.equal(px[0, :, :4], x[0]) and not px[0, :, 4:].any()


def small_unet() -> nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(3, 1, 2, channels=(4, 8), strides=(2,), num_res_units=0, norm="batch").eval()


def test_a_window_covering_the_volume_is_the_whole_volume_prediction():
    x, _ = volumes(n=2, shape=(8, 16, 16))
    net = small_unet()
    with torch.no_grad():
        assert torch.equal(sliding_window_predict(net, x, (8, 16, 16)), net(x))


def test_stitching_is_exact_for_a_network_whose_receptive_field_fits_the_margin():
    x, _ = volumes(n=2, shape=(12, 20, 16))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv3d(3, 2, 3, padding=1))
    with torch.no_grad():
        whole = net(x)
        stitched = sliding_window_predict(net, x, (8, 8, 8), overlap=0.5, margin=2)
        unmarked = sliding_window_predict(net, x, (8, 8, 8), overlap=0.5)
    assert (stitched - whole).abs().max() < 1e-5  # blending identical values: rounding only
    assert (unmarked - whole).abs().max() > 1e-4  # window faces see zero padding


def test_a_unet_in_smaller_windows_agrees_with_the_whole_volume_within_a_tolerance():
    x, _ = volumes(n=2, shape=(16, 32, 32))
    net = small_unet()
    with torch.no_grad():
        whole = net(x).softmax(1)
        windowed = sliding_window_predict(net, x, (16, 16, 16), overlap=0.5).softmax(1)
    assert (windowed - whole).abs().mean() < 0.005  # measured 0.002
    assert (windowed.argmax(1) == whole.argmax(1)).float().mean() > 0.98  # measured 0.985


def test_bad_windows_are_one_clear_error():
    x, _ = volumes(n=1)
    net = small_unet()
    with pytest.raises(FedbenchError, match="one positive size per spatial axis"):
        sliding_window_predict(net, x, (8, 8))
    with pytest.raises(FedbenchError, match="overlap"):
        sliding_window_predict(net, x, (8, 8, 8), overlap=1.0)
    with pytest.raises(FedbenchError, match="margin of 3 needs windows"):
        sliding_window_predict(net, x, (8, 8, 8), overlap=0.25, margin=3)


def test_the_volume_task_predicts_plain_tensors_that_later_code_may_change():
    from fedbench.volumes import VolumeSegmentationTask

    task = VolumeSegmentationTask(in_channels=1, patch=(8, 8, 8))
    x, _ = volumes(n=2, shape=(8, 16, 16))
    outputs = task.predict(small_unet(), x, 4)
    assert outputs.shape == (2, 2, 8, 16, 16) and not outputs.is_inference()
    outputs += 1.0  # an inference tensor would refuse this outside inference mode


def test_windows_handed_to_an_adapter_blend_back_as_the_sliding_window_does():
    from fedbench.volumes import as_windows

    x, _ = volumes(n=2, shape=(12, 20, 16))
    net = small_unet()
    tiles, restored = as_windows(x, (8, 8, 8), 0.5)
    assert tiles.shape[1:] == (1, 8, 8, 8) and len(tiles) % 2 == 0
    with torch.no_grad():
        through_tiles = restored(net(tiles))  # BatchNorm in eval mode: per-window outputs
        sliding = sliding_window_predict(net, x, (8, 8, 8), overlap=0.5)
    torch.testing.assert_close(through_tiles, sliding, atol=1e-6, rtol=1e-5)
