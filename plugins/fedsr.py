"""FedSR (Nguyen, Torr and Lim, "FedSR: A Simple and Effective Domain Generalization Method for
Federated Learning", NeurIPS 2022): FedAvg whose local objective adds two regularizers on the
representation z, an L2 norm (L2R) and a bound on the conditional mutual information between z
and the input given the label (CMI), for a model that generalizes to sites never seen.

Variant ("FedSR, deterministic pixel features"): the server is FedAvg (every key, sample-weighted
mean); client i's loss on a batch is
    task loss + alpha_l2r * L2R + alpha_cmi * CMI,
    L2R = mean_p ||z_p||^2,
    CMI = mean_p KL( N(z_p, I) || N(m_y, diag s_y^2) ),   y = the label at position p,
        = mean_p sum_c [ log s_yc + (1 + (z_pc - m_yc)^2) / (2 s_yc^2) - 1/2 ],
where z is the input of the network's output layer (`fedbench.models.output_layer`, caught by a
forward hook) and p runs over the images of the batch and the positions of that feature map, so
each z_p is a C-vector, the features the output layer maps to class scores at that position.
For MONAI's U-Net without residual units that is the top skip joined to the upsampled decoder
features (2 * channels[0] wide, half the input's resolution); with residual units (the `paper`
preset) it is the top up block's output, only as wide as the number of classes. The labels are
resized to z's positions by nearest neighbour. The class-conditional prior r(z|y) has a learned
mean m_y and log-scale log s_y per class and channel ([K, C] each, K the output layer's classes,
both zero at the start: N(0, I)); each client trains them with its model by the same optimizer,
sends them up as extras, and the server's sample-weighted mean goes back to every client the next
round (`server_payload`), so the prior is shared as the paper's, which lives in the model.

What differs from the paper on segmentation: the paper's encoder outputs a mean and a variance and
samples z (the classifier sees the sample); a U-Net has no variance head, so z is deterministic:
L2R is the squared norm of z itself, and the CMI term takes the encoder's distribution to be
N(z, I), its variance fixed at 1 (not learned, not sampled). Not implemented: the stochastic
representation and its variance head, and the authors' code's rescaling of z inside the KL (their
code also takes the L2R norm unsquared; the paper's text, followed here, squares it). The terms
are means over pixels, not images. Defaults: alpha_l2r 0.01, alpha_cmi 0.001 (the paper's). With
both zero the run is FedAvg's, bit for bit (no hook, no prior, nothing extra sent)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.method import ClientUpdate, LocalContext, Method, State, clone_state, weighted_mean
from fedbench.models import output_layer, output_layer_input
from fedbench.tuning import Range

if TYPE_CHECKING:
    import torch
    from torch import nn

MEAN, LOG_SCALE = "prior_mean", "prior_log_scale"


def l2r(z: torch.Tensor) -> torch.Tensor:
    """mean_p ||z_p||^2 for z [N, C, *spatial]: squared over the channels, mean over the rest."""
    return z.float().pow(2).sum(1).mean()


def positions(z: torch.Tensor) -> torch.Tensor:
    """[N, C, *spatial] -> [P, C]: one row per image and position."""
    return z.movedim(1, -1).reshape(-1, z.shape[1])


def cmi(z: torch.Tensor, labels: torch.Tensor, prior: State) -> torch.Tensor:
    """mean_p KL(N(z_p, I) || N(m_y, diag s_y^2)), summed over the channels; `labels` holds the
    class of every position of z ([N, *spatial])."""
    import torch

    # a one-hot product, not an index: indexing's backward accumulates in no fixed order on
    # several threads, and a run must repeat bit for bit
    rows = torch.nn.functional.one_hot(labels.reshape(-1), prior[MEAN].shape[0]).float()
    mean, log_scale = rows @ prior[MEAN], rows @ prior[LOG_SCALE]
    squared = (positions(z.float()) - mean).pow(2)
    kl = log_scale + (1.0 + squared) / (2.0 * torch.exp(2.0 * log_scale)) - 0.5
    return kl.sum(1).mean()


def labels_at(targets: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The class at each position of z: `targets` [N, *spatial] resized by nearest neighbour."""
    import torch.nn.functional as F

    if targets.dim() != z.dim() - 1 or targets.dtype.is_floating_point:
        raise FedbenchError(
            "fedsr: method.alpha_cmi needs targets that are a class per position (a label map); "
            "set method.alpha_cmi=0 for this task"
        )
    size = tuple(z.shape[2:])
    if tuple(targets.shape[1:]) == size:
        return targets.long()
    resized = F.interpolate(targets.unsqueeze(1).float(), size=size, mode="nearest")
    return resized.squeeze(1).long()


def regularizer(
    z: torch.Tensor, targets: torch.Tensor, prior: State, alpha_l2r: float, alpha_cmi: float
) -> torch.Tensor:
    """alpha_l2r * L2R + alpha_cmi * CMI for features z and the batch's targets (a term whose
    alpha is 0 is left out)."""
    terms = []
    if alpha_l2r:
        terms.append(alpha_l2r * l2r(z))
    if alpha_cmi:
        terms.append(alpha_cmi * cmi(z, labels_at(targets, z), prior))
    return sum(terms[1:], terms[0])


def prior_shape(model: nn.Module) -> tuple[int, int]:
    """(classes, feature width): the output layer's output and input sizes."""
    _, layer = output_layer(model)
    classes = getattr(layer, "out_channels", None) or layer.out_features
    width = getattr(layer, "in_channels", None) or layer.in_features
    return int(classes), int(width)


def remembering(batches: Callable[[], Iterator], seen: dict[str, Any]) -> Callable[[], Iterator]:
    """`batches` that notes each batch's targets in `seen["targets"]` as it yields the batch."""

    def noted() -> Iterator:
        for inputs, targets in batches():
            seen["targets"] = targets
            yield inputs, targets

    return noted


def alpha(config: dict[str, Any], key: str) -> Any:
    """The method setting `key`, from the run's config or else FedSR's default."""
    return config.get("method", {}).get(key, FedSR.defaults[key])


class FedSR(Method):
    """FedAvg plus alpha_l2r * L2R + alpha_cmi * CMI on the output layer's input features."""

    name = "fedsr"
    description = "FedSR: L2R and CMI regularizers on the penultimate features (method.alpha_*)"
    defaults = {"alpha_l2r": 0.01, "alpha_cmi": 0.001}
    #: a decade either side of the paper's defaults, log-uniform
    search_space = {
        "method.alpha_l2r": Range(1e-3, 1e-1, log=True),
        "method.alpha_cmi": Range(1e-4, 1e-2, log=True),
    }

    def __init__(self, params: dict[str, Any], num_clients: int) -> None:
        super().__init__(params, num_clients)
        #: server side: the federation's prior (the clients' mean), None before the first round
        self.prior: State | None = None

    @classmethod
    def check_settings(cls, config: dict[str, Any]) -> None:
        for key in cls.defaults:
            value = alpha(config, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise FedbenchError(f"method.{key} must be a number >= 0, got {value!r}")

    def server_payload(self, client: int) -> State:
        """The shared prior, once there is one."""
        return {} if self.prior is None else clone_state(self.prior)

    def local_update(self, model: nn.Module, ctx: LocalContext) -> State:
        """FedAvg's local epochs with the regularizers; the trained prior is sent up."""
        alpha_l2r, alpha_cmi = float(self.params["alpha_l2r"]), float(self.params["alpha_cmi"])
        if alpha_l2r == 0.0 and alpha_cmi == 0.0:
            return super().local_update(model, ctx)
        prior = self.starting_prior(model, ctx) if alpha_cmi else {}
        seen: dict[str, Any] = {}
        batches = ctx.batches
        ctx.batches = remembering(batches, seen)
        try:
            with output_layer_input(model) as found:

                def term(m: nn.Module) -> torch.Tensor:
                    return regularizer(found["z"], seen["targets"], prior, alpha_l2r, alpha_cmi)

                params = [*model.parameters(), *prior.values()]
                self.train_steps(model, ctx, int(ctx.train["local_epochs"]), params, term)
        finally:
            ctx.batches = batches
        return clone_state(prior)

    def starting_prior(self, model: nn.Module, ctx: LocalContext) -> State:
        """The prior the server sent (N(0, I) for every class before it has one), as float32
        leaves that train, on the model's device."""
        import torch

        if MEAN in ctx.received and LOG_SCALE in ctx.received:
            start = {k: ctx.received[k] for k in (MEAN, LOG_SCALE)}
        else:
            device = next(model.parameters()).device
            start = {k: torch.zeros(prior_shape(model), device=device) for k in (MEAN, LOG_SCALE)}
        return {k: v.detach().float().clone().requires_grad_(True) for k, v in start.items()}

    def server_update(self, previous: State, updates: list[ClientUpdate]) -> State:
        """FedAvg's mean of the models; the sample-weighted mean of the priors sent."""
        sent = [u for u in updates if u.extras]
        if sent:
            self.prior = weighted_mean([u.extras for u in sent], [u.num_samples for u in sent])
        return self.aggregate(updates)

    def state_dict(self) -> dict[str, Any]:
        return {"prior": None if self.prior is None else clone_state(self.prior)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        kept = state["prior"]
        self.prior = None if kept is None else clone_state(kept)


@hookimpl
def fedbench_methods() -> list[type]:
    return [FedSR]
