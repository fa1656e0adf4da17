"""The Adapter base class and the trained federation it receives: what an unseen site does at test
time with the federation's models and its own unlabeled images."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

from fedbench.errors import FedbenchError

if TYPE_CHECKING:  # torch loads when a run needs it, not when `fedbench list` reads the classes
    import torch
    from torch import nn

    from fedbench.data import UnlabeledImages
    from fedbench.method import State
    from fedbench.task import Task


@dataclass
class TrainedFederation:
    """What a federation's training produced, as handed to an unseen site: the global model (if
    the method has one), one personalized model per training site, which state keys the server
    shared, what training cost and how validation evolved."""

    build_model: Callable[[], nn.Module]
    global_state: State | None
    personalized: list[State]
    site_names: list[str]
    device: torch.device
    shared_keys: list[str] = field(default_factory=list)
    cost: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    #: per site: the personalized state of its best validation round (when eval.val_best)
    val_best: list[State] | None = None
    #: the global model of the round with the best mean validation score (when eval.val_best)
    val_best_global: State | None = None
    #: the rounds chosen: site name -> round, and "global" -> round
    val_best_rounds: dict[str, int] = field(default_factory=dict)

    def selected(self, selection: str) -> TrainedFederation:
        """The federation an unseen site receives under `selection`: "final" (the last
        round's models) or "val-best" (each model from its validation-selected round)."""
        if selection == "final":
            return self
        if self.val_best is None:
            raise FedbenchError("no validation-best models: the run needs eval.val_best=true")
        best_global = self.val_best_global
        if best_global is None:  # no round's validation ever scored: the last round's
            best_global = self.global_state
        return replace(self, global_state=best_global, personalized=list(self.val_best))

    def model(self, state: State) -> nn.Module:
        """A fresh module on the run's device holding `state`."""
        module = self.build_model()
        module.load_state_dict(state)
        return module.to(self.device)


@dataclass(frozen=True)
class AdaptContext:
    """Run settings an adapter may use."""

    batch_size: int
    seed: int
    task: Task


#: `adapter.epochs` per preset, the same for every adapter that adapts: the number of passes over
#: the unseen site's images; each pass updates on each consecutive batch, then predicts that batch
#: with the updated model; the last pass's predictions count; 0 predicts without updating.
ADAPTATION_EPOCHS = {"quick": 1, "default": 2, "paper": 10}


class Adapter:
    """Base of adapters. `predict` returns the model outputs for every image, in order."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    #: the settings `fedbench tune` searches (fedbench.tuning), e.g. the adaptation's lr
    search_space: ClassVar[dict[str, Any]] = {}
    #: how it adapts, as its paper does, kept in the record: "online" (what it learns carries
    #: over the stream of the unseen site's images), "episodic" (reset per image or volume),
    #: "per batch" (nothing carried over: each batch's own statistics) or "none" (no adaptation)
    mode: ClassVar[str] = "none"
    needs_global_model: ClassVar[bool] = True
    needs_normalization: ClassVar[bool] = False
    #: True for an adapter that reads BatchNorm running statistics (DUA, VPTTA)
    needs_running_statistics: ClassVar[bool] = False
    needs_dense_task: ClassVar[bool] = False
    required: ClassVar[tuple[str, ...]] = ("predict",)

    @classmethod
    def preset(cls, preset: str) -> dict[str, Any]:
        """Setting overrides this adapter wants for a preset: by default the shared
        `ADAPTATION_EPOCHS` for adapters with an `epochs` setting."""
        if "epochs" in cls.defaults and preset in ADAPTATION_EPOCHS:
            return {"epochs": ADAPTATION_EPOCHS[preset]}
        return {}

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = {**self.defaults, **params}

    @classmethod
    def check_method(cls, method: type) -> None:
        """Raise a clear error when this adapter cannot apply to the method (class): what a grid
        knows before any data is loaded."""
        if cls.needs_global_model and not method.has_global_model:
            raise FedbenchError(
                f"adapter '{cls.name}' needs a global model, and method '{method.name}' "
                "has none; try --adapter ensemble"
            )

    def check(self, method: type, model: nn.Module, task: Task) -> None:
        """Raise a clear error, before any training, when this adapter cannot apply to the
        method (class), its model or the task."""
        from fedbench.models import normalization_modules, running_batch_norms

        self.check_method(method)
        if self.needs_dense_task and not task.dense_prediction:
            raise FedbenchError(f"adapter '{self.name}' applies to segmentation tasks only")
        if self.needs_normalization and not normalization_modules(model):
            raise FedbenchError(
                f"adapter '{self.name}' needs normalization layers, and this model has none"
            )
        if self.needs_running_statistics and not running_batch_norms(model):
            raise FedbenchError(
                f"adapter '{self.name}' needs BatchNorm layers with running statistics"
            )

    def predict(
        self, federation: TrainedFederation, images: UnlabeledImages, ctx: AdaptContext
    ) -> torch.Tensor:
        raise NotImplementedError


def online_batches(images: UnlabeledImages, batch_size: int) -> list[torch.Tensor]:
    """The unseen site's images in consecutive batches, as it would stream them, for every
    adapter that normalizes with batch statistics: a trailing batch of one image (batch_size >
    1) joins the previous batch, as one image's statistics are degenerate."""
    import torch

    batches = list(images.batches(batch_size))
    if batch_size > 1 and len(batches) > 1 and batches[-1].shape[0] == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def predict_batched(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Outputs of `model` in eval mode for all inputs, batch by batch, on the model's device."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    with torch.inference_mode():
        outputs = [
            model(inputs[i : i + batch_size].to(device)) for i in range(0, len(inputs), batch_size)
        ]
    return torch.cat(outputs).float().cpu()
