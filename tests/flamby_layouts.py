"""Small files in the on-disk layouts FLamby's volumetric datasets read (their data are not here
and cannot be downloaded): Fed-IXI's folders and zip, and Fed-KiTS19's nnU-Net-preprocessed case
files with their plans. Each case holds a known answer: a box of foreground (an ellipsoid for
IXI) in noise, so a test can check what the bridge reads."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import nibabel
import numpy as np
import pandas as pd

IXI_FOLDER = "7kd5wj7v7p-3"  # FLamby's FOLDER, from its download URL
IXI_CENTRES = ("Guys", "HH", "IOP")


def flamby_dataset_dir(module: str) -> Path:
    import flamby.datasets

    return Path(os.path.realpath(flamby.datasets.__file__)).parent / module


def ixi_patients(train: int, test: int) -> dict[str, list[int]]:
    """Patient IDs from FLamby's own metadata, `train` of its train split and `test` of its
    test split for each centre (FLamby takes the split from there, the centre from the name)."""
    metadata = pd.read_csv(flamby_dataset_dir("fed_ixi") / "metadata" / "metadata_tiny.csv")
    ids = {
        s: metadata.loc[metadata["Split"] == s, "Patient ID"].tolist() for s in ("train", "test")
    }
    return {
        centre: ids["train"][c * train : (c + 1) * train] + ids["test"][c * test : (c + 1) * test]
        for c, centre in enumerate(IXI_CENTRES)
    }


def ellipsoid(shape: tuple[int, ...], radii: tuple[float, ...]) -> np.ndarray:
    axes = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    return (sum((a / r) ** 2 for a, r in zip(axes, radii)) <= 1).astype(np.uint8)


def write_ixi(root: Path, train: int = 3, test: int = 2, shape=(40, 50, 40)) -> dict:
    """Fed-IXI's layout under `root`: subject folders (FLamby lists them) and the zip it reads
    the volumes from. Returns {centre: [patient ids]}."""
    patients = ixi_patients(train, test)
    rng = np.random.default_rng(0)
    sample = root / IXI_FOLDER / "IXI_sample"
    with zipfile.ZipFile(root / f"{IXI_FOLDER}.zip", "w") as archive:
        for centre, ids in patients.items():
            for pid in ids:
                subject = f"IXI{pid:03d}-{centre}-{1000 + pid}"
                mask = ellipsoid(shape, (14, 18, 14))
                image = mask * 300.0 + rng.normal(100, 20, shape)
                for kind, array, suffix in (("T1", image, "image"), ("label", mask, "label")):
                    folder = sample / subject / kind
                    folder.mkdir(parents=True)
                    path = folder / f"{subject}_{suffix}.nii.gz"
                    nibabel.save(nibabel.Nifti1Image(array.astype(np.float32), np.eye(4)), path)
                    archive.write(path, path.relative_to(root).as_posix())
    return patients


def kits_cases() -> pd.DataFrame:
    return pd.read_csv(flamby_dataset_dir("fed_kits19") / "metadata" / "thresholded_sites.csv")


KITS_SPACING = (3.0, 0.8, 0.8)
KITS_PATCH = (16, 32, 32)


def kits_case(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """An nnU-Net case array [image, label]: a kidney box with a tumour inside, -1 outside."""
    label = np.zeros(shape, dtype=np.float32)
    label[4:-4, 8:-8, 8:-8] = 1
    label[6:10, 12:20, 12:20] = 2
    label[:, :2] = -1  # outside nnU-Net's crop
    image = label * 1.5 + rng.normal(0, 0.3, shape)
    return np.stack([image, label]).astype(np.float32)


def write_kits(base: Path, shapes=((20, 40, 40), (18, 44, 36))) -> None:
    """Fed-KiTS19's preprocessed layout under `base` for every case FLamby lists (shapes
    alternate), and the plans FLamby reads its patch size from."""
    task = base / "kits19_preprocessing" / "Task064_KiTS_labelsFixed"
    stage = task / "nnUNetData_plans_v2.1_stage0"
    stage.mkdir(parents=True)
    plans = {"plans_per_stage": {0: {"patch_size": list(KITS_PATCH)}}}
    (task / "nnUNetPlansv2.1_plans_3D.pkl").write_bytes(pickle.dumps(plans))
    rng = np.random.default_rng(0)
    for i, case in enumerate(kits_cases()["case_ids"]):
        np.savez(stage / f"{case}.npz", data=kits_case(rng, shapes[i % len(shapes)]))
        properties = {"spacing_after_resampling": KITS_SPACING, "class_locations": {}}
        (stage / f"{case}.pkl").write_bytes(pickle.dumps(properties))
