"""FedDG-ELCFS against its definition: CFSI by hand, the amplitude bank through the server and its
bytes, the first-order meta step and the boundary term recomputed, the FedAvg limit, resume,
settings, and the conformance kit with and without the declaration of the spectra it shares."""

from __future__ import annotations

import copy
import math
import textwrap
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import same_states, toy_builder, toy_config, toy_rounds, toy_train
from method_checks import partial, refuses_by_name, resumes_exactly

from fedbench.conformance import check_plugin
from fedbench.engine.registry import load_registry
from fedbench.method import clone_state
from fedbench_plugins import elcfs
from fedbench_plugins.elcfs import (
    ELCFS,
    boundary_loss,
    cfsi,
    nt_xent,
    output_layer_input,
    rims,
)
from fedbench_plugins.fedavg import FedAvg

CPU = torch.device("cpu")
PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "elcfs.py"


def reference_cfsi(image: np.ndarray, target: np.ndarray, lam: float, beta: float) -> np.ndarray:
    """The release's recipe in numpy: shift the spectrum, interpolate the centred
    (2b+1) x (2b+1) window of the amplitude, b = floor(beta * min(H, W)), keep the phase."""
    spectrum = np.fft.fft2(image, axes=(-2, -1))
    amplitude = np.fft.fftshift(np.abs(spectrum), axes=(-2, -1))
    other = np.fft.fftshift(target, axes=(-2, -1))
    h, w = image.shape[-2:]
    b = math.floor(beta * min(h, w))
    rows = slice(max(h // 2 - b, 0), h // 2 + b + 1)
    cols = slice(max(w // 2 - b, 0), w // 2 + b + 1)
    amplitude[:, rows, cols] = (1 - lam) * amplitude[:, rows, cols] + lam * other[:, rows, cols]
    mixed = np.fft.ifftshift(amplitude, axes=(-2, -1)) * np.exp(1j * np.angle(spectrum))
    return np.real(np.fft.ifft2(mixed, axes=(-2, -1)))


def test_cfsi_by_hand():
    gen = torch.Generator().manual_seed(3)
    images, others = torch.randn(2, 1, 7, 6, generator=gen), torch.randn(2, 1, 7, 6, generator=gen)
    target = torch.fft.fft2(others).abs()
    # lambda 0: the image itself, up to FFT round-off
    same = cfsi(images, target, torch.zeros(2), 0.5)
    torch.testing.assert_close(same, images, atol=1e-5, rtol=0)
    # lambda 1 with the whole spectrum: the other image's amplitude, the image's own phase
    moved = torch.fft.fft2(cfsi(images, target, torch.ones(2), 0.5).double())
    torch.testing.assert_close(moved.abs(), target.double(), atol=1e-4, rtol=1e-4)
    own = torch.fft.fft2(images.double())
    strong = target > 1e-3
    rotation = (moved * own.conj() / (moved.abs() * own.abs())).real
    assert (rotation[strong] > 1 - 1e-4).all(), "the phase is the image's own"
    # b = floor(0.2 * 6) = 1: a 3 x 3 window; lambdas 0.3 and 0.8, as numpy's recipe
    lam = torch.tensor([0.3, 0.8])
    out = cfsi(images, target, lam, 0.2)
    for i in range(2):
        expected = reference_cfsi(images[i].double().numpy(), target[i].numpy(), float(lam[i]), 0.2)
        np.testing.assert_allclose(out[i].double().numpy(), expected, atol=1e-5)
    # only the window changes: frequencies |f_y|, |f_x| <= 1; the rest of the spectrum is kept
    changed = torch.fft.fft2(out.double()) - own
    fy = torch.fft.fftfreq(7, 1 / 7).abs()[:, None] <= 1
    fx = torch.fft.fftfreq(6, 1 / 6).abs()[None, :] <= 1
    assert changed[..., ~(fy & fx)].abs().max() < 1e-4
    assert changed[..., fy & fx].abs().max() > 1e-2
    # beta 0: the zero frequency alone, that is the mean intensity
    dc = cfsi(images, target, torch.ones(2), 0.0)
    torch.testing.assert_close(
        dc - dc.mean((-2, -1), keepdim=True),
        images - images.mean((-2, -1), keepdim=True),
        atol=1e-5,
        rtol=0,
    )
    torch.testing.assert_close(dc.sum((-2, -1)).abs(), target[..., 0, 0], atol=1e-4, rtol=1e-5)


def test_interpolation_draws_another_clients_image_from_the_clients_stream():
    method = ELCFS({"beta": 0.2}, 3)
    gen = torch.Generator().manual_seed(0)
    method.bank = {
        0: torch.rand(2, 1, 8, 8, generator=gen),
        2: torch.rand(5, 1, 8, 8, generator=gen),
    }
    images = torch.randn(4, 1, 8, 8, generator=gen)
    stream = torch.Generator().manual_seed(7)
    out = method.interpolated(images, stream)
    draws = torch.rand(3, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for i in range(4):
        site = [0, 2][int(draws[0, i] * 2)]  # a client first, uniformly, then one of its images
        row = method.bank[site][int(draws[1, i] * len(method.bank[site]))]
        expected = cfsi(images[i : i + 1], row[None], draws[2, i : i + 1].float(), 0.2)
        torch.testing.assert_close(out[i : i + 1], expected)


def spy() -> tuple[type[ELCFS], list[dict]]:
    """ELCFS recording, round by round, the payload each client got and the updates sent."""
    rounds: list[dict] = [{"payloads": {}, "updates": []}]

    class Spy(ELCFS):
        def server_payload(self, client):
            payload = super().server_payload(client)
            rounds[-1]["payloads"][client] = clone_state(payload)
            return payload

        def server_update(self, previous, updates):
            rounds[-1]["updates"] = list(updates)
            rounds.append({"payloads": {}, "updates": []})
            return super().server_update(previous, updates)

    return Spy, rounds


def test_the_bank_crosses_once_and_its_bytes_are_counted(data):
    method, rounds = spy()
    fed = toy_rounds(method, toy_config(3), data, 3)
    own = [torch.fft.fft2(site.train.inputs.float()).abs() for site in data.sites]
    first = rounds[0]["updates"]
    assert all(torch.equal(u.extras["amplitude"], own[u.client]) for u in first)
    assert rounds[0]["payloads"] == {0: {}, 1: {}, 2: {}}, "the server holds no spectra yet"
    for client, payload in rounds[1]["payloads"].items():
        others = [c for c in range(3) if c != client]
        torch.testing.assert_close(payload["amplitude"], torch.cat([own[c] for c in others]))
        sites = torch.cat([torch.full((len(own[c]),), c) for c in others])
        assert torch.equal(payload["amplitude_site"], sites) and client not in sites
        kept = fed.clients[client].method.bank
        assert sorted(kept) == others and all(torch.equal(kept[c], own[c]) for c in others)
    assert all(not u.extras for u in rounds[1]["updates"] + rounds[2]["updates"]), "sent once"
    assert rounds[2]["payloads"] == {0: {}, 1: {}, 2: {}}, "received once"
    up = sum(t.numel() * 4 for t in own)
    down = sum(p["amplitude"].numel() * 4 for p in rounds[1]["payloads"].values())
    sites = sum(p["amplitude_site"].numel() * 8 for p in rounds[1]["payloads"].values())
    assert fed.cost["bytes_data_statistics"] == up + down
    fedavg = toy_rounds(FedAvg, toy_config(3), data, 3)
    batches = fedavg.cost["client_steps"] // 3
    assert fed.cost["client_steps"] == 3 * batches, "one step per optimizer step, as FedAvg's"
    assert fed.cost["bytes_up"] - fedavg.cost["bytes_up"] == up
    assert fed.cost["bytes_down"] - fedavg.cost["bytes_down"] == down + sites


def test_with_clients_sitting_out_each_gets_each_other_bank_once(data):
    method, rounds = spy()
    fed = toy_rounds(method, partial(toy_config(5)), data, 5)
    got: dict[int, list[int]] = {c: [] for c in range(3)}
    sent: set[int] = set()
    for entry in rounds[:-1]:
        for client, payload in entry["payloads"].items():
            new = sorted(set(payload.get("amplitude_site", torch.zeros(0)).tolist()))
            assert set(new) <= sent - {client} and not set(new) & set(got[client])
            got[client] += new
        sent |= {u.client for u in entry["updates"] if "amplitude" in u.extras}
    for client in range(3):
        assert sorted(got[client]) == [c for c in range(3) if c != client]
        assert sorted(fed.clients[client].method.bank) == sorted(got[client])


def recomputed_gradient(model, task, batch, weight, gamma, lr, clip):
    """The first-order gradient of L(theta; x) + w L(theta'; x') + gamma L_boundary, computed on
    two copies of the model (theta and theta' as separate leaves): the sum of their gradients."""
    inputs, shifted, targets = batch
    first, at_theta, at_fast = (copy.deepcopy(model) for _ in range(3))
    grads = torch.autograd.grad(task.loss(first(inputs), targets), list(first.parameters()))
    with torch.no_grad():
        for p, g in zip(at_fast.parameters(), grads, strict=True):
            p -= lr * g.clamp(-clip, clip)
    with output_layer_input(at_theta) as raw, output_layer_input(at_fast) as fast:
        total = task.loss(at_theta(inputs), targets) + weight * task.loss(at_fast(shifted), targets)
        if gamma:
            total = total + gamma * boundary_loss(raw["z"], fast["z"], targets, 2)
    total.backward()
    pairs = zip(at_theta.parameters(), at_fast.parameters(), strict=True)
    return [a.grad + b.grad for a, b in pairs], at_theta


@pytest.mark.parametrize(("gamma", "clip"), [(0.0, 100.0), (0.3, 100.0), (0.0, 1e-4)])
def test_the_meta_step_is_the_first_order_episodic_gradient(data, monkeypatch, gamma, clip):
    monkeypatch.setattr(elcfs, "CLIP", clip)  # the release's 100 clips none of the toy's
    torch.manual_seed(0)
    model = toy_builder(data)().train()
    task, site = data.task, data.sites[0].train
    batch = (site.inputs[:4], data.sites[1].train.inputs[:4], site.targets[:4])
    method = ELCFS({"gamma": gamma, "lr_inner": 0.05, "meta_test_weight": 0.7}, 3)
    expected, at_theta = recomputed_gradient(model, task, batch, 0.7, gamma, 0.05, clip)
    ctx = SimpleNamespace(task=task, autocast=nullcontext)
    with output_layer_input(model) as found:
        method.meta_step(model, ctx, batch, found)
    for p, g in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    # running statistics as the meta-train pass alone sets them
    assert same_states(dict(model.named_buffers()), dict(at_theta.named_buffers()))


def test_boundary_rims_and_nt_xent_by_hand():
    mask = torch.zeros(1, 1, 9, 9)
    mask[..., :4, :4] = 1  # a 4 x 4 square in the corner: the image edge counts as outside
    rim, ring = rims(mask)
    ys, xs = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
    inside = (ys < 4) & (xs < 4)
    assert torch.equal(rim[0, 0].bool(), inside & ((ys == 0) | (xs == 0) | (ys == 3) | (xs == 3)))
    distance = (ys - 3).clamp_min(0) + (xs - 3).clamp_min(0)  # L1 distance to the square
    assert torch.equal(ring[0, 0].bool(), ~inside & (distance <= 5))
    # rows a, b labelled 1, c, d labelled 0
    rows = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 2.0], [-1.0, 0.0]])
    labels = torch.tensor([1, 1, 0, 0])
    unit = rows / rows.norm(dim=1, keepdim=True)
    s = (unit @ unit.T / 0.5).tolist()

    def by_hand(pairs: list[tuple[int, int, list[int]]]) -> float:
        """Mean over (anchor, positive, its negatives) of -log(e^s_ap / (e^s_ap + sum e^s_an))."""
        terms = [
            -math.log(math.exp(s[a][p]) / (math.exp(s[a][p]) + sum(math.exp(s[a][n]) for n in neg)))
            for a, p, neg in pairs
        ]
        return sum(terms) / len(terms)

    def loss(*valid: bool) -> float:
        return nt_xent(rows, labels, torch.tensor(valid), 0.5).item()

    every = [(0, 1, [2, 3]), (1, 0, [2, 3]), (2, 3, [0, 1]), (3, 2, [0, 1])]
    assert loss(True, True, True, True) == pytest.approx(by_hand(every), rel=1e-5)
    # d left out: c has no positive, a and b one negative
    assert loss(True, True, True, False) == pytest.approx(
        by_hand([(0, 1, [2]), (1, 0, [2])]), rel=1e-5
    )
    assert loss(True, False, True, True) == pytest.approx(
        by_hand([(2, 3, [0]), (3, 2, [0])]), rel=1e-5
    )
    assert loss(True, False, True, False) == 0.0, "no positive pair"


def test_no_meta_test_and_no_boundary_term_is_fedavg_bit_for_bit(data):
    limit = toy_rounds(
        ELCFS, toy_config(3, meta_test_weight=0.0, gamma=0.0, lr_inner=0.01), data, 3
    )
    fedavg = toy_rounds(FedAvg, toy_config(3), data, 3)
    assert same_states(limit.global_state, fedavg.global_state)
    for ours, theirs in zip(limit.clients, fedavg.clients, strict=True):
        assert same_states(ours.state, theirs.state)
    assert limit.cost.pop("bytes_data_statistics") == 0, "no bank"
    assert limit.cost == fedavg.cost
    for active in ({"gamma": 0.0}, {"meta_test_weight": 0.0}, {}):
        episodic = toy_rounds(ELCFS, toy_config(2, **active), data, 2)
        assert not same_states(
            episodic.global_state, toy_rounds(FedAvg, toy_config(2), data, 2).global_state
        ), active


@pytest.mark.parametrize("clients", ["all", 2])
def test_elcfs_repeats_and_resumes_bit_for_bit(data, tmp_path, clients):
    config = toy_config(3) if clients == "all" else partial(toy_config(4))
    assert resumes_exactly(ELCFS, config, data, tmp_path)
    # the resumed run sends what the whole one does: nothing sent twice after a checkpoint
    whole = toy_train(data, data.sites, ELCFS, config, 0, CPU)
    path, rounds = tmp_path / "part.pt", config["train"]["rounds"]
    first = {**config, "train": {**config["train"], "rounds": rounds - 1}}
    toy_train(data, data.sites, ELCFS, first, 0, CPU, checkpoint_path=path)
    resumed = toy_train(data, data.sites, ELCFS, config, 0, CPU, checkpoint_path=path)
    assert {**whole.cost, "train_s": 0} == {**resumed.cost, "train_s": 0}
    one, two = (toy_rounds(ELCFS, config, data, 2) for _ in range(2))
    assert same_states(one.global_state, two.global_state)
    restored = ELCFS({}, 3)
    restored.load_state_dict(one.server.state_dict())
    assert restored.delivered == one.server.delivered
    assert all(torch.equal(restored.bank[c], one.server.bank[c]) for c in one.server.bank)


def test_elcfs_refuses_bad_settings_by_name():
    refuses_by_name(
        ELCFS,
        toy_config,
        {
            "beta": [-0.1, 0.6, "x", True],
            "lr_inner": [-1e-3, None],
            "meta_test_weight": [-1.0, "1"],
            "gamma": [-0.1, False],
        },
    )


UNDECLARED = """
from fedbench.hookspecs import hookimpl
from fedbench_plugins.elcfs import ELCFS

class Undeclared(ELCFS):
    name = "elcfs-undeclared"
    shares_data = {}

@hookimpl
def fedbench_methods():
    return [Undeclared]
"""


@pytest.mark.slow
def test_elcfs_without_its_declaration_fails_the_kit_on_privacy(tmp_path):
    path = tmp_path / "undeclared.py"
    path.write_text(textwrap.dedent(UNDECLARED))
    problems = check_plugin("elcfs-undeclared", load_registry((path,)))
    assert any(
        line.startswith("privacy: a client sent 'amplitude', amplitude spectra")
        for line in problems
    ), problems
