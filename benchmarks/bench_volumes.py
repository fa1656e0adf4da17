"""Memory of 3D training and inference as the volume doubles in each dimension (issue 26).

Each measurement is a fresh child process (peak resident memory, VmHWM, cannot be reset inside
one) that builds the `unet3d` network of synth-organ-3d and a batch of two random volumes, notes
its peak so far (the floor), then does one kind of work and reports how far the peak rose above
the floor:
- train: TRAIN_STEPS Adam steps on PATCH-sized patches drawn from the volumes (PatchSplit), as a
  client trains; it should not grow with the volume;
- window: sliding-window prediction of the volumes in PATCH windows (VolumeSegmentationTask),
  as the engine scores; it grows with the outputs it keeps (printed), not with the network's
  activations, so at the larger size it stays far below whole-volume inference;
- whole: the network on the whole volumes at once, for contrast (activations grow with the
  volume, 8x per doubling).
Sizes (8x the voxels from the first to the second) and kinds run interleaved, in rotated order,
REPEATS times; the smallest rise of each is kept. Run with -s to see the table and the ratios."""

from __future__ import annotations

import json
import math
import subprocess
import sys

SHAPES = ((32, 64, 64), (64, 128, 128))
PATCH = (16, 32, 32)
KINDS = ("train", "window", "whole")
TRAIN_STEPS = 5
REPEATS = 2

CHILD = r"""
import json, sys
import torch

def peak_kib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

kind, shape, patch = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
steps = int(sys.argv[4])
torch.set_num_threads(1)
from fedbench.volumes import PatchSplit, VolumeSegmentationTask
from fedbench_plugins.unet3d import UNet3D
task = VolumeSegmentationTask(in_channels=1, class_names=["organ", "lesion"], patch=tuple(patch))
torch.manual_seed(0)
model = UNet3D().build(task, UNet3D.defaults)
x = torch.randn(2, 1, *shape)
y = (torch.rand(2, *shape) > 0.9).long()
split = PatchSplit(x, y, torch.arange(2), patch=tuple(patch))
floor = peak_kib()
if kind == "train":
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        for inputs, targets in split.batches(2, generator):
            optimizer.zero_grad()
            task.loss(model(inputs), targets).backward()
            optimizer.step()
elif kind == "window":
    task.predict(model, x, 2)
else:
    model.eval()
    with torch.inference_mode():
        model(x)
print(json.dumps({"rise_kib": peak_kib() - floor}))
"""


def rise_mib(kind: str, shape: tuple[int, ...]) -> float:
    """How far one kind of work raised the child's peak resident memory, in MiB."""
    args = [kind, json.dumps(shape), json.dumps(PATCH), str(TRAIN_STEPS)]
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["rise_kib"] / 1024


def test_training_is_flat_and_inference_bounded_by_the_window_as_the_volume_doubles():
    variants = [(kind, shape) for kind in KINDS for shape in SHAPES]
    rises: dict[tuple[str, tuple[int, ...]], float] = {}
    for repeat in range(REPEATS):
        shift = repeat % len(variants)
        for kind, shape in variants[shift:] + variants[:shift]:
            rise = rise_mib(kind, shape)
            rises[kind, shape] = min(rises.get((kind, shape), rise), rise)
    small, large = SHAPES
    print(f"\npeak memory above the floor, MiB (best of {REPEATS}), unet3d, patch {PATCH}:")
    for kind in KINDS:
        ratio = rises[kind, large] / max(rises[kind, small], 1e-3)
        print(
            f"  {kind:6s} {small}: {rises[kind, small]:7.1f}   {large}: "
            f"{rises[kind, large]:7.1f}   ratio {ratio:.2f}x"
        )
    # what windowed inference must keep whatever the window: the outputs of both volumes and one
    # volume's running sums and weights (3 classes, float32)
    kept = {shape: (2 * 3 + 3 + 1) * math.prod(shape) * 4 / 2**20 for shape in SHAPES}
    beyond = {shape: rises["window", shape] - kept[shape] for shape in SHAPES}
    print(
        f"  window beyond its outputs: {small}: {beyond[small]:.1f}   {large}: "
        f"{beyond[large]:.1f}   (outputs {kept[small]:.0f} and {kept[large]:.0f})"
    )
    assert rises["train", large] < 1.3 * max(rises["train", small], 1.0), "training grew"
    assert beyond[large] < 1.5 * max(beyond[small], 8.0), "the window did not bound inference"
