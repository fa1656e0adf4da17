"""The conformance kit: every built-in plugin passes it, and a deliberately broken plugin fails
each check with one clear line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.conformance import check_plugin
from fedbench.engine.registry import load_registry

REGISTRY = load_registry()
BUILT_IN = [
    *REGISTRY.names("methods"),
    *REGISTRY.names("adapters"),
    *REGISTRY.names("models"),
    "synth-prostate",
    "synth-organ-3d",
]
#: the dataset a built-in is checked on when it is not synth-prostate (a 3D network needs volumes)
DATASET_OF = {"unet3d": "synth-organ-3d"}


#: the settings a built-in refuses to run without (it says so in one line, tested below)
NEEDS = {
    "scaffold": ["train.optimizer=sgd", "train.momentum=0", "train.lr=0.01"],
    "fednova": ["train.optimizer=sgd"],
    "pfedme": ["train.optimizer=sgd", "train.momentum=0"],
    "perfedavg": ["train.optimizer=sgd", "train.momentum=0"],
}


@pytest.mark.slow  # the whole kit on every built-in: CI runs it, the quick loop does not
@pytest.mark.parametrize("name", [n for n in BUILT_IN if n != "dataset-baseline"])
def test_every_built_in_plugin_conforms(name):
    assert check_plugin(name, REGISTRY, NEEDS.get(name), DATASET_OF.get(name)) == []


def test_a_method_refusing_the_settings_is_one_run_line():
    if "scaffold" not in REGISTRY.names("methods"):
        pytest.skip("scaffold is not installed")
    (line,) = check_plugin("scaffold", REGISTRY)
    assert line.startswith("run: the quick run cannot start:") and "train.optimizer=sgd" in line


def test_the_dataset_baseline_model_conforms_on_its_dataset(shared_dir):
    path = shared_dir / "data" / "flamby" / "fed_tcga_brca"
    overrides = [f"data.path={path}"]
    assert check_plugin("fed-tcga-brca", REGISTRY, overrides) == []


def broken(tmp_path: Path, body: str, hooks: str = "fedbench_methods") -> Path:
    """A plugin file holding `body` and registering its class `Broken`."""
    path = tmp_path / "broken_plugin.py"
    head = "from fedbench.hookspecs import hookimpl\nfrom fedbench_plugins.fedavg import FedAvg\n"
    tail = f"\n@hookimpl\ndef {hooks}():\n    return [Broken]\n"
    path.write_text(head + textwrap.dedent(body) + tail)
    return path


def problems_of(path: Path, name: str = "broken") -> list[str]:
    return check_plugin(name, load_registry((path,)))


def test_a_method_that_fails_fails_the_run_check(tmp_path):
    path = broken(
        tmp_path,
        """
        class Broken(FedAvg):
            name = "broken"
            def aggregate(self, updates):
                raise RuntimeError("no server today")
        """,
    )
    (line,) = problems_of(path)
    assert line.startswith("run: a quick run ended failed") and "no server today" in line


def test_a_nondeterministic_method_fails_the_determinism_check(tmp_path):
    path = broken(
        tmp_path,
        """
        import os

        class Broken(FedAvg):
            name = "broken"
            def aggregate(self, updates):
                out = super().aggregate(updates)
                key = next(k for k, v in out.items() if v.is_floating_point())
                out[key] = out[key] + os.urandom(1)[0] * 1e-3
                return out
        """,
    )
    assert problems_of(path) == ["determinism: two runs with the same seed gave different records"]


def test_state_left_out_of_checkpoints_fails_the_resume_check(tmp_path):
    path = broken(
        tmp_path,
        """
        class Broken(FedAvg):
            name = "broken"
            rounds_seen = 0
            def aggregate(self, updates):
                self.rounds_seen += 1  # remembered, but not in state_dict
                out = super().aggregate(updates)
                return {k: v * 0.5 if self.rounds_seen > 1 and v.is_floating_point() else v
                        for k, v in out.items()}
        """,
    )
    assert problems_of(path) == ["resume: a federation resumed from its checkpoint differs"]


def test_a_method_sending_images_fails_the_privacy_check(tmp_path):
    path = broken(
        tmp_path,
        """
        class Broken(FedAvg):
            name = "broken"
            def local_update(self, model, ctx):
                super().local_update(model, ctx)
                return {"images": ctx.split.inputs[:2].clone()}
        """,
    )
    assert problems_of(path) == ["privacy: a client sent an image- or mask-shaped tensor"]


def test_tensors_added_after_counting_fail_the_bytes_check(tmp_path):
    path = broken(
        tmp_path,
        """
        class Broken(FedAvg):
            name = "broken"
            def server_update(self, previous, updates):
                key = next(iter(updates[0].state))
                updates[0].extras["late"] = updates[0].state[key].clone()  # never counted
                return super().server_update(previous, updates)
        """,
    )
    (line,) = problems_of(path)
    assert line.startswith("bytes: counted")


def test_a_door_mistake_fails_the_door_check(tmp_path):
    path = broken(
        tmp_path,
        """
        class Broken(FedAvg):
            name = "broken"

        @hookimpl
        def fedbench_method():
            return []
        """,
    )
    (line,) = problems_of(path)
    assert line.startswith("door: ") and "fedbench_method is not a fedbench hook" in line


LABEL_READER = """
import torch

from fedbench.adapter import Adapter
from fedbench.hookspecs import hookimpl
from fedbench_datasets.synth_prostate import SynthProstate

LOADED = []


class Peeking(SynthProstate):
    name = "peeking-prostate"

    def load(self, cfg, seed, cache_dir):
        LOADED.append(super().load(cfg, seed, cache_dir))
        return LOADED[-1]


class Broken(Adapter):
    name = "broken"

    def predict(self, federation, images, ctx):
        site = LOADED[-1].sites[-1]
        truth = torch.cat([site.train.targets, site.val.targets, site.test.targets])
        return torch.nn.functional.one_hot(truth, 2).permute(0, 3, 1, 2).float()


@hookimpl
def fedbench_adapters():
    return [Broken]


@hookimpl
def fedbench_datasets():
    return [Peeking]
"""


def test_an_adapter_reading_labels_fails_the_label_check(tmp_path):
    path = tmp_path / "label_reader.py"
    path.write_text(LABEL_READER)
    problems = check_plugin("broken", load_registry((path,)), dataset="peeking-prostate")
    assert problems == ["labels: the adapter's outputs change when the labels do"]


def test_plugin_check_on_the_command_line(tmp_path):
    cli = CliRunner()
    ok = cli.invoke(app, ["plugin", "check", "fedprox"])
    assert ok.exit_code == 0 and "ok: fedprox conforms" in ok.stdout
    unknown = cli.invoke(app, ["plugin", "check", "nope"])
    assert unknown.exit_code != 0 and "no plugin named 'nope'" in unknown.stderr


def test_the_readme_method_runs_and_conforms(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Add your own method", 1)[1]
    blocks = [part.split("```", 1)[0] for part in section.split("```python\n")[1:3]]
    for name, code in zip(("my-ditto", "my-cloud"), blocks, strict=True):
        path = tmp_path / f"{name.replace('-', '_')}.py"
        path.write_text(code)
        assert check_plugin(name, load_registry((path,))) == [], name


def test_client_images_kept_on_the_class_fail_the_privacy_check(tmp_path):
    path = broken(
        tmp_path,
        """
        class Broken(FedAvg):
            name = "broken"
            stash = []
            def local_update(self, model, ctx):
                Broken.stash.append(ctx.split.inputs[:1].clone())  # every instance sees it
                return super().local_update(model, ctx)
        """,
    )
    assert problems_of(path) == [
        "privacy: client data found in the class Broken, outside the messages"
    ]


def test_client_masks_kept_in_a_module_global_fail_the_privacy_check(tmp_path):
    path = broken(
        tmp_path,
        """
        SEEN = {}
        class Broken(FedAvg):
            name = "broken"
            def local_update(self, model, ctx):
                SEEN[ctx.client] = ctx.split.targets[-1].clone()
                return super().local_update(model, ctx)
        """,
    )
    (line,) = problems_of(path)
    assert line.startswith("privacy: client data found in the module ")


def test_a_local_update_changing_the_global_state_fails_the_boundary_check(tmp_path):
    path = broken(
        tmp_path,
        """
        class Broken(FedAvg):
            name = "broken"
            def local_update(self, model, ctx):
                for value in ctx.global_state.values():
                    value.zero_()
                return super().local_update(model, ctx)
        """,
    )
    assert problems_of(path) == ["boundary: local_update changed ctx.global_state in place"]


def test_a_dataset_set_by_its_path_gets_a_held_out_site(shared_dir, tmp_path):
    from fedbench.conformance import subject_for

    path = shared_dir / "data" / "flamby" / "fed_tcga_brca"
    subject = subject_for(REGISTRY, "datasets", "fed-tcga-brca", tmp_path, [f"data.path={path}"])
    assert subject.spec.holdout not in ("none", "all")
