"""`fedbench tune` (issue 29): a toy objective with a known optimum, the pruner, a killed tuning
that resumes without repeating finished trials, test splits never read, and the study file."""

from __future__ import annotations

import dataclasses
import math

import pytest
from typer.testing import CliRunner

import fedbench.engine.tuning as tuning
from fedbench.backends.study import load_study, part_variants
from fedbench.cli import app
from fedbench.engine.registry import load_registry
from fedbench.engine.resolve import RunSpec
from fedbench.tuning import Choice, Range

TOY_PLUGIN = """
from fedbench.hookspecs import hookimpl
from fedbench.tuning import Choice, Range
from fedbench_plugins.fedavg import FedAvg

class Toy(FedAvg):
    name = "toy-tuned"
    defaults = {"k": 2, "kind": "a"}
    search_space = {"method.k": Range(1, 6, integer=True), "method.kind": Choice(("a", "b"))}

@hookimpl
def fedbench_methods():
    return [Toy]
"""


@pytest.fixture
def registry(tmp_path):
    path = tmp_path / "toy_tuned.py"
    path.write_text(TOY_PLUGIN)
    return load_registry((path,))


def sampled(spec: RunSpec) -> dict[str, str]:
    """The settings a trial's run was given, as text."""
    return dict(text.split("=", 1) for text in spec.overrides)


def toy_score(settings: dict[str, str]) -> float:
    """Best at lr = 10^-2.5, k = 3, kind = b (value 1); a method without k or kind is at their
    best."""
    lr, k = float(settings["train.lr"]), int(settings.get("method.k", 3))
    penalty = (k - 3) ** 2 / 10 + (settings.get("method.kind") == "a")
    return 1.0 - (math.log10(lr) + 2.5) ** 2 - penalty


class ToyObjective:
    """Stands in for training: each round reports the final value, no data is touched."""

    def __init__(self, interrupt_at: int | None = None, rounds: int = 6):
        self.calls: list[dict[str, str]] = []
        self.interrupt_at, self.rounds = interrupt_at, rounds

    def __call__(self, spec, registry, on_round):
        settings = sampled(spec)
        self.calls.append(settings)
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        value = toy_score(settings)
        for r in range(1, self.rounds + 1):
            on_round(r, value)
        return value


def spec_for(tmp_path, method: str = "toy-tuned") -> RunSpec:
    return RunSpec(method=method, preset="quick", rounds=6, results_dir=tmp_path / "r")


def test_the_search_finds_a_known_optimum(registry, tmp_path, monkeypatch):
    toy = ToyObjective()
    monkeypatch.setattr(tuning, "validation_score", toy)
    found = tuning.tune_method(spec_for(tmp_path), registry, 40, lambda *_: None)
    assert found.settings["method.k"] == 3 and found.settings["method.kind"] == "b"
    assert abs(math.log10(found.settings["train.lr"]) + 2.5) < 0.3
    assert found.value == max(toy_score(c) for c in toy.calls) > 0.9
    assert found.trials == 40 and len(toy.calls) == 40
    assert found.pruned > 0, "the median pruner stopped no trial below the median"


def test_every_trial_runs_on_validation_with_no_site_held_out(registry, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(
        tuning, "validation_score", lambda spec, reg, on_round: seen.append(spec) or 0.5
    )
    tuning.tune_method(spec_for(tmp_path), registry, 2, lambda *_: None)
    assert [s.holdout for s in seen] == ["none", "none"]
    assert all("eval.history=true" in s.overrides for s in seen)


def test_a_killed_tuning_resumes_without_repeating_finished_trials(registry, tmp_path, monkeypatch):
    """Ctrl-C in the third trial; then a kill -9 in a fourth (left running in the database).
    The resumed tuning runs both interrupted settings again and only enough new trials to reach
    the budget: no finished trial runs twice."""
    first = ToyObjective(interrupt_at=3)
    monkeypatch.setattr(tuning, "validation_score", first)
    spec = spec_for(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        tuning.tune_method(spec, registry, 6, lambda *_: None)
    opened = tuning.open_tuning(spec, registry)
    space, study = opened.space, opened.study
    killed = study.ask()
    killed_settings = tuning.suggested(killed, space)
    second = ToyObjective()
    monkeypatch.setattr(tuning, "validation_score", second)
    found = tuning.tune_method(spec, registry, 6, lambda *_: None)
    assert found.trials == 6 and len(second.calls) == 4
    assert second.calls[0] == first.calls[2]
    assert float(second.calls[1]["train.lr"]) == killed_settings["train.lr"]
    assert not any(call in first.calls[:2] for call in second.calls)
    again = ToyObjective()
    monkeypatch.setattr(tuning, "validation_score", again)
    assert tuning.tune_method(spec, registry, 6, lambda *_: None).trials == 6
    assert again.calls == []


def shuffled_tests(load):
    """A dataset loader whose test splits hold other images and labels (zeros)."""

    def loading(self, cfg, seed, cache_dir):
        data = load(self, cfg, seed, cache_dir)
        for i, site in enumerate(data.sites):
            test = site.test
            blank = dataclasses.replace(
                test, inputs=test.inputs.mul(0), targets=test.targets.mul(0)
            )
            data.sites[i] = dataclasses.replace(site, test=blank)
        return data

    return loading


def test_the_objective_never_reads_a_test_split(tmp_path, monkeypatch):
    """Two real tunings (quick preset, 2 rounds, 2 trials), one with every test split blanked:
    the same settings get the same validation values."""
    from fedbench_datasets.synth_prostate import SynthProstate

    registry = load_registry()
    spec = RunSpec(method="fedprox", preset="quick", rounds=2, results_dir=tmp_path / "a")
    plain = tuning.tune_method(spec, registry, 2, lambda *_: None)
    monkeypatch.setattr(SynthProstate, "load", shuffled_tests(SynthProstate.load))
    other = dataclasses.replace(spec, results_dir=tmp_path / "b")
    blanked = tuning.tune_method(other, registry, 2, lambda *_: None)
    assert (plain.settings, plain.value) == (blanked.settings, blanked.value)
    assert plain.value > 0


def test_the_space_adds_the_client_lr_unless_the_method_declares_its_own():
    registry = load_registry()
    fedprox = tuning.method_space(registry.get("methods", "fedprox"))
    assert fedprox["train.lr"] == Range(2e-4, 2e-2, log=True) and "method.mu" in fedprox
    scaffold = tuning.method_space(registry.get("methods", "scaffold"))
    assert scaffold["train.lr"].high > 1  # SGD's scale


def test_choice_and_range_refuse_what_cannot_be_searched():
    from fedbench.errors import FedbenchError

    for bad in (lambda: Range(1, 1), lambda: Range(0, 1, log=True), lambda: Choice(("a",))):
        with pytest.raises(FedbenchError):
            bad()


def test_tune_writes_a_study_the_grid_runs_and_keeps_other_methods(registry, tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "validation_score", ToyObjective())
    path = tmp_path / "toy_tuned.py"
    out = tmp_path / "tuned.toml"
    args = ["--plugin", str(path), "tune", "--preset", "quick", "--rounds", "6", "--trials", "3"]
    args += ["--results-dir", str(tmp_path / "r"), "--out", str(out)]
    for method in ("toy-tuned", "fedavg", "toy-tuned"):
        result = CliRunner().invoke(app, [*args, "--method", method])
        assert result.exit_code == 0, result.output
    study = load_study(out)
    assert [p.name for p in study.parts] == ["toy-tuned", "fedavg"]
    (variant,) = part_variants(study.parts[0])
    assert {o.split("=")[0] for o in variant.overrides} == {"train.lr", "method.k", "method.kind"}
    assert variant.tuning["trials"] == 3 and variant.tuning["objective"] == tuning.OBJECTIVE
    refused = CliRunner().invoke(app, [*args[:4], "default", *args[5:], "--method", "fedavg"])
    assert refused.exit_code == 2 and "give another --out" in refused.output


def test_a_setting_fixed_with_set_cannot_also_be_searched(registry, tmp_path):
    from fedbench.errors import FedbenchError

    spec = dataclasses.replace(spec_for(tmp_path), overrides=["train.lr=0.01"])
    with pytest.raises(FedbenchError, match="--set train.lr fixes a setting the tuning searches"):
        tuning.tune_method(spec, registry, 2, lambda *_: None)


def test_a_trial_that_fails_for_another_reason_than_its_settings_runs_again(
    registry, tmp_path, monkeypatch
):
    """A full disk in the second trial: it does not count, and the resumed tuning reruns it."""
    from fedbench.storage import StorageError

    calls = []

    def failing(spec, reg, on_round):
        calls.append(sampled(spec))
        if len(calls) == 2:
            raise StorageError("disk full")
        return toy_score(calls[-1])

    monkeypatch.setattr(tuning, "validation_score", failing)
    with pytest.raises(StorageError):
        tuning.tune_method(spec_for(tmp_path), registry, 3, lambda *_: None)
    found = tuning.tune_method(spec_for(tmp_path), registry, 3, lambda *_: None)
    assert found.trials == 3 and len(calls) == 4 and calls[2] == calls[1]


def test_a_smaller_budget_is_answered_with_its_own_first_trials(registry, tmp_path, monkeypatch):
    toy = ToyObjective()
    monkeypatch.setattr(tuning, "validation_score", toy)
    spec = spec_for(tmp_path)
    tuning.tune_method(spec, registry, 8, lambda *_: None)
    small = tuning.tune_method(spec, registry, 3, lambda *_: None)
    assert small.trials == 3 and small.value == max(toy_score(c) for c in toy.calls[:3])


def test_a_bad_search_space_is_one_line(tmp_path):
    from fedbench.errors import FedbenchError

    path = tmp_path / "bad_space.py"
    path.write_text(TOY_PLUGIN.replace("Range(1, 6, integer=True)", '"1-6"'))
    with pytest.raises(FedbenchError, match="method 'toy-tuned': search_space\\['method.k'\\]"):
        tuning.method_space(load_registry((path,)).get("methods", "toy-tuned"))


def test_a_trials_federation_is_not_kept_in_the_cache(tmp_path):
    spec = RunSpec(method="fedavg", preset="quick", rounds=1, results_dir=tmp_path / "r")
    tuning.tune_method(spec, load_registry(), 1, lambda *_: None)
    assert not list((tmp_path / "r" / "tuning" / "cache" / "federations").glob("*.pt"))


def test_tune_never_rewrites_a_study_it_did_not_write(tmp_path):
    study = tmp_path / "mine.toml"
    text = '# my ablation\nname = "mine"\ndataset = "synth-prostate"\npreset = "quick"\n'
    study.write_text(text + 'methods = ["fedavg"]\n')
    args = ["tune", "--method", "fedavg", "--preset", "quick", "--out", str(study)]
    result = CliRunner().invoke(app, [*args, "--results-dir", str(tmp_path / "r")])
    assert result.exit_code == 2 and "is not a study fedbench tune wrote" in result.output
    assert study.read_text() == text + 'methods = ["fedavg"]\n'
