"""In-memory federated data: sites with case-level train/val/test splits, and the Dataset base."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fedbench.errors import FedbenchError

if TYPE_CHECKING:  # torch loads when a run needs it, not when `fedbench list` reads the classes
    import numpy
    import torch

    from fedbench.task import Task


@dataclass(frozen=True)
class Split:
    """One split of one site: inputs, targets and the case (patient) each sample belongs to."""

    inputs: torch.Tensor
    targets: torch.Tensor
    cases: torch.Tensor

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (inputs, targets) batches; shuffled when a generator is given.

        A trailing batch of one sample is dropped while shuffling (training), since BatchNorm
        cannot normalise a single sample.
        """
        import torch

        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else None
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if order is not None and stop - start == 1 and n > 1:
                break
            idx = order[start:stop] if order is not None else slice(start, stop)
            yield self.inputs[idx], self.targets[idx]

    def to(self, device: torch.device | str) -> Split:
        moved = (self.inputs.to(device), self.targets.to(device), self.cases.to(device))
        return replace(self, inputs=moved[0], targets=moved[1], cases=moved[2])

    @staticmethod
    def concat(splits: list[Split]) -> Split:
        """Pool several splits into one (cases are renumbered so they stay distinct), of the
        first one's kind: pooled patch splits still hand out patches."""
        import torch

        offset, cases = 0, []
        for split in splits:
            cases.append(split.cases + offset)
            offset += int(split.cases.max()) + 1 if len(split) else 0
        return replace(
            splits[0],
            inputs=torch.cat([s.inputs for s in splits]),
            targets=torch.cat([s.targets for s in splits]),
            cases=torch.cat(cases),
        )


@dataclass(frozen=True)
class UnlabeledImages:
    """What an unseen site offers an adapter: its images in a fixed order, and no labels at all."""

    inputs: torch.Tensor

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Consecutive batches without shuffling: neighbouring slices of a case share a batch."""
        for start in range(0, len(self), batch_size):
            yield self.inputs[start : start + batch_size]


@dataclass(frozen=True)
class Site:
    """One institution: a name and its three case-level splits."""

    name: str
    train: Split
    val: Split
    test: Split
    #: what the site offers when it is held out, where that is more than its three splits (a
    #: dataset whose splits keep only labelled-foreground samples gives every sample here)
    unseen: Split | None = None

    def all_samples(self) -> Split:
        """Every sample of the site, as an unseen site uses them: `unseen` when set, else its
        train, val and test splits together."""
        if self.unseen is not None:
            return self.unseen
        return Split.concat([self.train, self.val, self.test])


@dataclass(frozen=True)
class FederatedData:
    """A loaded dataset: its sites and the task (model, loss, metrics) they share."""

    name: str
    sites: list[Site]
    task: Task

    def site(self, name: str) -> Site:
        for site in self.sites:
            if site.name == name:
                return site
        from fedbench.errors import unknown_name

        raise unknown_name(f"site of dataset '{self.name}'", name, [s.name for s in self.sites])


class Dataset:
    """Base of dataset plugins: declares its `data.*` settings and loads a FederatedData.
    `model` names the network its runs use unless `--set model.name=...` says otherwise."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    model: ClassVar[str] = "unet"
    required: ClassVar[tuple[str, ...]] = ("load",)

    def preset(self, preset: str) -> dict[str, Any]:
        """Config overrides this dataset wants for a preset (e.g. FLamby's published constants)."""
        return {}

    def site_names(self, cfg: dict[str, Any]) -> list[str] | None:
        """The site names, when known without loading (for early validation); None otherwise."""
        return None

    def load(self, cfg: dict[str, Any], seed: int, cache_dir: Path) -> FederatedData:
        raise NotImplementedError


def split_cases(
    parts: dict[str, str], val_fraction: float, test_fraction: float, rng: numpy.random.Generator
) -> tuple[dict[str, list[str]], list[str]]:
    """Case-level train/val/test from each case's given part ('train', 'test' or 'all').

    Given test cases stay test; without any, `test_fraction` of the cases become test. Then
    `val_fraction` of the training cases (at least one) become val. A site left with a single
    training case cannot spare one: its val reuses that training case (never test), noted.
    """
    test = sorted(c for c, p in parts.items() if p == "test")
    pool = sorted(c for c, p in parts.items() if p != "test")
    notes = []
    if not test:
        if len(pool) < 2:
            raise FedbenchError(f"{len(pool)} case(s): at least two needed for a test split")
        order = [pool[i] for i in rng.permutation(len(pool))]
        n_test = min(len(pool) - 1, max(1, round(test_fraction * len(pool))))
        test, pool = sorted(order[:n_test]), sorted(order[n_test:])
    if not pool:
        raise FedbenchError("no training case")
    if len(pool) == 1:
        notes.append(f"one training case ({pool[0]}): val reuses it (selection is not independent)")
        return {"train": pool, "val": list(pool), "test": test}, notes
    order = [pool[i] for i in rng.permutation(len(pool))]
    n_val = min(len(pool) - 1, max(1, round(val_fraction * len(pool))))
    return {"train": sorted(order[n_val:]), "val": sorted(order[:n_val]), "test": test}, notes
