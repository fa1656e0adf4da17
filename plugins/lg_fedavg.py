"""LG-FedAvg (Liang, Liu, Ziyin, Salakhutdinov and Morency, "Think Locally, Act Globally:
Federated Learning with Local and Global Representations", arXiv 2001.01523, 2020): each client
keeps its own lower layers (a local representation) and the global layers on top of them are
shared and averaged as in FedAvg.

Variant: for an encoder-decoder segmentation network the local representation is the encoder,
every layer up to and including the deepest level, and the global part is every layer executed
after it: the decoder path and the output layer, which read the local features (the deepest
level's, and the skips'). For their MLP the paper's code shares the top 3 of 5 layers; a U-Net
has no fully connected top, and its decoder is the part that acts on the local representation.
(The code's CIFAR CNN lists its layers so that the 2 convolutions end up global, against the
paper's text; an open issue there asks why. We follow the text.) Sharing the output layer alone
(578 parameters on the default `unet`) would be local training by another name; the decoder is
40% of the default `unet`'s parameters and 39% of `release-unet`'s.

Found by execution order and output shape, never by a name: one forward pass in eval mode
without gradients on a probe input (zeros, the first shape the network accepts among those its
convolution and linear layers take, sides 32, 64, ...) records when each module first finishes;
the deepest level ends at MOON's bottleneck (`find_bottleneck`: the leaf whose output has the
smallest spatial size, then the most channels, then runs last; on MONAI's U-Net the bottom
block's last activation, on `release-unet` the bottom block's last ReLU). A state-dict key is
global when the module owning it first finishes after that leaf; modules that never run stay
local. Normalization layers go with the layer they follow (the decoder's are global). All
layers train jointly in each local update. An unseen site receives the global decoder with the
sample-weighted mean of the clients' encoders (each sent once after the last round, counted in
the bytes up); by default it uses the ensemble of that model and the personalized ones."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fedbench.errors import FedbenchError
from fedbench.hookspecs import hookimpl
from fedbench.method import Method
from fedbench_plugins.moon import find_bottleneck

if TYPE_CHECKING:
    import torch
    from torch import nn

#: sides tried for the probe image, smallest first (a U-Net wants a multiple of 2^levels)
PROBE_SIDES = (32, 64, 128, 256)


def probe_inputs(model: nn.Module) -> Iterator[torch.Tensor]:
    """Zero inputs of one sample, the network's first layer unknown: for each convolution or
    linear layer in turn, an input it would accept (for a convolution one per side in
    `PROBE_SIDES`); the caller keeps the first one the whole network runs on."""
    import torch
    from torch import nn

    layers = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)]
    if not layers:
        raise FedbenchError("lg-fedavg: the network has no convolution or linear layer")
    param = next(layers[0].parameters())
    like = {"dtype": param.dtype, "device": param.device}
    shapes: list[tuple[int, ...]] = []
    for layer in layers:
        if isinstance(layer, nn.Linear):
            shapes.append((1, layer.in_features))
        else:
            dims = len(layer.kernel_size)
            shapes += [(1, layer.in_channels, *(side,) * dims) for side in PROBE_SIDES]
    for shape in dict.fromkeys(shapes):  # each shape once, in order
        yield torch.zeros(shape, **like)


def finish_order(model: nn.Module, inputs: torch.Tensor) -> dict[str, int]:
    """Module name -> the index of its first finished forward on `inputs` (eval mode, no
    gradients, so no statistic or random state changes); modules that never run are absent."""
    import torch

    order: dict[str, int] = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            order.setdefault(name, len(order))

        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in model.named_modules()]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(inputs)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return order


def owner(key: str) -> str:
    """The name of the module owning a state-dict key ('' for the model itself)."""
    return key.rsplit(".", 1)[0] if "." in key else ""


def global_layer_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the modules that first finish after the deepest level (the global
    layers), in state-dict order."""
    problems = []
    for inputs in probe_inputs(model):
        try:
            bottleneck = find_bottleneck(model, inputs)
            order = finish_order(model, inputs)
        except (RuntimeError, ValueError) as exc:  # the network refuses this probe's size
            problems.append(str(exc).splitlines()[0])
            continue
        deepest = order[bottleneck]
        return [k for k in model.state_dict() if order.get(owner(k), -1) > deepest]
    raise FedbenchError(f"lg-fedavg: no probe input runs through the network: {problems[-1]}")


class LGFedAvg(Method):
    """Shares the layers executed after the deepest level; each client's encoder stays its own."""

    name = "lg-fedavg"
    description = "LG-FedAvg: local representation (encoder), the decoder and output are averaged"
    default_adapter = "ensemble"

    def shared_keys(self, model: nn.Module) -> list[str]:
        return global_layer_keys(model)


@hookimpl
def fedbench_methods() -> list[type]:
    return [LGFedAvg]
