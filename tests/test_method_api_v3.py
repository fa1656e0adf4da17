"""Method API v3: each finding of issue 25's plugin-author trial, reproduced (it failed, or got
through silently, on API v2) and what it does now."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import toy_config, toy_data, toy_train, toy_training
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.engine.registry import load_registry
from fedbench.engine.resolve import RunSpec, resolve
from fedbench.errors import PluginFailure
from fedbench.method import Method, state_nbytes
from fedbench_plugins.fedavg import FedAvg

CPU = torch.device("cpu")
QUICK = ["--preset", "quick", "--set", "train.rounds=1", "--holdout", "none"]


def trained(method: type[Method], rounds: int = 1, **train: object):
    config = toy_config(rounds)
    config["train"].update(train)
    data = toy_data()
    return toy_train(data, data.sites, method, config, 0, CPU)


# 1. per-client downloads


class PerClientPayload(FedAvg):
    """Sends client i a tensor of i + 1 zeros and checks it arrived as sent."""

    name = "per-client-payload"

    def server_payload(self, client: int) -> dict:
        return {"cloud": torch.zeros(client + 1)}

    def local_update(self, model, ctx):
        assert ctx.received["cloud"].shape == (ctx.client + 1,)
        return super().local_update(model, ctx)


def test_the_server_sends_each_client_its_own_payload_counted_per_client():
    plain, own = trained(FedAvg), trained(PerClientPayload)
    extra = sum(state_nbytes({"c": torch.zeros(i + 1)}) for i in range(3))
    assert own.cost["bytes_down"] == plain.cost["bytes_down"] + extra


# 2. server and clients kept apart


class Stasher(FedAvg):
    """Keeps the client's images on itself and reads them on the server side."""

    name = "stasher"

    def local_update(self, model, ctx):
        self.images = ctx.split.inputs
        return super().local_update(model, ctx)

    def server_update(self, previous, updates):
        assert self.images is not None
        return super().server_update(previous, updates)


def test_client_attributes_never_reach_the_server_instance():
    with pytest.raises(PluginFailure) as caught:
        trained(Stasher)
    assert str(caught.value).startswith(
        "method 'stasher' failed in server_update (server): AttributeError"
    )


class FirstDraws(FedAvg):
    """Records each client's first draw from its own stream."""

    name = "first-draws"
    seen: dict[int, float] = {}

    def local_update(self, model, ctx):
        FirstDraws.seen.setdefault(ctx.client, torch.rand(1, generator=ctx.generator).item())
        return super().local_update(model, ctx)


def test_a_clients_draws_do_not_depend_on_who_trained_before_it():
    FirstDraws.seen = {}
    trained(FirstDraws, rounds=1)  # every client, in order 0, 1, 2
    alone = FirstDraws.seen
    FirstDraws.seen = {}
    trained(FirstDraws, rounds=3, clients_per_round=1)  # one client a round, drawn
    for client, draw in FirstDraws.seen.items():
        assert draw == alone[client]
    from fedbench.engine.clients import client_stream

    expected = torch.rand(1, generator=client_stream(0, 2)).item()
    assert alone[2] == expected  # its stream is its own, seeded by (seed, client)


# 3. silent wrong results become one line


class Vandal(FedAvg):
    """Adds one to the global state it received, in place."""

    name = "vandal"
    starts: list[dict] = []

    def local_update(self, model, ctx):
        Vandal.starts.append({k: v.clone() for k, v in ctx.global_state.items()})
        for value in ctx.global_state.values():
            if value.is_floating_point():
                value.add_(1.0)
        return super().local_update(model, ctx)


def test_a_client_changing_the_global_state_in_place_changes_no_other_client():
    Vandal.starts = []
    data = toy_data()
    fed = toy_training(data, data.sites, Vandal, toy_config(1), 0, CPU)
    before = {k: v.clone() for k, v in fed.global_state.items()}
    fed.run_round()
    for start in Vandal.starts:
        assert all(torch.equal(start[k], before[k]) for k in start)


def returning(value_for):
    class Broken(FedAvg):
        name = "broken"

        def server_update(self, previous, updates):
            return value_for(super().server_update(previous, updates))

    return Broken


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda s: dict(list(s.items())[: len(s) // 2]),
            "method 'broken': server_update returned missing ",
        ),
        (lambda s: {**s, "extra": torch.zeros(1)}, "method 'broken': server_update returned "),
        (
            lambda s: {k: v.double() if v.is_floating_point() else v for k, v in s.items()},
            "method 'broken': server_update returned '",
        ),
        (lambda s: None, "method 'broken': server_update returned None; expected a dict"),
    ],
    ids=["half-the-keys", "a-new-key", "another-dtype", "none"],
)
def test_a_wrong_server_update_is_one_line(change, expected):
    with pytest.raises(PluginFailure) as caught:
        trained(returning(change))
    message = str(caught.value)
    assert message.startswith(expected) and "\n" not in message
    if "new-key" in expected:
        assert "unknown extra" in message


class NoExtras(FedAvg):
    name = "no-extras"

    def local_update(self, model, ctx):
        super().local_update(model, ctx)


def test_local_update_returning_none_is_one_line():
    with pytest.raises(PluginFailure) as caught:
        trained(NoExtras)
    assert str(caught.value) == (
        "method 'no-extras': local_update returned None; expected a dict of str to "
        "torch.Tensor ({} for nothing to send)"
    )


# 4 and 5. the door and the code hash, with an installed package


def install(root: Path, dist: str, package: str, files: dict[str, str], entry: str) -> None:
    """A distribution on sys.path, as pip would leave it: its package and dist-info."""
    (root / package).mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / package / name).write_text(textwrap.dedent(text))
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[fedbench]\n{entry} = {package}.methods\n")


IMPOSTOR = {
    "__init__.py": "",
    "methods.py": """
        from fedbench.hookspecs import hookimpl
        from fedbench.method import Method

        class Impostor(Method):
            name = "fedavg"

        @hookimpl
        def fedbench_methods():
            return [Impostor]
        """,
}


def test_an_installed_package_listed_first_cannot_take_a_built_in_name(tmp_path, monkeypatch):
    install(tmp_path, "aaa-impostor", "aaa_impostor", IMPOSTOR, "aaa-impostor")
    monkeypatch.syspath_prepend(str(tmp_path))  # listed before fedbench-med
    registry = load_registry()
    assert registry.get("methods", "fedavg") is FedAvg
    (line,) = [f for f in registry.failures if "Impostor" in f]
    assert line == (
        "plugin 'aaa-impostor': method name 'fedavg' is taken by the built-in plugin 'fedavg'; "
        "Impostor is not registered"
    )


HELPED = {
    "__init__.py": "",
    "helpers.py": "SCALE = 1.0\n",
    "methods.py": """
        from fedbench.hookspecs import hookimpl
        from fedbench_plugins.fedavg import FedAvg
        from .helpers import SCALE

        class Helped(FedAvg):
            name = "helped"

        @hookimpl
        def fedbench_methods():
            return [Helped]
        """,
}


def test_editing_a_plugins_helper_module_changes_its_config_hash(tmp_path, monkeypatch):
    install(tmp_path, "helped-dist", "helped_pkg", HELPED, "helped")
    monkeypatch.syspath_prepend(str(tmp_path))

    def config_hash() -> str:
        registry = load_registry()
        spec = RunSpec(method="helped", preset="quick", results_dir=tmp_path / "r")
        return resolve(spec, registry).config_hash

    before = config_hash()
    (tmp_path / "helped_pkg" / "helpers.py").write_text("SCALE = 2.0\n")
    assert config_hash() != before


# 6. a failure names its hook, and --debug shows the plugin's traceback

RAISING = """
from fedbench.hookspecs import hookimpl
from fedbench_plugins.fedavg import FedAvg

class Raising(FedAvg):
    name = "raising"

    def server_payload(self, client):
        raise ValueError("no payload today")

@hookimpl
def fedbench_methods():
    return [Raising]
"""


@pytest.mark.parametrize("debug", [False, True])
def test_a_failed_run_names_the_hook_and_debug_shows_the_traceback(tmp_path, debug):
    path = tmp_path / "raising.py"
    path.write_text(RAISING)
    flags = ["--debug"] if debug else []
    args = [*flags, "--plugin", str(path), "run", "--method", "raising", *QUICK]
    result = CliRunner().invoke(app, [*args, "--results-dir", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert (
        "run failed: method 'raising' failed in server_payload (server): "
        "ValueError: no payload today" in result.stderr
    )
    shown = 'raise ValueError("no payload today")' in result.stderr
    assert shown == debug and ("Traceback (most recent call last)" in result.stderr) == debug


# the door refuses a v2 hook signature


V2_PAYLOAD = """
from fedbench.hookspecs import hookimpl
from fedbench.method import Method

class OldPayload(Method):
    name = "old-payload"

    def server_payload(self):
        return {}

@hookimpl
def fedbench_methods():
    return [OldPayload]
"""


def test_a_hook_written_for_api_v2_is_refused_at_the_door(tmp_path):
    path = tmp_path / "old.py"
    path.write_text(V2_PAYLOAD)
    registry = load_registry((path,))
    assert "old-payload" not in registry.names("methods")
    (line,) = [f for f in registry.failures if "OldPayload" in f]
    assert line == (
        f"plugin '{path}': OldPayload.server_payload(self) cannot take the arguments of "
        "Method.server_payload(self, client)"
    )


@pytest.fixture(autouse=True)
def _forget_installed(monkeypatch):
    """Packages installed by a test leave no module behind for the next."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("aaa_impostor", "helped_pkg")):
            del sys.modules[name]
