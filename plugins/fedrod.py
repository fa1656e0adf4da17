"""FedRoD (Chen and Chao, "On Bridging Generic and Personalized Federated Learning for Image
Classification", ICLR 2022): a shared body with a generic head trained with a class-balanced
risk, plus a personalized head per client on the same features.

Variant (the linear personalized head of the paper, no hypernetwork; every client in every
round). The generic head is the network's output layer (`output_layer`, the last convolution or
linear layer); body and generic head are every state-dict key, shared and averaged
sample-weighted as in FedAvg. In each local step on a batch (x, y):
  * body + generic head take the balanced softmax risk: the task loss of the logits plus the log
    class prior of the client's train labels, `task.loss(f(x) + log pi, y)`, pi added to every
    pixel's logits for segmentation (per sample for classification). pi is counted over every
    label (pixel) of the client's train split with add-one smoothing, pi_c = (n_c + 1) / (n + C),
    so a class the client never sees gets a finite log prior;
  * the personalized head p_i (a copy of the output layer's weight and bias, never sent) takes the
    plain task loss of generic + personal logits, `task.loss(f(x).detach() + p_i(z.detach()), y)`,
    z being the output layer's input (caught by a forward pre-hook), so it trains nothing else.
Both terms are summed and one fresh `train.optimizer` over the network and p_i steps per batch;
the optimizers are per-parameter, so the shared update is the same with or without p_i.
p_i starts at zero, so a client's personalized model starts as the generic one.

Scored model: the output layer is linear and nothing but additions of terms that do not depend on
its parameters follow it in `unet` (the top up-layer is its last module; with residual units an
identity skip is added), so f(x) + p_i(z) is the network whose output-layer weight and bias are
generic + personal: `personalized_state` returns that one network (the personal head was trained
on f's raw logits, so f is not adjusted there).

Generic model: the balanced risk makes f + log pi_i fit client i's labels, so softmax(f) is the
class posterior under a uniform prior. The paper scores its generic model on the union of the
clients' test sets, balanced in its class-imbalance setups, where that is the right target. For
segmentation the union's prior is the federation's pooled pixel prior pi_g (foreground a few
percent), and a uniform prior over-segments. So the generic model handed to unseen sites (and
scored as the global model) is f + log pi_g, post-hoc logit adjustment (Menon et al., ICLR
2021): log pi_g is added to the output layer's bias, exact since the layer is linear and only
additions follow it. Post-hoc rather than training with log pi_i - log pi_g: the training, the
personal heads and the models sent every round stay the paper's, and pi_g is not needed before
the first round. pi_g = (N_c + 1) / (N + C) from the pooled label (pixel) counts N_c of the
clients that took part: each client sends its C counts (int64) once, with its first update
(counted in the bytes up); pooled counts are the union's prior, i.e. the clients' priors
weighted by their pixel counts (by their sample counts when images share one size).
`method.personal_head=false` trains no personal head (FedAvg with the balanced risk) and scores
every client with the generic model f + log pi_g: the server then sends pi_g to each client
with every round's global model (counted in the bytes down), and a client adjusts with the
latest pi_g it received (none in round 1, before any counts reached the server). Targets must be
class labels."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from fedbench.errors import Diverged, FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.method import ClientUpdate, LocalContext, Method, State, clone_state
from fedbench.models import output_layer

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedbench.data import Split


def class_counts(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """How many labels (pixels) of each class `targets` holds, as int64."""
    import torch

    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise FedbenchError(f"fedrod needs class labels as targets, got {targets.dtype} targets")
    labels = targets.reshape(-1).long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise FedbenchError(f"fedrod: labels outside 0..{num_classes - 1} for the output layer")
    return torch.bincount(labels, minlength=num_classes).to(torch.int64)


def smoothed(counts: torch.Tensor) -> torch.Tensor:
    """Add-one smoothed frequencies (n_c + 1) / (n + C), float64: a finite log for every class."""
    import torch

    wide = counts.to(torch.float64)
    return (wide + 1.0) / (wide.sum() + wide.numel())


def class_prior(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Add-one smoothed class frequencies of integer labels: (n_c + 1) / (n + C)."""
    return smoothed(class_counts(targets, num_classes))


def adjusted_bias(bias: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """bias + log prior, added in float64 and cast back (post-hoc logit adjustment)."""
    import torch

    shift = prior.to(device=bias.device, dtype=torch.float64).log()
    return (bias.to(torch.float64) + shift).to(bias.dtype)


def balanced_logits(outputs: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """outputs [N, C, ...] + log prior along the class dimension (every pixel alike)."""
    shape = (1, -1) + (1,) * (outputs.dim() - 2)
    return outputs + prior.log().to(outputs.dtype).reshape(shape)


def num_outputs(layer: nn.Module) -> int:
    """Classes the output layer scores: its out_channels (convolutions) or out_features."""
    count = getattr(layer, "out_channels", None) or getattr(layer, "out_features", None)
    if not count:
        raise FedbenchError("fedrod: the output layer has neither out_channels nor out_features")
    return int(count)


@contextmanager
def layer_inputs(layer: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """While open, `found["z"]` holds the latest input of `layer`."""
    found: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        found["z"] = args[0]

    handle = layer.register_forward_pre_hook(hook)
    try:
        yield found
    finally:
        handle.remove()


def prefixed(prefix: str, key: str) -> str:
    """The model-level state-dict key of a key inside the layer at `prefix`."""
    return f"{prefix}.{key}" if prefix else key


class FedRoD(Method):
    """Balanced-risk generic model shared as in FedAvg; a linear personal head per client."""

    name = "fedrod"
    description = "FedRoD: balanced-softmax generic model (at the pooled prior) + a personal head"
    defaults = {"personal_head": True}

    def __init__(self, params: dict[str, Any], num_clients: int) -> None:
        super().__init__(params, num_clients)
        #: client side: its personal head by model-level key (None: not trained yet, all zeros),
        #: whether it sent its label counts, and the last pi_g the server sent it
        self.personal: State | None = None
        self.sent_counts = False
        self.prior: torch.Tensor | None = None
        #: server side, per client, the label counts it sent once (None: not received yet)
        self.counts: list[torch.Tensor | None] = [None] * num_clients
        #: the output layer's bias key, which carries the generic model's prior adjustment
        self.bias_key = ""

    @classmethod
    def check_settings(cls, config: dict[str, Any]) -> None:
        value = config.get("method", {}).get("personal_head", cls.defaults["personal_head"])
        if not isinstance(value, bool):
            raise FedbenchError(f"method.personal_head must be true or false, got {value!r}")

    def shared_keys(self, model: nn.Module) -> list[str]:
        """Every key, as in FedAvg; notes the output layer's bias (refused when it has none)."""
        prefix, layer = output_layer(model)
        if getattr(layer, "bias", None) is None:
            raise FedbenchError("fedrod: the output layer has no bias to carry the class prior")
        self.bias_key = prefixed(prefix, "bias")
        return super().shared_keys(model)

    def class_prior(self, split: Split, num_classes: int) -> torch.Tensor:
        """The client's class prior pi (smoothed label frequencies of its train split)."""
        return class_prior(split.targets, num_classes)

    def personal_head(self, prefix: str, layer: nn.Module) -> nn.Module:
        """A copy of the output layer holding the client's personal head (zeros at first)."""
        import torch

        head = copy.deepcopy(layer)
        stored = self.personal
        with torch.no_grad():
            for key, param in head.named_parameters():
                if stored is None:
                    param.zero_()
                else:
                    param.copy_(stored[prefixed(prefix, key)])
        return head.train()

    def local_update(self, model: nn.Module, ctx: LocalContext) -> State:
        """`train.local_epochs` epochs of balanced risk + personal risk; the network is sent."""
        prefix, layer = output_layer(model)
        enabled = bool(self.params["personal_head"])
        head = self.personal_head(prefix, layer) if enabled else None
        classes = num_outputs(layer)
        prior = self.class_prior(ctx.split, classes).to(ctx.split.inputs.device)
        sent = (
            {} if self.sent_counts else {"class_counts": class_counts(ctx.split.targets, classes)}
        )
        self.sent_counts = True  # once
        self.prior = ctx.received.get("global_prior", self.prior)
        self.train_rod(model, layer, head, prior, ctx)
        if head is not None:
            own = {prefixed(prefix, k): v for k, v in head.state_dict().items()}
            self.personal = clone_state(own)
        return sent

    def server_update(self, previous: State, updates: list[ClientUpdate]) -> State:
        """FedAvg's mean; the server keeps the label counts a client sends with its first update."""
        for update in updates:
            if "class_counts" in update.extras:
                self.counts[update.client] = update.extras["class_counts"].detach().cpu().clone()
        return super().server_update(previous, updates)

    def global_prior(self) -> torch.Tensor | None:
        """pi_g: the smoothed pooled label counts of the clients heard from (None: none yet)."""
        received = [c for c in self.counts if c is not None]
        return smoothed(sum(received[1:], received[0])) if received else None

    def server_payload(self, client: int) -> State:
        """pi_g, for clients scored with the generic model (`method.personal_head=false`)."""
        prior = self.global_prior()
        wanted = not self.params["personal_head"] and prior is not None
        return {"global_prior": prior} if wanted else {}

    def unseen_site_state(self, state: State) -> State:
        """The generic model for the federation's prior: output bias + log pi_g."""
        return self.adjusted(state, self.global_prior())

    def adjusted(self, state: State, prior: torch.Tensor | None) -> State:
        """`state` with log `prior` added to the output layer's bias (unchanged for None)."""
        if prior is None:
            return state
        return {**state, self.bias_key: adjusted_bias(state[self.bias_key], prior)}

    def train_rod(
        self,
        model: nn.Module,
        layer: nn.Module,
        head: nn.Module | None,
        prior: torch.Tensor,
        ctx: LocalContext,
    ) -> None:
        """One step per batch on balanced risk (network) + plain risk of the summed heads."""
        import torch

        model.train()
        params = list(model.parameters()) + ([] if head is None else list(head.parameters()))
        optimizer = ctx.make_optimizer(params)
        with layer_inputs(layer) as found:
            for _ in range(int(ctx.train["local_epochs"])):
                for inputs, targets in ctx.batches():
                    optimizer.zero_grad(set_to_none=True)
                    with ctx.autocast():  # train.precision
                        outputs = model(inputs)
                        loss = ctx.task.loss(balanced_logits(outputs, prior), targets)
                        if head is not None:
                            personal = outputs.detach() + head(found["z"].detach())
                            loss = loss + ctx.task.loss(personal, targets)
                    if not torch.isfinite(loss):
                        raise Diverged(f"loss became {loss.item()} in local training")
                    loss.backward()
                    self.adjust_gradients(model, ctx)
                    optimizer.step()
                    ctx.steps += 1

    def personalized_state(self, client: int, state: State) -> State:
        """The client's network with output-layer weight and bias = generic + personal; without
        personal heads, the generic model (adjusted to pi_g)."""
        if not self.params["personal_head"]:
            return self.adjusted(state, self.prior)
        stored = self.personal
        if stored is None:
            return state
        return {**state, **{k: state[k] + v.to(state[k].dtype) for k, v in stored.items()}}

    def state_dict(self) -> dict[str, Any]:
        return {
            "personal": None if self.personal is None else clone_state(self.personal),
            "sent_counts": self.sent_counts,
            "prior": self.prior,
            "counts": [None if c is None else c.clone() for c in self.counts],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        kept = state["personal"]
        self.personal = None if kept is None else clone_state(kept)
        self.sent_counts, self.prior = bool(state["sent_counts"]), state["prior"]
        self.counts = [None if c is None else c.clone() for c in state["counts"]]


@hookimpl
def fedbench_methods() -> list[type]:
    return [FedRoD]
