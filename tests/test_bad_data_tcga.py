"""Bad Fed-TCGA-BRCA CSV files are one line naming the file, the column and the first bad row's
patient, with a non-zero exit and before any training (issue 16, items 6, 7 and 10): blank,
infinite or negative times, events other than 0/1, repeated patients, non-numeric or NaN
features, a centers.csv without its `TSS Code` column, a malformed row; and `--seed -1`."""

from __future__ import annotations

import csv
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from test_bad_settings import one_line
from test_tcga import TCGA

from fedbench.engine.config import MAX_SEED
from fedbench.errors import FedbenchError
from fedbench_datasets.fed_tcga_brca import CENTRES, NUM_FEATURES, FedTcgaBrca

CODES = [f"C{k}" for k in range(len(CENTRES))]  # one tissue-source code per centre
CENTERS_HEADER = ["TSS Code", "Source Site", "Country", "State", "Region"]
RUN = ["run", "--dataset", "fed-tcga-brca", "--method", "fedavg", "--preset", "quick"]


def write_rows(path: Path, rows: list[list[object]]) -> None:
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def write_tcga(folder: Path, train: int = 5, test: int = 2) -> Path:
    """FLamby's three CSV files for six tiny centres, every patient mapped to its region."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    header = ["pid", *(f"f{i}" for i in range(NUM_FEATURES)), "E", "T"]
    brca, split = [header], [["pid", "fold", "fold2"]]
    for k, code in enumerate(CODES):
        for i in range(train + test):
            pid, part = f"TCGA-{code}-{i:04d}", "train" if i < train else "test"
            brca.append([pid, *rng.integers(0, 3, NUM_FEATURES), i % 2, 100 + 10 * i + k])
            split.append([pid, part, f"{part}_{k}"])
    write_rows(folder / "brca.csv", brca)
    write_rows(folder / "train_test_split.csv", split)
    centers = [[code, "a site", "a country", "", region] for code, region in zip(CODES, CENTRES)]
    write_rows(folder / "centers.csv", [CENTERS_HEADER, *centers])
    return folder


def set_cell(path: Path, row: int, column: str, value: str) -> None:
    """Data row `row` (1 = the first after the header) of `column` set to `value`."""
    rows = read_rows(path)
    rows[row][rows[0].index(column)] = value
    write_rows(path, rows)


def patient(row: int) -> str:
    """The patient at data row `row` of write_tcga's brca.csv (centre 0 comes first)."""
    return f"TCGA-C0-{row - 1:04d}"


def cell(column: str, row: int, what: str) -> str:
    return f"brca.csv: column '{column}', row {row} (patient {patient(row)}): {what}"


def rename_tss_code(folder: Path) -> None:
    rows = read_rows(folder / "centers.csv")
    rows[0][0] = "Code"
    write_rows(folder / "centers.csv", rows)


def malformed_row(folder: Path) -> None:
    rows = read_rows(folder / "brca.csv")
    rows[3].append("1")
    write_rows(folder / "brca.csv", rows)


def numeric_patient_ids(folder: Path) -> None:
    """Numbers for ids in both files, so that pandas reads the pid columns as integers."""
    for name in ("brca.csv", "train_test_split.csv"):
        rows = read_rows(folder / name)
        for i, row in enumerate(rows[1:]):
            row[0] = str(1000 + i)
        write_rows(folder / name, rows)


def repeated_patient(folder: Path) -> None:
    set_cell(folder / "brca.csv", 4, "pid", patient(3))


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "blank time": (lambda f: set_cell(f / "brca.csv", 3, "T", ""), cell("T", 3, "blank or NaN")),
    "infinite time": (
        lambda f: set_cell(f / "brca.csv", 3, "T", "inf"),
        cell("T", 3, "inf is not finite"),
    ),
    "negative time": (
        lambda f: set_cell(f / "brca.csv", 2, "T", "-5"),
        cell("T", 2, "time must be >= 0, got -5"),
    ),
    "event 2": (
        lambda f: set_cell(f / "brca.csv", 3, "E", "2"),
        cell("E", 3, "event must be 0 or 1, got 2"),
    ),
    "non-numeric feature": (
        lambda f: set_cell(f / "brca.csv", 5, "f7", "high"),
        cell("f7", 5, "'high' is not a number"),
    ),
    "NaN feature": (
        lambda f: set_cell(f / "brca.csv", 4, "f0", "nan"),
        cell("f0", 4, "blank or NaN"),
    ),
    "blank feature": (
        lambda f: set_cell(f / "brca.csv", 2, "f38", ""),
        cell("f38", 2, "blank or NaN"),
    ),
    "repeated patient": (
        repeated_patient,
        f"brca.csv: column 'pid', row 4: patient {patient(3)} appears again (first at row 3)",
    ),
    "numeric patient ids": (
        numeric_patient_ids,
        "brca.csv: column 'pid', row 1: 1000 is not a patient id (TCGA-SS-PPPP)",
    ),
    "blank patient id": (
        lambda f: set_cell(f / "brca.csv", 2, "pid", ""),
        "brca.csv: column 'pid', row 2: blank",
    ),
    "repeated split row": (
        lambda f: set_cell(f / "train_test_split.csv", 2, "pid", patient(1)),
        f"train_test_split.csv: column 'pid', row 2: patient {patient(1)} appears again "
        "(first at row 1)",
    ),
    "centers.csv without TSS Code": (
        rename_tss_code,
        "centers.csv: no column 'TSS Code' (columns: Code, Source Site, Country, State, Region)",
    ),
    "malformed row": (
        malformed_row,
        "brca.csv: unreadable CSV (Error tokenizing data. C error: Expected 42 fields in line 4, "
        "saw 43)",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_tcga_csv_is_one_line_naming_file_column_and_row(case, tmp_path):
    folder = write_tcga(tmp_path / "tcga")
    corrupt, message = CASES[case]
    corrupt(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    line = one_line([*RUN, "--set", f"data.path={folder}"], tmp_path / "results")
    assert line == f"error: {folder}/{message}"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before, "inputs untouched"
    assert not (tmp_path / "results" / "cache").exists() or not list(
        (tmp_path / "results" / "cache").rglob("*.pt")
    ), "nothing trained"


def test_the_tiny_folder_itself_loads(tmp_path):
    data = FedTcgaBrca().load(
        {"path": str(write_tcga(tmp_path / "tcga")), "val_fraction": 0.1}, 0, tmp_path
    )
    assert [s.name for s in data.sites] == list(CENTRES)
    assert all(len(s.test) == 2 for s in data.sites)


def test_a_nan_feature_in_the_real_file_is_named_before_training(tmp_path):
    if not TCGA.is_dir():
        pytest.skip("../shared/data/flamby/fed_tcga_brca is not present")
    folder = tmp_path / "tcga"
    shutil.copytree(TCGA, folder)
    rows = read_rows(folder / "brca.csv")
    rows[10][5] = "nan"
    write_rows(folder / "brca.csv", rows)
    with pytest.raises(FedbenchError) as caught:
        FedTcgaBrca().load({"path": str(folder), "val_fraction": 0.1}, 0, tmp_path)
    where = f"column '{rows[0][5]}', row 10 (patient {rows[10][0]})"
    assert str(caught.value) == f"{folder / 'brca.csv'}: {where}: blank or NaN"


def test_a_negative_seed_with_fed_tcga_brca_is_one_line(tmp_path):
    folder = write_tcga(tmp_path / "tcga")
    line = one_line([*RUN, "--set", f"data.path={folder}", "--seed", "-1"], tmp_path / "res")
    assert line == f"error: seed must be an integer from 0 to {MAX_SEED}, got -1"
