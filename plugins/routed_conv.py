"""The routed convolution of IOP-FL's outside personalization, and the routed network built from
a federation's models: every convolution mixes, per image, the frozen kernels of the K
personalized models and the global one with weights from a small router (CondConv-style), in 2D
or, for volumes, 3D (the same rule on every spatial axis). The adapter that trains the routers
at test time is plugins/iopfl_routing.py."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fedbench.errors import FedbenchError
from fedbench.models import normalization_modules, use_batch_statistics

#: the routing spaces (ablation): which models lend their kernels as experts
SPACES = ("both", "global", "personalized")
ConvLayer = nn.Conv2d | nn.ConvTranspose2d | nn.Conv3d | nn.ConvTranspose3d
#: the functional convolution of each kind, by spatial dimensions
CONVS = {2: F.conv2d, 3: F.conv3d}
TRANSPOSED = {2: F.conv_transpose2d, 3: F.conv_transpose3d}


class RoutedConv(nn.Module):
    """A convolution whose kernel is a per-image weighted sum of E frozen expert kernels; the
    weights come from a router on the globally pooled layer input. Subclasses fix the conv kind."""

    def __init__(self, experts: list[ConvLayer], router_dropout: float = 0.2) -> None:
        super().__init__()
        first = experts[0]
        for layer in experts:
            if type(layer) is not type(first) or layer.weight.shape != first.weight.shape:
                raise FedbenchError("routed experts must be convolutions of identical shape")
            if (layer.bias is None) != (first.bias is None):
                raise FedbenchError("routed experts must all have a bias or all lack one")
        self.in_channels, self.out_channels = first.in_channels, first.out_channels
        self.stride, self.padding, self.dilation = first.stride, first.padding, first.dilation
        self.groups, self.padding_mode = first.groups, first.padding_mode
        self.output_padding = first.output_padding
        # Explicit padding is applied only for non-zero padding modes (as nn.Conv2d does).
        self._pad = getattr(first, "_reversed_padding_repeated_twice", None)
        weights = torch.stack([layer.weight.detach().clone() for layer in experts])
        self.register_buffer("expert_weight", weights)
        biases = (
            None if first.bias is None else torch.stack([e.bias.detach().clone() for e in experts])
        )
        self.register_buffer("expert_bias", biases)
        c_in, num = self.in_channels, len(experts)
        self.router = nn.Sequential(
            nn.Linear(c_in, 2 * c_in), nn.Dropout(router_dropout), nn.Linear(2 * c_in, num)
        )

    @property
    def num_experts(self) -> int:
        return int(self.expert_weight.shape[0])

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image mixing weights [B, E] in (0, 1): sigmoid, so they need not sum to 1."""
        return torch.sigmoid(self.router(x.mean(dim=tuple(range(2, x.ndim)))))

    def mixed_kernels(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Kernels [B, *weight.shape] and biases [B, C_out] (or None) mixed per image."""
        batch = weights.shape[0]
        kernel = (weights @ self.expert_weight.flatten(1)).view(
            batch, *self.expert_weight.shape[1:]
        )
        bias = None if self.expert_bias is None else weights @ self.expert_bias
        return kernel, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixed_forward(x, self.routing_weights(x))

    def mixed_forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The convolution of each image with its own mixed kernel, with no loop over images: the
        batch is folded into channels and convolved once with groups = B * groups."""
        batch = x.shape[0]
        kernel, bias = self.mixed_kernels(weights)
        x = self._padded(x)
        folded = x.reshape(1, batch * x.shape[1], *x.shape[2:])
        flat_bias = None if bias is None else bias.flatten()
        out = self._conv(folded, kernel.flatten(0, 1), flat_bias, batch)
        return out.view(batch, self.out_channels, *out.shape[2:])

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """Input with non-zero-mode padding applied up front (zero padding is left to the conv)."""
        if self.padding_mode == "zeros" or self._pad is None:
            return x
        return F.pad(x, self._pad, mode=self.padding_mode)

    def _conv(
        self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, reps: int
    ) -> torch.Tensor:
        """Convolve the folded input; `reps` multiplies the groups (B batched, 1 per image)."""
        raise NotImplementedError

    @classmethod
    def from_layers(cls, experts: list[ConvLayer]) -> RoutedConv:
        """The routed layer matching the experts' kind (transposed or not)."""
        if isinstance(experts[0], nn.ConvTranspose2d | nn.ConvTranspose3d):
            return RoutedConvTranspose(experts)
        return RoutedConvolution(experts)


class RoutedConvolution(RoutedConv):
    """Routed nn.Conv2d or nn.Conv3d."""

    def _conv(
        self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, reps: int
    ) -> torch.Tensor:
        padding = self.padding if self.padding_mode == "zeros" else 0
        conv = CONVS[x.ndim - 2]
        return conv(x, w, b, self.stride, padding, self.dilation, self.groups * reps)


class RoutedConvTranspose(RoutedConv):
    """Routed nn.ConvTranspose2d or 3d (grouped layout: [B * C_in, C_out / groups, *kernel])."""

    def _conv(
        self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, reps: int
    ) -> torch.Tensor:
        return TRANSPOSED[x.ndim - 2](
            x,
            w,
            b,
            self.stride,
            self.padding,
            self.output_padding,
            self.groups * reps,
            self.dilation,
        )


def per_image_reference(layer: RoutedConv, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The routed convolution image by image, as released (a Python loop): tests and benchmarks."""
    outputs = []
    for b in range(x.shape[0]):
        kernel, bias = layer.mixed_kernels(weights[b : b + 1])
        bias_b = None if bias is None else bias[0]
        outputs.append(layer._conv(layer._padded(x[b : b + 1]), kernel[0], bias_b, 1))
    return torch.cat(outputs)


def expert_sources(space: str, num_personalized: int) -> list[int | None]:
    """Expert sources in order: personalized model indices, then None for the global model."""
    if space not in SPACES:
        raise FedbenchError(f"iopfl-routing: unknown space '{space}'; known: {', '.join(SPACES)}")
    personal: list[int | None] = list(range(num_personalized))
    return {"both": personal + [None], "global": [None], "personalized": personal}[space]


def build_routed_model(
    global_model: nn.Module,
    personalized_models: list[nn.Module],
    space: str = "both",
    drop_expert: bool = False,
    frozen_bottleneck: bool = False,
) -> nn.Module:
    """A copy of the global model whose convs route over the experts of `space`; normalization
    keeps the global affine weights and uses batch statistics. Only routers and norm affine
    weights are trainable. `drop_expert` and `frozen_bottleneck` are two of the release's quirks
    (see IOPFLRouting)."""
    sources = expert_sources(space, len(personalized_models))
    model = use_batch_statistics(copy.deepcopy(global_model))
    lookups = [dict(m.named_modules()) for m in personalized_models]
    global_lookup = dict(global_model.named_modules())
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, ConvLayer)]
    widest = max((m.out_channels for _, m in convs), default=0)
    model.requires_grad_(False)
    for name, conv in convs:
        chosen = sources
        if drop_expert and isinstance(conv, nn.Conv2d | nn.Conv3d):
            chosen = _drop_last_personalized(sources)
        experts = [_expert_layer(global_lookup if s is None else lookups[s], name) for s in chosen]
        routed = RoutedConv.from_layers(experts).to(conv.weight.device)
        routed.router.requires_grad_(not (frozen_bottleneck and conv.out_channels == widest))
        _replace(model, name, routed)
    for _, module in normalization_modules(model):
        module.requires_grad_(True)
    return model


def _drop_last_personalized(sources: list[int | None]) -> list[int | None]:
    """The expert list without its last personalized model (release: non-transposed convs)."""
    personal = [s for s in sources if s is not None]
    if not personal:
        return sources
    kept = [s for s in sources if s != personal[-1]]
    if not kept:
        raise FedbenchError(
            "iopfl-routing: quirk_drop_expert with one personalized model leaves no expert"
        )
    return kept


def _expert_layer(lookup: dict[str, nn.Module], name: str) -> ConvLayer:
    """The layer called `name` in one expert model, checked to be a convolution."""
    layer = lookup.get(name)
    if not isinstance(layer, ConvLayer):
        raise FedbenchError(f"iopfl-routing: expert model has no convolution '{name}'")
    return layer


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` in place of the submodule called `name` in its parent."""
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)
