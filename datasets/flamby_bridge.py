"""FLamby bridge: each dataset of an installed `flamby` package appears here, found without
importing FLamby (`fedbench list` stays fast); a dataset's module is imported when it is used.

Names: `flamby-` + FLamby's folder name without its `fed_` prefix, underscores as hyphens
(flamby/datasets/fed_tcga_brca -> `flamby-tcga-brca`, fed_heart_disease ->
`flamby-heart-disease`); FLamby's own module name (`fed_tcga_brca`) is accepted as well. Sites
and metric are named from SITES_AND_METRIC for the modules whose centres FLamby documents
(Fed-TCGA-BRCA's are the built-in fed-tcga-brca's, so both land on one board), else center0..
and "flamby_metric".

What fedbench takes from FLamby: each centre's train and test sets from `FedXxx(center=i,
train=...)` (materialised into tensors; items must be fixed-shape (X, y) pairs), the model
`Baseline()`, the loss `BaselineLoss()` and `metric(y_true, y_pred)` on the raw model outputs
(NaN, with one warning, where it raises on a split: lifelines' C-index without a comparable
pair). The preset holds FLamby's constants: batch size, LR, optimizer (Adam, AdamW or SGD;
others fall back to Adam with a warning), rounds = get_nb_max_rounds(100) and local_epochs =
NUM_EPOCHS_POOLED / rounds (the engine counts epochs, FLamby 100 batches).

Validation: FLamby has none. `data.val_fraction` of each centre's training samples, drawn with
the seed and stratified on the discrete parts of the label (a class, TCGA's event flag), so val
holds every label of two or more samples; `data.val_fraction=0` means no validation split (its
scores are NaN; under eval.val_best each site keeps its last model).

FLamby's output and questions: what FLamby prints goes to stderr (`--json` stays JSON). Its
licence question on stdin (Fed-TCGA-BRCA asks on first use) is answered on a terminal; without
one it is one error line naming `fedbench datasets accept-licence NAME`, which records the
acceptance as FLamby does (the file dataset_creation_scripts/license_agreement_<module> in
FLamby's folder of that dataset). A dataset that cannot load (extras missing, a library version
FLamby was not written for, data not downloaded or generated) stays listed; using it is one
error line saying why and what to do.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import pkgutil
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from fedbench.data import Dataset, FederatedData, Site, Split
from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.task import Task
from fedbench_datasets.fed_tcga_brca import CENTRES as TCGA_CENTRES
from fedbench_datasets.flamby_support import (
    carve_val,
    flamby_io,
    import_line,
    label_strata,
    library_shims,
    materialise,
    one_line,
)
from fedbench_datasets.prepared import warn

if TYPE_CHECKING:  # torch loads with the data, not when `fedbench list` runs
    import torch
    from torch import nn

T = TypeVar("T")
CONTRACT = (
    "NUM_CLIENTS",
    "BATCH_SIZE",
    "LR",
    "Optimizer",
    "NUM_EPOCHS_POOLED",
    "get_nb_max_rounds",
    "Baseline",
    "BaselineLoss",
    "metric",
)
#: FLamby module -> (its centres in FLamby's order, the name its metric is reported under)
SITES_AND_METRIC: dict[str, tuple[tuple[str, ...], str]] = {
    "fed_tcga_brca": (TCGA_CENTRES, "c_index"),
    "fed_heart_disease": (("Cleveland", "Hungary", "Switzerland", "VA-Long-Beach"), "accuracy"),
    "fed_camelyon16": (("RUMC", "UMCU"), "auc"),
    "fed_ixi": (("Guys", "HH", "IOP"), "dice"),
    "fed_lidc_idri": (("GE", "Philips", "Siemens", "Toshiba"), "dice"),
    "fed_isic2019": (
        ("BCN", "HAM_vidir_molemax", "HAM_vidir_modern", "HAM_rosendahl", "MSK", "HAM_vienna_dias"),
        "balanced_accuracy",
    ),
}
FALLBACK_METRIC = "flamby_metric"
#: FLamby modules of volumes, which `flamby_volumes` serves as 3D tasks
VOLUMETRIC = frozenset({"fed_ixi", "fed_kits19"})


class WrappedTask(Task):
    """A task from parts: a model factory, a loss module and a numpy metric -> scalar."""

    dense_prediction = False
    pooled_test = True  # FLamby's headline figure: all centres' test sets pooled

    def __init__(
        self,
        model_factory: Callable[[], nn.Module],
        loss: nn.Module,
        metric: Callable[[np.ndarray, np.ndarray], float],
        metric_name: str,
    ) -> None:
        self.model_factory, self._loss, self.metric = model_factory, loss, metric
        self.primary_metric = metric_name
        self.warned: set[str] = set()

    def build_model(self, model_cfg: dict[str, Any]) -> nn.Module:
        return self.model_factory()

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._loss(outputs, targets)

    def score(
        self, outputs: torch.Tensor, targets: torch.Tensor, cases: torch.Tensor
    ) -> dict[str, float]:
        return {self.primary_metric: self.metric_or_nan(outputs, targets)}

    def metric_or_nan(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        """FLamby's metric on one split; NaN where it cannot score it (an empty split, or an
        error such as no comparable pair), with one warning per reason."""
        if len(targets) == 0:
            return float("nan")
        truth, predicted = targets.detach().cpu().numpy(), outputs.detach().cpu().numpy()
        try:
            with contextlib.redirect_stdout(sys.stderr):
                return float(self.metric(truth, predicted))
        except Exception as exc:
            reason = one_line(exc)
            if reason not in self.warned:
                self.warned.add(reason)
                warn(f"FLamby's metric cannot score {len(truth)} samples ({reason}): nan")
            return float("nan")


def fed_class(module: ModuleType) -> type | None:
    """The module's FedXxx dataset class (FedClass when it exports that alias)."""
    if isinstance(getattr(module, "FedClass", None), type):
        return module.FedClass
    for attr in dir(module):
        value = getattr(module, attr)
        if attr.startswith("Fed") and isinstance(value, type):
            return value
    return None


def flamby_dataset_name(module: str) -> str:
    """fed_tcga_brca -> flamby-tcga-brca."""
    return "flamby-" + module.removeprefix("fed_").replace("_", "-")


def flamby_modules() -> dict[str, Path]:
    """FLamby's dataset packages (fed_* folders of flamby.datasets) and their folders, found
    on disk: neither flamby nor any dataset module is imported."""
    try:
        spec = importlib.util.find_spec("flamby")
    except (ImportError, ValueError):  # not installed, or hidden
        return {}
    roots = [Path(p) / "datasets" for p in (spec.submodule_search_locations or [])] if spec else []
    found: dict[str, Path] = {}
    for info in pkgutil.iter_modules([str(r) for r in roots if r.is_dir()]):
        if info.ispkg and info.name.startswith("fed_"):
            found.setdefault(info.name, Path(info.module_finder.path) / info.name)
    return found


def import_flamby_module(dataset: str, module: str) -> ModuleType:
    """FLamby's dataset module, imported now, or one error line saying why it cannot be used."""
    try:
        with flamby_io(dataset), library_shims():
            loaded = importlib.import_module(f"flamby.datasets.{module}")
    except ImportError as exc:
        raise FedbenchError(import_line(dataset, module, exc)) from None
    except FedbenchError:
        raise
    except Exception as exc:
        raise FedbenchError(
            f"{dataset}: FLamby's {module} failed to import: {one_line(exc)}"
        ) from None
    missing = [a for a in CONTRACT if not hasattr(loaded, a)]
    missing += [] if fed_class(loaded) is not None else ["a FedXxx class"]
    if missing:
        raise FedbenchError(
            f"{dataset}: FLamby's {module} lacks {', '.join(missing)} of FLamby's dataset "
            "contract; fedbench cannot use it"
        )
    return loaded


class FlambyDataset(Dataset):
    """One FLamby dataset; subclasses made by `dataset_class` name its module and folder."""

    model = "dataset-baseline"

    module_name: ClassVar[str]
    folder: ClassVar[Path]
    aliases: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict[str, Any]] = {"path": None, "val_fraction": 0.1}

    @property
    def module(self) -> ModuleType:
        return import_flamby_module(self.name, self.module_name)

    def call(self, run: Callable[[], T], where: str) -> T:
        """Run FLamby code (its output to stderr); what it raises is one error line."""
        try:
            with flamby_io(self.name):
                return run()
        except FedbenchError:
            raise
        except SystemExit:  # FLamby's answer to a "no" on its licence question
            raise FedbenchError(
                f"{where}: FLamby stopped: its data terms were not accepted"
            ) from None
        except FileNotFoundError as exc:
            raise FedbenchError(self.no_data_line(exc)) from None
        except Exception as exc:
            raise FedbenchError(f"{where}: {one_line(exc)}") from None

    def no_data_line(self, exc: Exception) -> str:
        """FLamby finds no data: its config file is written by the dataset's download script."""
        m = self.module_name
        how = f"create it: python -m flamby.datasets.{m}.dataset_creation_scripts.download"
        how += " --output-folder DIR"
        if not (self.folder / "dataset_creation_scripts" / "download.py").is_file():
            how = "download it"
        readme = f"see flamby/datasets/{m}/README.md"
        return f"{self.name}: FLamby has no data for {m} ({one_line(exc)}); {how} ({readme})"

    def preset(self, preset: str) -> dict[str, Any]:
        m = self.module
        rounds = max(1, int(self.call(lambda: m.get_nb_max_rounds(100), self.name)))
        optimizer = {"Adam": "adam", "AdamW": "adamw", "SGD": "sgd"}.get(m.Optimizer.__name__)
        if optimizer is None:
            used = m.Optimizer.__name__
            warn(f"{self.name}: FLamby uses {used}; fedbench offers adam, adamw or sgd")
        train = {
            "rounds": rounds,
            "local_epochs": max(1, round(m.NUM_EPOCHS_POOLED / rounds)),
            "batch_size": int(m.BATCH_SIZE),
            "lr": float(m.LR),
            "optimizer": optimizer or "adam",
        }
        if preset == "quick":
            train.update(rounds=min(rounds, 2), local_epochs=1)
        return {"train": train}

    def site_names(self, cfg: dict[str, Any]) -> list[str] | None:
        count = int(self.module.NUM_CLIENTS)
        known = SITES_AND_METRIC.get(self.module_name, ((), ""))[0]
        return list(known) if len(known) == count else [f"center{i}" for i in range(count)]

    def load(self, cfg: dict[str, Any], seed: int, cache_dir: Path) -> FederatedData:
        fraction = float(cfg["val_fraction"])
        if not 0 <= fraction < 1:
            raise FedbenchError(f"setting data.val_fraction must be in [0, 1), got {fraction}")
        kwargs = {"data_path": str(cfg["path"])} if cfg.get("path") else {}
        names = self.site_names(cfg) or []
        sites = [self.load_site(i, name, kwargs, fraction, seed) for i, name in enumerate(names)]
        m = self.module
        metric = SITES_AND_METRIC.get(self.module_name, ((), FALLBACK_METRIC))[1]
        loss = self.call(m.BaselineLoss, f"{self.name} BaselineLoss")
        return FederatedData(self.name, sites, WrappedTask(m.Baseline, loss, m.metric, metric))

    def load_site(
        self, i: int, name: str, kwargs: dict[str, str], fraction: float, seed: int
    ) -> Site:
        """Centre i's train and test sets from FLamby, val carved from train."""
        import torch

        fed, label = fed_class(self.module), f"{self.name} centre {i}"
        train = self.call(lambda: fed(center=i, train=True, pooled=False, **kwargs), label)
        test = self.call(lambda: fed(center=i, train=False, pooled=False, **kwargs), label)
        x, y = self.call(lambda: materialise(train, f"{label} train"), label)
        tx, ty = self.call(lambda: materialise(test, f"{label} test"), label)
        rng = np.random.default_rng([seed, i])
        val = torch.from_numpy(carve_val(label_strata(y), len(x), fraction, rng))
        cases = torch.arange(len(x))
        return Site(
            name,
            Split(x[~val], y[~val], cases[~val]),
            Split(x[val], y[val], cases[val]),
            Split(tx, ty, torch.arange(len(tx))),
        )

    def accept_licence(self) -> str:
        """Record, as FLamby's own question does, that the user read and accepts the terms."""
        sources = self.folder.rglob("*.py")
        if not any("accept_license(" in p.read_text(errors="ignore") for p in sources):
            raise FedbenchError(f"{self.name}: FLamby asks for no licence for {self.module_name}")
        folder = Path(os.path.realpath(self.folder)) / "dataset_creation_scripts"
        marker = folder / f"license_agreement_{self.module_name}"
        try:
            marker.touch()
        except OSError as exc:
            raise FedbenchError(f"{self.name}: cannot write {marker}: {exc.strerror}") from None
        return f"recorded your acceptance of FLamby's {self.module_name} data terms in {marker}"


D = TypeVar("D", bound=FlambyDataset)


def dataset_class(
    module: str, folder: Path, base: type[D] = FlambyDataset, what: str = ""
) -> type[D]:
    """A subclass of `base` for one FLamby module (not imported yet); `what` says how it is
    served (" as volumes")."""
    attrs = {
        "name": flamby_dataset_name(module),
        "aliases": (module,),
        "module_name": module,
        "folder": folder,
        "description": f"FLamby {module}{what} (installed flamby)",
    }
    return type(f"{base.__name__}_{module}", (base,), attrs)


@hookimpl
def fedbench_datasets() -> list[type]:
    found = flamby_modules().items()
    return [dataset_class(module, folder) for module, folder in found if module not in VOLUMETRIC]
