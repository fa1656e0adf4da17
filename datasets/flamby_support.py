"""What the FLamby bridge does around FLamby's code: its prints sent to stderr, its questions on
stdin without a terminal and its import errors turned into one line each, and the data it hands
over turned into tensors with a validation split that leaves no centre unscorable."""

from __future__ import annotations

import contextlib
import io
import math
import re
import sys
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import numpy as np

from fedbench.errors import FedbenchError

if TYPE_CHECKING:  # torch loads with the data, not when `fedbench list` runs
    import torch

#: import names whose package on the index is named otherwise
PIP_NAMES = {"sklearn": "scikit-learn", "cv2": "opencv-python", "PIL": "pillow", "yaml": "pyyaml"}
#: labels up to this many values per sample, with at most this many distinct values in a column,
#: count as discrete (classes, event flags) and stratify the validation draw
MAX_LABEL_SIZE, MAX_CLASSES = 16, 16


def one_line(exc: BaseException) -> str:
    """`Type: message` on one line, without the file path an ImportError appends."""
    text = re.sub(r" \([^()]*\)$", "", " ".join(str(exc).split()))
    return f"{type(exc).__name__}: {text}"


def has_terminal() -> bool:
    """Whether a person can answer on stdin (FLamby's questions are asked there)."""
    try:
        return bool(sys.stdin and sys.stdin.isatty())
    except (ValueError, OSError):  # a closed or odd stdin
        return False


def question_line(dataset: str, asked: str) -> str:
    """The error for a question FLamby asked on stdin with no terminal to answer it."""
    if "terms" in asked.lower() or "licen" in asked.lower():
        link = re.search(r"https?://\S+", asked)
        where = f" ({link.group(0).rstrip('.,;')})" if link else ""
        return (
            f"{dataset}: FLamby asks on stdin that you accept the data terms{where} and there is "
            f"no terminal to answer; read them, then run `fedbench datasets accept-licence "
            f"{dataset}`"
        )
    first = next((line.strip() for line in asked.splitlines() if line.strip()), "")
    return f"{dataset}: FLamby asks a question on stdin and there is no terminal: {first}"


@contextlib.contextmanager
def flamby_io(dataset: str) -> Iterator[None]:
    """While FLamby code runs, its prints go to stderr. Without a terminal they are held until
    it returns (where it fails, the one error line says it all), and a question it asks on
    stdin is one error line, not EOFError."""
    if has_terminal():
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    held, stdin = io.StringIO(), sys.stdin
    sys.stdin = io.StringIO()
    try:
        with contextlib.redirect_stdout(held):
            yield
    except EOFError:
        raise FedbenchError(question_line(dataset, held.getvalue())) from None
    finally:
        sys.stdin = stdin
    sys.stderr.write(held.getvalue())


class AddChannel:
    """MONAI's AddChannel as FLamby's Fed-IXI calls it (removed in MONAI 1.3): a leading axis of
    size one, the image's channel."""

    def __call__(self, image: Any) -> Any:
        return image[None]


#: names FLamby imports from a library that no longer has them, and what stands in for each
LIBRARY_SHIMS = {"monai.transforms": {"AddChannel": AddChannel}}


@contextlib.contextmanager
def library_shims() -> Iterator[None]:
    """While FLamby's modules import, the names its libraries removed are there again; a library
    that still has a name keeps its own, and the libraries are left as they were afterwards."""
    import importlib

    added: list[tuple[Any, str]] = []
    for library, names in LIBRARY_SHIMS.items():
        try:
            module = importlib.import_module(library)
        except ImportError:  # FLamby's own import then says what is missing
            continue
        for name, stand_in in names.items():
            if not hasattr(module, name):
                setattr(module, name, stand_in)
                added.append((module, name))
    try:
        yield
    finally:
        for module, name in added:
            delattr(module, name)


def package_version(name: str) -> str:
    module = sys.modules.get(name)
    if getattr(module, "__version__", None):
        return str(module.__version__)
    try:
        return version(PIP_NAMES.get(name, name))
    except PackageNotFoundError:
        return "?"


def import_line(dataset: str, module: str, exc: ImportError) -> str:
    """Why FLamby's module cannot be imported, and what to do, on one line."""
    top = (exc.name or "").partition(".")[0]
    if not top or top == "flamby":
        return f"{dataset}: FLamby's {module} failed to import: {one_line(exc)}"
    if isinstance(exc, ModuleNotFoundError):
        return (
            f"{dataset}: FLamby's {module} needs '{top}', which is not installed: pip install "
            f"{PIP_NAMES.get(top, top)} (FLamby's setup.py lists each dataset's extras)"
        )
    return (
        f"{dataset}: FLamby's {module} is incompatible with the installed {top} "
        f"{package_version(top)} ({one_line(exc)}); FLamby's setup.py extras pin the versions "
        "it was written for"
    )


@contextlib.contextmanager
def pandas_values_for_torch() -> Iterator[None]:
    """FLamby's items pass a pandas Series to torch.tensor, which pandas 3 breaks (a Series' [0]
    is by label now) and pandas 2 too where the row of a frame with a text column is an object
    Series (Fed-TCGA-BRCA's `pid`): meanwhile torch.tensor gets the Series' values as numbers."""
    import torch

    original = torch.tensor

    def tensor(data: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if type(data).__module__.partition(".")[0] == "pandas":
            data = data.to_numpy()
            if data.dtype == object:  # numbers held as objects: their own numeric type
                data = np.asarray(data.tolist())
        return original(data, *args, **kwargs)

    torch.tensor = tensor
    try:
        yield
    finally:
        torch.tensor = original


def materialise(dataset: Any, label: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All (X, y) items of a FLamby dataset stacked into two tensors."""
    import torch

    with pandas_values_for_torch():
        items = [dataset[i] for i in range(len(dataset))]
    xs, ys = [], []
    for item in items:
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise FedbenchError(f"{label}: items are not (X, y) pairs; not supported by fedbench")
        xs.append(torch.as_tensor(np.asarray(item[0])))
        ys.append(torch.as_tensor(np.asarray(item[1])))
    if not xs:
        raise FedbenchError(f"{label}: empty")
    try:
        return torch.stack(xs).float(), torch.stack(ys)
    except RuntimeError:
        raise FedbenchError(f"{label}: items differ in shape; not supported by fedbench") from None


def label_strata(y: torch.Tensor) -> np.ndarray | None:
    """A stratum per sample from the discrete parts of its label (a class, an event flag), or
    None where labels are masks or continuous."""
    flat = y.reshape(len(y), -1).double().numpy()
    if flat.shape[1] > MAX_LABEL_SIZE:
        return None
    limit = min(MAX_CLASSES, len(flat) // 2)
    discrete = [
        c
        for c in range(flat.shape[1])
        if np.all(flat[:, c] == np.round(flat[:, c])) and len(np.unique(flat[:, c])) <= limit
    ]
    if not discrete:
        return None
    return np.unique(flat[:, discrete], axis=0, return_inverse=True)[1].reshape(-1)


def carve_val(
    strata: np.ndarray | None, n: int, fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Mask of the samples moved to val: `fraction` (half up) of each stratum, at least one of
    each stratum of two or more and never all of one, so val scores every label trained on."""
    val = np.zeros(n, dtype=bool)
    if fraction <= 0:
        return val
    labels = np.zeros(n, dtype=int) if strata is None else strata
    for stratum in np.unique(labels):
        members = np.flatnonzero(labels == stratum)
        if len(members) >= 2:
            k = min(len(members) - 1, max(1, math.floor(fraction * len(members) + 0.5)))
            val[rng.permutation(members)[:k]] = True
    return val
