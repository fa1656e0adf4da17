"""Bad image files are answered by name, never clipped or a traceback (issue 16, items 6 and 7):
every bit depth Pillow reads becomes [0, 1] by its real range, 16-bit masks keep their values,
an unreadable mode or a decompression bomb is one line naming the file, and `--seed -1` with a
real-data dataset is one line. Raw folders are built in tmp_path."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_bad_settings import one_line
from test_real_data import make_slice_source

from fedbench.engine.config import MAX_SEED
from fedbench_datasets.fundus import Fundus, read_pair
from fedbench_datasets.prostate import Prostate, read_slice_pair

GRADIENT = np.arange(256, dtype=np.uint8).reshape(16, 16)  # every 8-bit value once
ORIGINAL = GRADIENT.astype(np.float32) / np.float32(255)  # the gradient in [0, 1]
MASK = np.where(GRADIENT < 128, 0, 255).astype(np.uint8)  # 0 = prostate, 255 background


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG declaring width x height 8-bit grey pixels with almost no data: a tiny file that
    Pillow's decompression-bomb check refuses on opening, before decoding anything."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


def stored_in(mode: str) -> Image.Image:
    """GRADIENT in `mode`, at that mode's full range (16 bits: x * 257, float: x / 255)."""
    wide = GRADIENT.astype(np.uint16) * 257
    builders = {
        "I;16": lambda: Image.fromarray(wide),
        "I;16B": lambda: Image.fromarray(wide.astype(">u2")),
        "I": lambda: Image.fromarray(wide.astype(np.int32)),
        "F": lambda: Image.fromarray(ORIGINAL),
    }
    return builders.get(mode, lambda: Image.fromarray(GRADIENT).convert(mode))()


def save_mode(path: Path, mode: str) -> Path:
    stored_in(mode).save(path)
    assert Image.open(path).mode == mode, "the file holds the mode under test"
    return path


def write_mask(path: Path, values: np.ndarray, sixteen_bit: bool = False) -> Path:
    stored = values.astype(np.uint16) if sixteen_bit else values.astype(np.uint8)
    Image.fromarray(stored).save(path)
    return path


# --- every bit depth is read by its real range ------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [
        ("L", "png"),
        ("I;16", "png"),
        ("I;16B", "tif"),
        ("I", "tif"),
        ("F", "tif"),
        ("RGB", "png"),
        ("RGBA", "png"),
        ("LA", "png"),
        ("P", "png"),
    ],
)
def test_every_bit_depth_reads_into_0_1_by_its_real_range(mode, suffix, tmp_path):
    image_path = save_mode(tmp_path / f"image.{suffix}", mode)
    mask_path = write_mask(tmp_path / "mask.png", MASK)
    problems: list[str] = []
    image, prostate = read_slice_pair(image_path, mask_path, problems)
    assert problems == []
    # the readers keep the 8-bit scale 8-bit files always had: exactly the 8-bit gradient
    np.testing.assert_array_equal(image, GRADIENT.astype(np.float32))
    np.testing.assert_array_equal(prostate, MASK == 0)
    rgb, _ = read_pair(image_path, write_mask(tmp_path / "fmask.png", MASK), problems)
    assert problems == []
    np.testing.assert_array_equal(rgb, np.repeat(GRADIENT[..., None], 3, axis=2))


def test_a_16_bit_prostate_source_prepares_exactly_like_its_8_bit_original(tmp_path):
    eight = make_slice_source(tmp_path / "eight", sites=("RUNMC",))
    sixteen = tmp_path / "sixteen"
    shutil.copytree(eight, sixteen)
    for path in (sixteen / "RUNMC").rglob("image/*.png"):
        wide = np.asarray(Image.open(path)).astype(np.uint16) * 257
        Image.fromarray(wide).save(path)
    cfg = {**Prostate.defaults, "size": 32, "sites": ["RUNMC"]}
    before = Prostate().scan(eight, cfg).sites["RUNMC"]["image"]
    after = Prostate().scan(sixteen, cfg)
    assert after.problems == []
    np.testing.assert_array_equal(after.sites["RUNMC"]["image"], before)


def fundus_source(root: Path, image: Image.Image, mask: np.ndarray, sixteen: bool) -> Path:
    folder = root / "Domain1" / "train" / "ROIs"
    for kind in ("image", "mask"):
        (folder / kind).mkdir(parents=True)
    image.save(folder / "image" / "a.png")
    write_mask(folder / "mask" / "a.png", mask, sixteen)
    return root


def test_a_16_bit_fundus_crop_prepares_exactly_like_its_8_bit_original(tmp_path):
    mask = np.full((16, 16), 255)
    mask[4:12, 4:12], mask[6:10, 6:10] = 128, 0  # rim around a cup
    wide = Image.fromarray(GRADIENT.astype(np.uint16) * 257)
    cfg = {**Fundus.defaults, "size": 16, "sites": ["Domain1"]}
    eight = Fundus().scan(
        fundus_source(tmp_path / "8", Image.fromarray(GRADIENT), mask, False), cfg
    )
    sixteen = Fundus().scan(fundus_source(tmp_path / "16", wide, mask, True), cfg)
    assert sixteen.problems == [] and eight.problems == []
    for key in ("image", "mask"):
        np.testing.assert_array_equal(sixteen.sites["Domain1"][key], eight.sites["Domain1"][key])
    assert sixteen.sites["Domain1"]["image"].max() == 255  # not clipped, not crushed


def test_16_bit_masks_keep_their_label_values(tmp_path):
    image_path = save_mode(tmp_path / "image.png", "L")
    stray = MASK.astype(np.uint16)
    stray[0, 0] = 1000  # a label that clipping to 8 bits would turn into background
    problems: list[str] = []
    mask_path = write_mask(tmp_path / "mask.png", stray, sixteen_bit=True)
    assert read_slice_pair(image_path, mask_path, problems) is None
    assert problems == [f"{mask_path}: mask is not binary (values [1000] besides 0/255)"]
    problems.clear()
    assert read_pair(image_path, mask_path, problems) is None
    assert problems == [f"{mask_path}: mask holds values [1000] besides 0/128/255"]


# --- what cannot be read is one line naming the file ---------------------------------------


def test_a_mode_that_cannot_be_read_names_the_file(tmp_path):
    lab = tmp_path / "lab.png"  # a TIFF named .png: Pillow opens it by its content
    Image.new("LAB", (16, 16)).save(lab, format="TIFF")
    mask_path = write_mask(tmp_path / "mask.png", MASK)
    problems: list[str] = []
    assert read_slice_pair(lab, mask_path, problems) is None
    assert problems == [f"{lab}: unreadable image or mask (mode 'LAB' cannot be read as grey)"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.full((16, 16), 1000.0), "float image values span [1000, 1000], outside [0, 1]"),
        (np.full((16, 16), np.nan), "float image holds NaN or infinite values"),
    ],
)
def test_a_float_image_outside_0_1_names_the_file(values, message, tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(values.astype(np.float32)).save(path)
    problems: list[str] = []
    assert read_slice_pair(path, write_mask(tmp_path / "mask.png", MASK), problems) is None
    assert problems == [f"{path}: unreadable image or mask ({message})"]


def test_a_32_bit_integer_image_beyond_16_bits_names_the_file(tmp_path):
    path = tmp_path / "wide.tif"
    Image.fromarray(np.full((16, 16), 70000, dtype=np.int32)).save(path)
    problems: list[str] = []
    assert read_pair(path, write_mask(tmp_path / "mask.png", MASK), problems) is None
    assert problems == [
        f"{path}: unreadable image or mask (32-bit integer values span [70000, 70000], "
        "outside 0..65535)"
    ]


@pytest.mark.parametrize("reader", [read_slice_pair, read_pair])
def test_a_decompression_bomb_is_one_problem_with_its_size(reader, tmp_path):
    bomb = png_header_only(tmp_path / "bomb.png", 15000, 15000)
    problems: list[str] = []
    assert reader(bomb, write_mask(tmp_path / "mask.png", MASK), problems) is None
    (line,) = problems
    assert line.startswith(f"{bomb}: image of 15000x15000 pixels is too large to decode")


def test_a_bomb_that_is_not_a_png_still_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "big.tif"
    Image.fromarray(GRADIENT).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 256 pixels > twice that: refused
    problems: list[str] = []
    assert read_pair(path, write_mask(tmp_path / "mask.png", MASK), problems) is None
    assert problems == [
        f"{path}: image too large to decode safely (Image size (256 pixels) exceeds limit of "
        "100 pixels, could be decompression bomb DOS attack.)"
    ]


def test_a_run_on_a_bomb_is_one_line_and_writes_nothing(tmp_path):
    source = make_slice_source(tmp_path / "raw", sites=("RUNMC", "BMC"))
    bomb = png_header_only(source / "BMC" / "train" / "image" / "00_01.png", 15000, 15000)
    args = ["run", "--dataset", "prostate", "--method", "fedavg", "--preset", "quick"]
    sites = ["--set", "data.sites=RUNMC,BMC", "--set", f"data.path={source}"]
    line = one_line([*args, *sites], tmp_path / "results")
    assert line.startswith(f"error: {bomb}: image of 15000x15000 pixels is too large to decode")
    assert not (tmp_path / "results" / "cache").exists() or not list(
        (tmp_path / "results" / "cache").rglob("*.npz")
    )


# --- --seed -1 with the real-data datasets --------------------------------------------------


def test_a_negative_seed_with_prostate_is_one_line(tmp_path):
    source = make_slice_source(tmp_path / "raw", sites=("RUNMC", "BMC"))
    args = ["run", "--dataset", "prostate", "--method", "fedavg", "--preset", "quick"]
    sites = ["--set", "data.sites=RUNMC,BMC", "--set", f"data.path={source}"]
    line = one_line([*args, *sites, "--seed", "-1"], tmp_path / "results")
    assert line == f"error: seed must be an integer from 0 to {MAX_SEED}, got -1"
