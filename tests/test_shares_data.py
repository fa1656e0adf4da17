"""Methods that send statistics of client data (issue 28): declared in `Method.shares_data`,
counted apart in the bytes, named in the record and on the board; the conformance kit fails the
same statistics sent undeclared."""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import toy_config, toy_train

from fedbench.conformance import check_plugin
from fedbench.engine.registry import load_registry
from fedbench.leaks import image_statistics, rows_of, undeclared
from fedbench.results.notes import sharing_notes
from fedbench_plugins.fedavg import FedAvg

CPU = torch.device("cpu")


class SendsMeans(FedAvg):
    """FedAvg whose clients also send their training images' channel means, declared."""

    name = "sends-means"
    shares_data = {"means": "per-image channel means of its training images"}

    def local_update(self, model, ctx):
        super().local_update(model, ctx)
        return {"means": ctx.split.inputs.float().mean(dim=(-2, -1))}


def test_declared_statistics_are_counted_apart_in_the_bytes(data):
    federation = toy_train(data, data.sites, SendsMeans, toy_config(rounds=2), 0, CPU)
    per_round = sum(s.train.inputs.shape[0] * s.train.inputs.shape[1] * 4 for s in data.sites)
    assert federation.cost["bytes_data_statistics"] == 2 * per_round
    plain = toy_train(data, data.sites, FedAvg, toy_config(rounds=2), 0, CPU)
    assert "bytes_data_statistics" not in plain.cost
    assert federation.cost["bytes_up"] - plain.cost["bytes_up"] == 2 * per_round


def test_the_statistics_of_the_images_are_recognized_and_nothing_else_is(data):
    statistics = image_statistics(data)
    site = data.sites[0]
    images = site.train.inputs.float()
    spectra = torch.fft.fft2(images).abs()
    assert undeclared({"s": spectra[:3]}, statistics, "a client sent")
    assert undeclared({"m": images.mean(dim=(-2, -1))}, statistics, "a client sent")
    assert undeclared({"r": torch.rand(images.shape[0], 2)}, statistics, "x") == []
    assert undeclared({"w": torch.tensor([images[0].mean()])}, statistics, "x") == []  # 1 number
    assert not rows_of(torch.randn(spectra.shape[1:]), statistics[next(iter(statistics))])
    other = torch.fft.fft2(data.sites[1].train.inputs.float()).abs()
    (mixed,) = undeclared({"bank": torch.cat([spectra[:2], other[:2]])}, statistics, "x")
    assert "amplitude spectra of several sites' images" in mixed
    (line,) = undeclared({"amp": spectra.mean(0)}, statistics, "the server sent")
    assert line == (
        f"privacy: the server sent 'amp', the mean amplitude spectra of {site.name}'s images, "
        "undeclared (declare it in shares_data)"
    )


def test_the_board_names_the_rows_that_share_statistics():
    records = [
        {"method": "sends-means", "shares_data": dict(SendsMeans.shares_data)},
        {"method": "fedavg"},
    ]
    assert sharing_notes(records) == [
        "shares image statistics, not only models: sends-means (per-image channel means of its "
        "training images)"
    ]


PLUGIN = """
from fedbench.hookspecs import hookimpl
from fedbench_plugins.fedavg import FedAvg

class SendsMeans(FedAvg):
    name = "sends-means"
    {declaration}

    def local_update(self, model, ctx):
        super().local_update(model, ctx)
        return {{"means": ctx.split.inputs.float().mean(dim=(-2, -1))}}

@hookimpl
def fedbench_methods():
    return [SendsMeans]
"""


@pytest.mark.slow
@pytest.mark.parametrize("declared", [False, True])
def test_the_kit_fails_undeclared_statistics_and_passes_declared_ones(tmp_path, declared):
    path = tmp_path / "sends_means.py"
    declaration = 'shares_data = {"means": "channel means"}' if declared else "pass"
    path.write_text(textwrap.dedent(PLUGIN.format(declaration=declaration)))
    problems = check_plugin("sends-means", load_registry((path,)))
    if declared:
        assert problems == []
    else:
        assert problems and all(
            line.startswith("privacy: a client sent 'means', channel means of ")
            for line in problems
        )


def test_images_themselves_are_refused_even_under_a_declared_key(data):
    from fedbench.leaks import raw_images

    images = data.sites[0].train.inputs
    (line,) = undeclared({"amplitude": images[:2].clone()}, raw_images(data), "x", "never allowed")
    assert line.endswith("training images themselves, never allowed")
