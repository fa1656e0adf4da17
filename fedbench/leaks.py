"""What a method's messages must not carry, for the conformance kit: client images or masks, and
statistics of client data (amplitude spectra, channel moments) that the method does not declare
in `Method.shares_data`."""

from __future__ import annotations

from typing import Any


def carries_data(tensor: Any, model_shapes: set[tuple[int, ...]], sample_shapes: set) -> bool:
    """A tensor shaped like no model state but like a batch of inputs or targets."""
    shape = tuple(tensor.shape)
    return shape not in model_shapes and len(shape) >= 1 and shape[1:] in sample_shapes


def image_statistics(data: Any) -> dict[str, Any]:
    """Statistics of each site's training images a method might send instead of a model: the
    images' amplitude spectra (as they are and centred) and their channel means and standard
    deviations, per image ([N, ...]) and over the site ([...]), by name; also every site's rows
    together, for a message that mixes the rows of several sites (a server's bank)."""
    import torch

    found: dict[str, Any] = {}
    pooled: dict[str, list[Any]] = {}
    for site in data.sites:
        images = site.train.inputs.float()
        amplitude = torch.fft.fft2(images).abs()
        per_image = {
            "amplitude spectra": amplitude,
            "centred amplitude spectra": torch.fft.fftshift(amplitude, dim=(-2, -1)),
            "channel means": images.mean(dim=(-2, -1)),
            "channel standard deviations": images.std(dim=(-2, -1)),
        }
        for what, rows in per_image.items():
            found[f"{what} of {site.name}'s images"] = rows
            found[f"the mean {what} of {site.name}'s images"] = rows.mean(0, keepdim=True)
            pooled.setdefault(what, []).append(rows)
        over_site = images.transpose(0, 1).flatten(1)  # [C, every pixel of the site]
        found[f"the channel means over {site.name}'s pixels"] = over_site.mean(1)[None]
        found[f"the channel standard deviations over {site.name}'s pixels"] = over_site.std(1)[None]
    for what, parts in pooled.items():
        if len({tuple(p.shape[1:]) for p in parts}) == 1:  # sites of one image size
            found[f"{what} of several sites' images"] = torch.cat(parts)
    return found


def raw_images(data: Any) -> dict[str, Any]:
    """Each site's training images and masks themselves: never sent, declared or not."""
    found = {}
    for site in data.sites:
        found[f"{site.name}'s training images themselves"] = site.train.inputs.float()
        found[f"{site.name}'s training masks themselves"] = site.train.targets.float()
    return found


DECLARE = "undeclared (declare it in shares_data)"


def undeclared(
    sent: dict[str, Any], statistics: dict[str, Any], who: str, why: str = DECLARE
) -> list[str]:
    """The first sent tensor whose rows are rows of one of `statistics`, as one line. A tensor
    of one number is left out: one number equal to one image's mean is no evidence."""
    return [
        f"privacy: {who} '{key}', {what}, {why}"
        for key, tensor in sent.items()
        if tensor.numel() > 1
        for what, rows in statistics.items()
        if rows_of(tensor, rows)
    ][:1]


def rows_of(tensor: Any, rows: Any) -> bool:
    """Whether every row of `tensor` (leading dimension, or itself) is one of `rows`."""
    import torch

    shape = tuple(rows.shape[1:])
    if tuple(tensor.shape) == shape:
        tensor = tensor.unsqueeze(0)
    if tuple(tensor.shape[1:]) != shape or not tensor.is_floating_point():
        return False
    flat, pool = tensor.detach().float().flatten(1).cpu(), rows.flatten(1)
    scale = pool.abs().max().clamp_min(1e-12)
    return bool((torch.cdist(flat / scale, pool / scale).min(1).values < 1e-4).all())
