"""Model `dataset-baseline`: the network a dataset defines itself (`Task.build_model`), such as
FLamby's `Baseline` or Fed-TCGA-BRCA's linear Cox model, so that published setups run as they
were published."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedbench.hookspecs import hookimpl
from fedbench.models import Model

if TYPE_CHECKING:
    from torch import nn

    from fedbench.task import Task


class DatasetBaseline(Model):
    """Delegates to the task: the dataset's own network, with no settings of its own."""

    name = "dataset-baseline"
    description = "The network the dataset itself defines (FLamby's Baseline, linear Cox)"

    def build(self, task: Task, cfg: dict[str, Any]) -> nn.Module:
        return task.build_model(cfg)


@hookimpl
def fedbench_models() -> list[type]:
    return [DatasetBaseline]
