"""`fed-tcga-brca`: FLamby's Fed-TCGA-BRCA survival benchmark, read from FLamby's three CSV files.

`data.path` holds `brca.csv` (pid, 39 features, E = event, T = time), `train_test_split.csv`
(pid, fold, fold2 = train_k / test_k) and `centers.csv` (tissue-source site -> region). Six
centres in FLamby's order: Northeast, South, West, Midwest, Europe, Canada; FLamby's static
train/test split; features as FLamby gives them (no scaling).

Validation: FLamby has none. `data.val_fraction` (default 0.1) of each centre's training patients
become val, drawn with the seed and stratified on the event so that a centre with at least two
training events keeps one event in val (one patient = one row, so this is a split by patient).
`data.val_fraction=0` keeps FLamby's training data whole; val then reuses the training split
(history and val-best show training fit, never test).

Model Linear(39 -> 1) giving a risk score; loss the negative Cox partial log-likelihood (Breslow
ties, log-sum-exp over risk sets, averaged over events); metric Harrell's concordance index
"c_index" (a pair is comparable when the earlier time is an event; a censored time equal to an
event time counts as later; tied risks count one half), as FLamby's lifelines call computes it
with the negated risk. The preset uses FLamby's published constants (BATCH_SIZE 8, LR 0.1, Adam,
NUM_EPOCHS_POOLED 30, get_nb_max_rounds(100) = 5 rounds). FLamby runs num_updates = 100 batches
per client per round; the engine counts epochs, so local_epochs = 30 / 5 = 6: every client
trains NUM_EPOCHS_POOLED epochs in all, and the mean client (866 / 6 / 8 = 18 batches per epoch)
makes 108 updates per round, close to 100. Differences from FLamby: the engine creates a fresh
Adam each round (FLamby keeps its moments), and every client runs the same epochs rather than the
same number of batches (Canada with 40 patients runs fewer steps, Northeast more).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fedbench.data import Dataset, FederatedData, Site, Split
from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.storage import stable_hash
from fedbench.task import Task
from fedbench_datasets.prepared import require_path, warn, write_split_file

if TYPE_CHECKING:  # torch loads with the data, not when `fedbench list` runs
    import torch
    from torch import nn

CENTRES = ("Northeast", "South", "West", "Midwest", "Europe", "Canada")
FILES = ("brca.csv", "train_test_split.csv", "centers.csv")
NUM_FEATURES = 39
# FLamby's published constants for Fed-TCGA-BRCA (flamby/datasets/fed_tcga_brca/common.py)
BATCH_SIZE, LR, NUM_EPOCHS_POOLED, N_TRAIN_POOLED = 8, 0.1, 30, 866


def nb_max_rounds(num_updates: int, batch_size: int = BATCH_SIZE) -> int:
    """FLamby's get_nb_max_rounds: rounds so that each client does about the pooled epochs."""
    return (N_TRAIN_POOLED // len(CENTRES) // batch_size) * NUM_EPOCHS_POOLED // num_updates


def cox_loss(risk: torch.Tensor, event: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood, Breslow ties, mean over events (0 without events).

    Sorted by decreasing time, the log of each risk set sum is a running log-sum-exp; tied
    times share the risk set that ends at the last member of their tie group.
    """
    import torch

    order = torch.argsort(time, descending=True, stable=True)
    risk, event, time = risk[order], event[order].to(risk.dtype), time[order]
    running = torch.logcumsumexp(risk, dim=0)
    ascending = (-time).contiguous()
    last = torch.searchsorted(ascending, ascending, right=True) - 1
    n_events = event.sum()
    if n_events == 0:
        return risk.sum() * 0.0
    return -((risk - running[last]) * event).sum() / n_events


def c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's concordance index of risk scores (NaN when no pair is comparable)."""
    t, e, r = (np.asarray(a, dtype=np.float64).ravel() for a in (time, event, risk))
    later = (t[:, None] < t[None, :]) | ((t[:, None] == t[None, :]) & (e[None, :] == 0))
    comparable = later & (e[:, None] == 1)
    pairs = comparable.sum()
    if pairs == 0:
        return float("nan")
    concordant = (comparable & (r[:, None] > r[None, :])).sum()
    tied = (comparable & (r[:, None] == r[None, :])).sum()
    return float((concordant + 0.5 * tied) / pairs)


class SurvivalTask(Task):
    """A linear Cox model: targets are (event, time) pairs, outputs one risk score each."""

    primary_metric = "c_index"
    dense_prediction = False
    pooled_test = True  # FLamby reports the C-index on all centres' test sets pooled

    def __init__(self, num_features: int = NUM_FEATURES) -> None:
        self.num_features = num_features

    def build_model(self, model_cfg: dict[str, Any]) -> nn.Module:
        from torch import nn

        return nn.Linear(self.num_features, 1)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cox_loss(outputs.reshape(-1), targets[:, 0], targets[:, 1])

    def score(
        self, outputs: torch.Tensor, targets: torch.Tensor, cases: torch.Tensor
    ) -> dict[str, float]:
        targets, risk = targets.detach().cpu().numpy(), outputs.detach().cpu().reshape(-1).numpy()
        return {"c_index": c_index(targets[:, 1], targets[:, 0], risk)}


def read_table(path: Path) -> Any:
    """brca.csv joined with FLamby's split; adds `centre` (int) and `part` (train/test)."""
    for name in FILES:
        if not (path / name).is_file():
            raise FedbenchError(f"{path / name}: missing (fed-tcga-brca needs {', '.join(FILES)})")
    brca, split = read_csv(path / "brca.csv"), read_csv(path / "train_test_split.csv")
    if brca.shape[1] != NUM_FEATURES + 3 or list(brca.columns[-2:]) != ["E", "T"]:
        raise FedbenchError(f"{path / 'brca.csv'}: expected pid, {NUM_FEATURES} features, E, T")
    check_brca(path / "brca.csv", brca)
    check_split(path / "train_test_split.csv", split)
    table = brca.merge(split, on="pid", how="inner")
    parts = table["fold2"].str.extract(r"^(train|test)_(\d+)$")
    if parts.isna().any().any():
        raise FedbenchError(f"{path / 'train_test_split.csv'}: fold2 must be train_K or test_K")
    table["part"], table["centre"] = parts[0], parts[1].astype(int)
    check_regions(path, table)
    return table


def check_regions(path: Path, table: Any) -> None:
    """Warn when centers.csv does not map centre k's patients to FLamby's k-th region."""
    centers = read_csv(path / "centers.csv")
    require_columns(path / "centers.csv", centers, ["TSS Code", "Region"])
    region = dict(zip(centers["TSS Code"], centers["Region"], strict=True))
    found = table["pid"].str.split("-").str[1].map(region)
    for k, name in enumerate(CENTRES):
        seen = set(found[table["centre"] == k].dropna())
        if seen != {name}:
            warn(f"{path / 'centers.csv'}: centre {k} holds regions {sorted(seen)}, not {name}")


def read_csv(file: Path) -> Any:
    """One CSV file as a table, or one error line naming it (pandas' own messages may end in a
    newline, which would split the error over two lines)."""
    import pandas as pd

    try:
        return pd.read_csv(file)
    except (OSError, ValueError) as exc:
        raise FedbenchError(f"{file}: unreadable CSV ({' '.join(str(exc).split())})") from None


def require_columns(file: Path, table: Any, names: list[str]) -> None:
    """One error naming the first column of `names` the table lacks, and those it has."""
    for name in names:
        if name not in table.columns:
            found = ", ".join(map(str, table.columns))
            raise FedbenchError(f"{file}: no column '{name}' (columns: {found})")


def check_patients(file: Path, table: Any) -> None:
    """Every row names a patient by a text id (its tissue-source code picks the region), and none
    twice: a repeated patient would be trained and scored twice."""
    import pandas as pd

    pids = table["pid"]
    named = pids.map(lambda pid: isinstance(pid, str) and pid.strip() != "").to_numpy(bool)
    if not named.all():
        row = int(np.flatnonzero(~named)[0])
        pid = pids.iloc[row]
        what = "blank" if pd.isna(pid) else f"{pid} is not a patient id (TCGA-SS-PPPP)"
        raise FedbenchError(f"{file}: column 'pid', row {row + 1}: {what}")
    repeated = np.flatnonzero(pids.duplicated().to_numpy())
    if len(repeated):
        row = int(repeated[0])
        first = int(np.flatnonzero((pids == pids.iloc[row]).to_numpy())[0])
        raise FedbenchError(
            f"{file}: column 'pid', row {row + 1}: patient {pids.iloc[row]} appears again "
            f"(first at row {first + 1})"
        )


def cell_error(file: Path, table: Any, column: str, row: int, what: str) -> FedbenchError:
    """The error for one bad value: the file, the column, the row (1 = first after the header)
    and its patient."""
    where = f"column '{column}', row {row + 1} (patient {table['pid'].iloc[row]})"
    return FedbenchError(f"{file}: {where}: {what}")


def finite_column(file: Path, table: Any, column: str) -> np.ndarray:
    """A column as finite floats, or one error at its first blank, non-numeric or infinite
    value (a NaN feature would otherwise look like the method diverging)."""
    import pandas as pd

    raw = table[column]
    values = pd.to_numeric(raw, errors="coerce").to_numpy(np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if not len(bad):
        return values
    row, value = int(bad[0]), values[bad[0]]
    if pd.isna(raw.iloc[row]):
        what = "blank or NaN"
    elif np.isnan(value):
        what = f"{raw.iloc[row]!r} is not a number"
    else:
        what = f"{value:g} is not finite"
    raise cell_error(file, table, column, row, what)


def check_brca(file: Path, brca: Any) -> None:
    """brca.csv holds what a Cox model can use: one row per patient, finite numeric features,
    events 0 or 1 and times >= 0; else one error naming the first bad value."""
    require_columns(file, brca, ["pid"])
    check_patients(file, brca)
    for column in brca.columns[1:-2]:
        finite_column(file, brca, column)
    events, times = finite_column(file, brca, "E"), finite_column(file, brca, "T")
    first_breaking(file, brca, "E", events, ~np.isin(events, (0, 1)), "event must be 0 or 1")
    first_breaking(file, brca, "T", times, times < 0, "time must be >= 0")


def first_breaking(
    file: Path, table: Any, column: str, values: np.ndarray, bad: np.ndarray, rule: str
) -> None:
    """One error at the first value of `column` flagged `bad`, saying the rule it breaks."""
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise cell_error(file, table, column, row, f"{rule}, got {values[row]:g}")


def check_split(file: Path, split: Any) -> None:
    """train_test_split.csv names each patient once, with its fold."""
    require_columns(file, split, ["pid", "fold2"])
    check_patients(file, split)


def carve_val(events: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of the training patients moved to val, stratified on the event."""
    val = np.zeros(len(events), dtype=bool)
    if fraction <= 0:
        return val
    with_event, censored = np.flatnonzero(events == 1), np.flatnonzero(events == 0)
    n_val = max(1, round(fraction * len(events)))
    n_event = min(len(with_event) - 1, max(1, round(fraction * len(with_event))))
    n_event = n_event if len(with_event) >= 2 else 0
    n_censored = min(max(0, n_val - n_event), max(0, len(censored) - 1))
    val[rng.permutation(with_event)[:n_event]] = True
    val[rng.permutation(censored)[:n_censored]] = True
    return val


def to_split(rows: Any, features: list[str]) -> Split:
    import torch

    x = torch.tensor(rows[features].to_numpy(np.float32))
    y = torch.tensor(rows[["E", "T"]].to_numpy(np.float32))
    return Split(x, y, torch.arange(len(rows)))


class FedTcgaBrca(Dataset):
    """Six TCGA-BRCA centres, Cox survival, C-index (FLamby's benchmark)."""

    name = "fed-tcga-brca"
    model = "dataset-baseline"
    description = "FLamby Fed-TCGA-BRCA: 6 centres, Cox model, C-index; needs data.path"
    defaults: ClassVar[dict[str, Any]] = {"path": None, "val_fraction": 0.1}

    def preset(self, preset: str) -> dict[str, Any]:
        rounds = nb_max_rounds(100)
        train = {
            "rounds": rounds,
            "local_epochs": NUM_EPOCHS_POOLED // rounds,
            "batch_size": BATCH_SIZE,
            "lr": LR,
            "optimizer": "adam",
        }
        if preset == "quick":
            train.update(rounds=2, local_epochs=2)
        return {"train": train, "eval": {"batch_size": 1024}}

    def site_names(self, cfg: dict[str, Any]) -> list[str] | None:
        return list(CENTRES)

    def load(self, cfg: dict[str, Any], seed: int, cache_dir: Path) -> FederatedData:
        path = require_path(cfg, self.name)
        table = read_table(path)
        features = list(table.columns[1 : NUM_FEATURES + 1])
        fraction = float(cfg["val_fraction"])
        if not 0 <= fraction < 1:
            raise FedbenchError(f"setting data.val_fraction must be in [0, 1), got {fraction}")
        sites, record = [], {}
        for k, name in enumerate(CENTRES):
            train = table[(table["centre"] == k) & (table["part"] == "train")]
            test = table[(table["centre"] == k) & (table["part"] == "test")]
            if train.empty or test.empty:
                raise FedbenchError(f"{path}: centre {k} ({name}) has an empty train or test split")
            val = carve_val(train["E"].to_numpy(), fraction, np.random.default_rng([seed, k]))
            val_rows = train[val] if val.any() else train
            sites.append(
                Site(
                    name,
                    to_split(train[~val], features),
                    to_split(val_rows, features),
                    to_split(test, features),
                )
            )
            record[name] = {
                "train": sorted(train[~val]["pid"]),
                "val": sorted(val_rows["pid"]),
                "test": sorted(test["pid"]),
                "val_reuses_train": not val.any(),
            }
        directory = Path(cache_dir) / "datasets" / f"{self.name}-{stable_hash(str(path))[:8]}"
        payload = {"dataset": self.name, "seed": seed, "val_fraction": fraction, "sites": record}
        write_split_file(directory, f"seed{seed}-val{fraction:g}", payload)
        return FederatedData(self.name, sites, SurvivalTask(len(features)))


@hookimpl
def fedbench_datasets() -> list[type]:
    return [FedTcgaBrca]
