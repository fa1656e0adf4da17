"""Volumes: what 3D segmentation needs beyond 2D. Training draws fixed-size patches from whole
volumes, a share of them centred on foreground (small structures are rare among random patches),
from the caller's own random stream; prediction covers a whole volume in overlapping windows,
scanned as MONAI's `sliding_window_inference` scans and blended with MONAI's Gaussian importance
map (here, so that faces inside the volume can weigh 0: `window_weights`), so the network's
memory grows with the window, not the volume. Adapters meet volumes as those windows too.

Shapes: inputs [N, C, *spatial], labels [N, *spatial], patch sizes one int per spatial axis."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from fedbench.data import Split
from fedbench.errors import FedbenchError
from fedbench.task import SegmentationTask

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn


def centred(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """`volume` centre-cropped or zero-padded to `shape` (its trailing axes), as float32."""
    import numpy as np

    lead = volume.shape[: volume.ndim - len(shape)]
    out = np.zeros((*lead, *shape), dtype=np.float32)
    source, dest = [slice(None)] * len(lead), [slice(None)] * len(lead)
    for n, m in zip(volume.shape[len(lead) :], shape):
        width = min(n, m)
        start, offset = max(0, (n - m) // 2), max(0, (m - n) // 2)
        source.append(slice(start, start + width))
        dest.append(slice(offset, offset + width))
    out[tuple(dest)] = volume[tuple(source)]
    return out


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
    if margin == 0:
        return gaussian
    weights = gaussian.clone()
    for axis, (s, p, n) in enumerate(zip(start, gaussian.shape, size, strict=True)):
        view = weights.movedim(axis, 0)
        if s > 0:
            view[:margin] = 0.0
        if s + p < n:
            view[p - margin :] = 0.0
    return weights


@dataclass(frozen=True)
class Windows:
    """The windows that cover volumes of one `spatial` shape, scanned as MONAI's
    `sliding_window_inference` scans (`overlap` a fraction of the patch), on the volume
    zero-padded at its ends to at least the patch (`grown`), as MONAI pads."""

    spatial: tuple[int, ...]
    patch: tuple[int, ...]
    overlap: float
    margin: int = 0

    @property
    def grown(self) -> tuple[int, ...]:
        return tuple(max(p, n) for p, n in zip(self.patch, self.spatial, strict=True))

    @property
    def starts(self) -> list[tuple[int, ...]]:
        import itertools

        axes = (window_starts(n, p, self.overlap) for n, p in zip(self.grown, self.patch))
        return list(itertools.product(*axes))

    def box(self, start: tuple[int, ...]) -> tuple:
        return (..., *(slice(s, s + p) for s, p in zip(start, self.patch, strict=True)))

    def padded(self, inputs: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        pad = [x for g, n in zip(reversed(self.grown), reversed(self.spatial)) for x in (0, g - n)]
        return F.pad(inputs, pad) if any(pad) else inputs

    def blend(self, pieces: Iterator[tuple[tuple[int, ...], torch.Tensor]]) -> torch.Tensor:
        """[N, K, *spatial] from (start, outputs [N, K, *patch]) of every window, weighted by
        `window_weights`."""
        from monai.data.utils import compute_importance_map

        gaussian = compute_importance_map(self.patch, mode="gaussian", sigma_scale=0.125)
        total = weight = None
        for start, outputs in pieces:
            if total is None:
                total = outputs.new_zeros((*outputs.shape[:2], *self.grown))
                weight = outputs.new_zeros(self.grown)
                gaussian = gaussian.to(outputs)  # once, on the outputs' device and dtype
            w = window_weights(gaussian, start, self.grown, self.margin)
            total[self.box(start)] += outputs * w
            weight[self.box(start)[1:]] += w
        total /= weight
        return total[(..., *(slice(0, n) for n in self.spatial))]


def windows_for(
    spatial: Sequence[int], patch: Sequence[int], overlap: float, margin: int = 0
) -> Windows:
    """The checked `Windows` of volumes of shape `spatial`, or one clear error."""
    sizes = checked_patch(patch, spatial)
    if not 0.0 <= overlap < 1.0:
        raise FedbenchError(f"window overlap must be in [0, 1), got {overlap}")
    steps = [max(1, int(p * (1 - overlap))) for p in sizes]
    if any(p - 2 * margin < step for p, step in zip(sizes, steps, strict=True)):
        raise FedbenchError(
            f"a margin of {margin} needs windows {list(sizes)} overlapping by at least "
            f"{2 * margin} voxels per axis; raise the overlap ({overlap}) or the patch"
        )
    return Windows(tuple(spatial), sizes, overlap, margin)


def sliding_window_predict(
    model: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    patch: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 4,
    margin: int = 0,
) -> torch.Tensor:
    """`model`'s outputs [N, K, *spatial] for whole volumes `inputs` [N, C, *spatial], in
    `Windows` of `patch`, `batch_size` windows at a time, blended by `window_weights`. A network
    whose receptive field reaches no further than `margin` voxels then gives exactly its
    whole-volume output; 0 is MONAI's Gaussian blending. A window that covers the volume is the
    model on the volume itself."""
    import torch

    windows = windows_for(inputs.shape[2:], patch, overlap, margin)
    if all(p >= n for p, n in zip(windows.patch, windows.spatial, strict=True)):
        return model(inputs)
    volume, starts, n = windows.padded(inputs), windows.starts, len(inputs)

    def pieces() -> Iterator[tuple[tuple[int, ...], torch.Tensor]]:
        for first in range(0, len(starts), batch_size):
            chunk = starts[first : first + batch_size]
            outputs = model(torch.cat([volume[windows.box(s)] for s in chunk]))
            for j, start in enumerate(chunk):
                yield start, outputs[j * n : (j + 1) * n]

    return windows.blend(pieces())


def as_windows(
    inputs: torch.Tensor, patch: Sequence[int], overlap: float
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Every window of every volume as one batch [N * W, C, *patch] (volume by volume, each in
    scan order), and the function that blends outputs of those windows back into [N, K,
    *spatial]: how an adapter meets volumes, on the inputs the network trained on."""
    import torch

    windows = windows_for(inputs.shape[2:], patch, overlap)
    volume, starts = windows.padded(inputs), windows.starts
    tiles = torch.cat(
        [volume[i : i + 1][windows.box(s)] for i in range(len(inputs)) for s in starts]
    )

    def restored(outputs: torch.Tensor) -> torch.Tensor:
        per_volume = outputs.view(len(inputs), len(starts), *outputs.shape[1:])
        return windows.blend((s, per_volume[:, j]) for j, s in enumerate(starts))

    return tiles, restored


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
    spatial_dims: ClassVar[int] = 3

    def adaptation_view(
        self, inputs: torch.Tensor
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """The windows of each volume (`as_windows`): an adapter meets inputs of the size the
        network trained on, so the statistics it estimates at test time are of such inputs."""
        return as_windows(inputs, self.patch, self.overlap)

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
