"""Volumes: what 3D segmentation needs beyond 2D. Training draws fixed-size patches from whole
volumes, a share of them centred on foreground (small structures are rare among random patches),
from the caller's own random stream; prediction covers a whole volume with MONAI's sliding
window, its overlapping windows blended, so memory grows with the window, not the volume.

Shapes: inputs [N, C, *spatial], labels [N, *spatial], patch sizes one int per spatial axis."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedbench.data import Split
from fedbench.errors import FedbenchError
from fedbench.task import SegmentationTask

if TYPE_CHECKING:
    import torch
    from torch import nn


def checked_patch(patch: Sequence[int], spatial: Sequence[int]) -> tuple[int, ...]:
    """`patch` as a tuple, one positive size per spatial axis, or one clear error."""
    sizes = tuple(int(p) for p in patch)
    if len(sizes) != len(spatial) or any(p < 1 for p in sizes):
        raise FedbenchError(
            f"patch size {list(patch)} must give one positive size per spatial axis of a "
            f"{len(spatial)}D volume {list(spatial)}"
        )
    return sizes


def _uniform(high: int, generator: torch.Generator) -> int:
    """An integer in [0, high], drawn from `generator`."""
    import torch

    return int(torch.randint(high + 1, (1,), generator=generator))


def patch_start(
    labels: torch.Tensor, patch: tuple[int, ...], foreground: bool, generator: torch.Generator
) -> tuple[int, ...]:
    """Where a patch of one volume's `labels` [*spatial] starts: uniformly anywhere it fits, or
    (`foreground`, when the volume has any) placed so that a random foreground voxel lies at a
    uniformly drawn position inside it, clipped to the volume. A patch larger than the volume
    starts at 0 (the volume is padded)."""
    import torch

    room = [max(0, s - p) for s, p in zip(labels.shape, patch, strict=True)]
    voxels = torch.nonzero(labels > 0) if foreground else None
    if voxels is None or len(voxels) == 0:
        return tuple(_uniform(r, generator) for r in room)
    centre = voxels[_uniform(len(voxels) - 1, generator)].tolist()
    starts = []
    for c, p, r in zip(centre, patch, room, strict=True):
        offset = _uniform(p - 1, generator)  # where in the patch the foreground voxel falls
        starts.append(min(max(c - offset, 0), r))
    return tuple(starts)


def crop(volume: torch.Tensor, start: tuple[int, ...], patch: tuple[int, ...]) -> torch.Tensor:
    """The patch of `volume` [..., *spatial] at `start`, zero-padded at the far end when the
    volume is smaller than the patch."""
    import torch.nn.functional as F

    spatial = volume.shape[-len(patch) :]
    index = tuple(slice(s, s + p) for s, p in zip(start, patch, strict=True))
    cut = volume[(..., *index)]
    pad = [n for s, p in zip(reversed(spatial), reversed(patch)) for n in (0, max(0, p - s))]
    return F.pad(cut, pad) if any(pad) else cut


def sample_patches(
    inputs: torch.Tensor,
    labels: torch.Tensor,
    patch: Sequence[int],
    foreground_rate: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One patch of each volume: inputs [N, C, *patch] and labels [N, *patch]. Each is
    foreground-centred with probability `foreground_rate` (nnU-Net's oversampling; 0: uniform
    patches only), every draw from `generator`."""
    import torch

    if not 0.0 <= foreground_rate <= 1.0:
        raise FedbenchError(f"foreground rate must be in [0, 1], got {foreground_rate}")
    sizes = checked_patch(patch, labels.shape[1:])
    xs, ys = [], []
    for x, y in zip(inputs, labels, strict=True):
        wanted = bool(torch.rand((), generator=generator) < foreground_rate)
        start = patch_start(y, sizes, wanted, generator)
        xs.append(crop(x, start, sizes))
        ys.append(crop(y, start, sizes))
    return torch.stack(xs), torch.stack(ys)


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Where the windows of one axis start, as MONAI scans: every `patch * (1 - overlap)` voxels
    from 0, the last flush with the end."""
    if patch >= size:
        return [0]
    step = max(1, int(patch * (1 - overlap)))
    return sorted({*range(0, size - patch, step), size - patch})


def window_weights(
    gaussian: torch.Tensor, start: tuple[int, ...], size: tuple[int, ...], margin: int
) -> torch.Tensor:
    """One window's blending weights: MONAI's Gaussian, 0 within `margin` voxels of each of its
    faces that lies inside the volume (there its output depends on its own zero padding); a
    face on the volume's boundary keeps its weights, as the whole volume has the same padding."""
    weights = gaussian.clone()
    for axis, (s, p, n) in enumerate(zip(start, gaussian.shape, size, strict=True)):
        view = weights.movedim(axis, 0)
        if s > 0:
            view[:margin] = 0.0
        if s + p < n:
            view[p - margin :] = 0.0
    return weights


def sliding_window_predict(
    model: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    patch: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 4,
    margin: int = 0,
) -> torch.Tensor:
    """`model`'s outputs [N, K, *spatial] for whole volumes `inputs` [N, C, *spatial], in
    windows of `patch` overlapping by `overlap` (a fraction, scanned as MONAI's
    `sliding_window_inference` scans), `batch_size` windows at a time, blended by
    `window_weights`. A network whose receptive field reaches no further than `margin` voxels
    then gives exactly its whole-volume output; 0 is MONAI's Gaussian blending. A window that
    covers the volume is the model on the volume itself; an axis shorter than the patch is
    zero-padded at its end, as MONAI pads."""
    import itertools

    import torch
    import torch.nn.functional as F
    from monai.data.utils import compute_importance_map

    spatial = tuple(inputs.shape[2:])
    sizes = checked_patch(patch, spatial)
    if not 0.0 <= overlap < 1.0:
        raise FedbenchError(f"window overlap must be in [0, 1), got {overlap}")
    if all(p >= n for p, n in zip(sizes, spatial, strict=True)):
        return model(inputs)
    steps = [max(1, int(p * (1 - overlap))) for p in sizes]
    if any(p - 2 * margin < step for p, step in zip(sizes, steps, strict=True)):
        raise FedbenchError(
            f"a margin of {margin} needs windows {list(sizes)} overlapping by at least "
            f"{2 * margin} voxels per axis; raise the overlap ({overlap}) or the patch"
        )
    grown = tuple(max(p, n) for p, n in zip(sizes, spatial, strict=True))
    pad = [x for p, n in zip(reversed(grown), reversed(spatial)) for x in (0, p - n)]
    volume = F.pad(inputs, pad) if any(pad) else inputs
    gaussian = compute_importance_map(sizes, mode="gaussian", sigma_scale=0.125)
    windows = list(itertools.product(*(window_starts(n, p, overlap) for n, p in zip(grown, sizes))))
    total = weight = None
    for first in range(0, len(windows), batch_size):
        chunk = windows[first : first + batch_size]
        boxes = [(..., *(slice(s, s + p) for s, p in zip(w, sizes))) for w in chunk]
        outputs = model(torch.cat([volume[box] for box in boxes]))
        if total is None:
            total = outputs.new_zeros((len(inputs), outputs.shape[1], *grown))
            weight = outputs.new_zeros(grown)
        for j, (start, box) in enumerate(zip(chunk, boxes)):
            w = window_weights(gaussian, start, grown, margin).to(outputs)
            total[box] += outputs[j * len(inputs) : (j + 1) * len(inputs)] * w
            weight[box[1:]] += w
    total /= weight
    return total[(..., *(slice(0, n) for n in spatial))]


@dataclass(frozen=True)
class PatchSplit(Split):
    """A split of whole volumes that trains on patches: its shuffled batches (with a generator,
    as a client's local training asks) are one random patch of each volume of the batch
    (`sample_patches`, from that generator); unshuffled batches are the whole volumes."""

    patch: tuple[int, ...] = ()
    foreground_rate: float = 0.33

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if generator is None:
            yield from super().batches(batch_size)
            return
        for inputs, targets in super().batches(batch_size, generator):
            yield sample_patches(inputs, targets, self.patch, self.foreground_rate, generator)


@dataclass
class VolumeSegmentationTask(SegmentationTask):
    """3D segmentation: SegmentationTask's loss and scores on volumes (each sample one case, HD95
    in mm from `spacing`), predicted by `sliding_window_predict` in windows of `patch`
    overlapping by `overlap`."""

    patch: tuple[int, ...] = (16, 32, 32)
    overlap: float = 0.5

    def predict(self, model: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Each volume in blended windows, `batch_size` windows at a time (eval mode, no
        gradients, on the model's device; returned on the CPU)."""
        import torch

        model.eval()
        device = next(model.parameters()).device
        outputs = torch.empty(0)
        for i, volume in enumerate(inputs):
            with torch.inference_mode():
                one = sliding_window_predict(
                    model, volume[None].to(device), self.patch, self.overlap, batch_size
                )
            if i == 0:  # a plain tensor, filled in place: one volume's buffers at a time
                outputs = torch.empty((len(inputs), *one.shape[1:]), dtype=torch.float32)
            outputs[i] = one[0]
        return outputs
