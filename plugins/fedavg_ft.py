"""FedAvg with local fine-tuning before scoring (FedAvg-FT, the personalization baseline of
Wang et al., "Federated Evaluation of On-device Personalization", 2019, and of most
personalized-FL benchmarks since).

Variant: FedAvg for every round; then, once, each client fine-tunes the final global model on
its own train split for `method.finetune_epochs` epochs (every parameter, a fresh
`train.optimizer`, the task loss) and is scored with the result. Nothing of the fine-tuning
is sent, and the unseen sites receive the global model unchanged. With 0 epochs this is FedAvg.
Default: one epoch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.method import LocalContext, Method

if TYPE_CHECKING:
    from torch import nn


def check_epochs(config: dict[str, Any], default: int) -> None:
    """`method.finetune_epochs` must be an integer >= 0."""
    epochs = config.get("method", {}).get("finetune_epochs", default)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise FedbenchError(f"method.finetune_epochs must be an integer >= 0, got {epochs!r}")


class FedAvgFT(Method):
    """FedAvg, then `method.finetune_epochs` epochs of local fine-tuning before scoring."""

    name = "fedavg-ft"
    description = "FedAvg, then local fine-tuning of the global model (method.finetune_epochs)"
    defaults = {"finetune_epochs": 1}

    @classmethod
    def check_settings(cls, config: dict[str, Any]) -> None:
        check_epochs(config, cls.defaults["finetune_epochs"])

    def final_update(self, model: nn.Module, ctx: LocalContext) -> None:
        self.train_steps(model, ctx, int(self.params["finetune_epochs"]))


@hookimpl
def fedbench_methods() -> list[type]:
    return [FedAvgFT]
