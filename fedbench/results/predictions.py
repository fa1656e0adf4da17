"""A few predictions per site kept by each run, so `fedbench show RUN_ID` can draw the image,
its ground truth and the run's prediction. Stored beside the records, in RESULTS/predictions."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from fedbench.errors import FedbenchError
from fedbench.results.record import safe_token
from fedbench.storage import write_atomic
from fedbench.task import predicted_labels

PER_SITE = 2

#: the kept predictions of a run, by (regime, site): image, truth and pred arrays
Kept = dict[tuple[str, str], dict[str, np.ndarray]]


def display_image(image: torch.Tensor, rgb: bool) -> np.ndarray:
    """[C, H, W] model input -> an array imshow draws: RGB for colour images, else the middle
    channel (the slice itself for 2.5D input), scaled to [0, 1]."""
    x = image.permute(1, 2, 0) if rgb and image.shape[0] == 3 else image[image.shape[0] // 2]
    x = x.float()
    low, high = float(x.min()), float(x.max())
    return ((x - low) / (high - low if high > low else 1.0)).cpu().numpy()


def pick(targets: torch.Tensor, count: int) -> list[int]:
    """Up to `count` sample indices spread over the split, preferring samples with foreground."""
    has_fg = targets.flatten(1).any(1).nonzero().flatten().tolist()
    pool = has_fg or list(range(len(targets)))
    step = max(1, len(pool) // max(count, 1))
    return pool[::step][:count]


def keep(
    inputs: torch.Tensor, targets: torch.Tensor, outputs: torch.Tensor, rgb: bool
) -> dict[str, np.ndarray]:
    """The examples of one site: images, truths and argmax predictions of a few samples."""
    chosen = pick(targets, PER_SITE)
    return {
        "image": np.stack([display_image(inputs[i], rgb) for i in chosen]),
        "truth": targets[chosen].cpu().numpy().astype(np.uint8),
        "pred": predicted_labels(outputs[chosen]).cpu().numpy().astype(np.uint8),
    }


def examples_path(results_dir: Path, run_id: str) -> Path:
    return Path(results_dir) / "predictions" / f"{safe_token(run_id)}.npz"


def save(results_dir: Path, run_id: str, examples: Kept) -> None:
    """Write every kept example into one .npz (temp file, then rename)."""
    flat = {
        f"{regime}|{site}|{key}": value
        for (regime, site), arrays in examples.items()
        for key, value in arrays.items()
    }
    write_atomic(
        examples_path(results_dir, run_id), lambda handle: np.savez_compressed(handle, **flat)
    )


def load(results_dir: Path, run_id: str) -> Kept | None:
    """The kept examples of a run by (regime, site), or None when the run kept none; a file
    that is not what `save` writes is one clear error naming it."""
    path = examples_path(results_dir, run_id)
    if not path.is_file():
        return None
    try:
        return unpack(read_archive(path))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise FedbenchError(
            f"kept predictions {path} are unreadable ({type(exc).__name__}); "
            "delete the file or run again"
        ) from None


def read_archive(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz (never a pickle); ValueError for a lone .npy array."""
    loaded = np.load(path)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError("a single array, not an .npz archive")
    with loaded as archive:
        return {name: archive[name] for name in archive.files}


def unpack(flat: dict[str, np.ndarray]) -> Kept:
    """'regime|site|key' arrays -> examples by (regime, site); ValueError for anything `save`
    does not write."""
    out: Kept = {}
    for name, value in flat.items():
        regime, site, key = name.split("|")
        out.setdefault((regime, site), {})[key] = value
    for arrays in out.values():
        check_site(arrays)
    return out


def check_site(arrays: dict[str, np.ndarray]) -> None:
    """One site's examples as `keep` makes them: N images ([H, W] or [H, W, 3]) and N truth
    and N predicted label maps ([H, W]), all numeric; else ValueError."""
    if sorted(arrays) != ["image", "pred", "truth"]:
        raise ValueError(f"image, truth and pred expected, found {', '.join(sorted(arrays))}")
    count = len(arrays["image"]) if arrays["image"].ndim else -1
    for key, value in arrays.items():
        dims = (3, 4) if key == "image" else (3,)
        if value.ndim not in dims or len(value) != count or value.dtype.kind not in "biuf":
            raise ValueError(f"{key} has shape {value.shape} and type {value.dtype}")
