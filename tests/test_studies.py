"""Study files (`fedbench grid --study`, `fedbench leaderboard --study`), `--sweep` and
`--group-by`: the cells a study runs, the record keeping the study's name, a board of exactly the
study's cells with a row per variant, and every mistake in a study file as one line. Execution is
faked as in test_grid.py (a record whose Dice depends on the swept settings), so nothing trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_grid import TOY_PLUGIN, FakeExecute, grid
from typer.testing import CliRunner

from fedbench.backends import local as local_backend
from fedbench.backends.study import load_study, parse_sweep, part_variants, sweep_variants
from fedbench.cli import app
from fedbench.engine.run import Outcome
from fedbench.errors import FedbenchError

cli = CliRunner()
REPO = Path(__file__).resolve().parents[1]

ABLATION = """
name = "toy-ablation"
dataset = "grid-toy"
seeds = "0,1"
holdout = "a,b"
methods = ["fedprox"]
adapters = ["tent"]

[[part]]
name = "mu"
sweep = { "method.mu" = [0.0, 0.01, 0.1] }

[[part]]
name = "tent steps"
settings = { adapter.epochs = 3 }
"""


class ScoringExecute(FakeExecute):
    """A fake run whose Dice is 0.5 + mu inside and 0.4 + mu + epochs / 100 outside, so a board
    row can be traced back to the settings of its cells."""

    def __call__(self, run, registry, reporter) -> Outcome:
        outcome = super().__call__(run, registry, reporter)
        record = outcome.record
        mu = float(run.config["method"].get("mu", 0.0))
        epochs = float(run.config["adapter"].get("epochs", 0))
        for row in record["metrics"]:
            row["value"] = 0.5 + mu if row["regime"] == "inside" else 0.4 + mu + epochs / 100
        path = run.spec.results_dir / "runs" / f"{record['run_id']}.json"
        path.write_text(json.dumps(record))
        self.specs.append(run.spec)
        return outcome

    def __init__(self) -> None:
        super().__init__()
        self.specs: list = []


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    path = tmp_path / "grid_toy_plugin.py"
    path.write_text(TOY_PLUGIN)
    return path


@pytest.fixture
def study(tmp_path: Path) -> Path:
    path = tmp_path / "ablation.toml"
    path.write_text(ABLATION)
    return path


def run_study(plugin: Path, results: Path, study: Path, *args: str):
    command = ["--plugin", str(plugin), "grid", "--study", str(study)]
    return cli.invoke(app, [*command, "--results-dir", str(results), *args])


def board(plugin: Path, results: Path, *args: str) -> dict:
    command = ["--plugin", str(plugin), "leaderboard", "--results-dir", str(results)]
    result = cli.invoke(app, [*command, "--format", "json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def rows(payload: dict, regime: str) -> dict[str, float]:
    return {row["variant"]: row["mean"] for row in payload["boards"][regime]["rows"]}


def test_a_study_runs_each_distinct_cell_once_and_records_its_name(plugin, tmp_path, study):
    fake = ScoringExecute()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(local_backend, "execute", fake)
        first = run_study(plugin, tmp_path / "r", study)
        assert first.exit_code == 0, first.output
        # 3 mu values + 1 tent part, 2 seeds; tent's part differs from mu=0.01 (the default)
        assert len(fake.calls) == 8
        assert {spec.study for spec in fake.specs} == {"toy-ablation"}
        assert {spec.variant for spec in fake.specs} == {
            "mu: method.mu=0.0",
            "mu: method.mu=0.01",
            "mu: method.mu=0.1",
            "tent steps",
        }
        again = run_study(plugin, tmp_path / "r", study)
        assert again.exit_code == 0 and len(fake.calls) == 8  # all done: nothing reruns


def test_a_default_value_in_a_sweep_is_one_cell_shared_by_its_parts(plugin, tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        'name = "dup"\ndataset = "grid-toy"\nseeds = "0"\nholdout = "a"\nmethods = ["fedprox"]\n'
        '[[part]]\nname = "x"\nsweep = { "method.mu" = [0.01, 0.1] }\n'
        '[[part]]\nname = "reference"\n'
    )
    fake = ScoringExecute()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(local_backend, "execute", fake)
        assert run_study(plugin, tmp_path / "r", path).exit_code == 0
    assert len(fake.calls) == 2  # fedprox's default mu is 0.01: "reference" is mu=0.01
    payload = board(plugin, tmp_path / "r", "--study", str(path))
    outside = rows(payload, "outside")
    assert set(outside) == {"x: method.mu=0.01", "x: method.mu=0.1", "reference"}
    assert outside["reference"] == pytest.approx(outside["x: method.mu=0.01"])


def test_the_study_board_has_a_row_per_variant_and_only_the_studys_runs(plugin, tmp_path, study):
    fake = ScoringExecute()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(local_backend, "execute", fake)
        assert run_study(plugin, tmp_path / "r", study).exit_code == 0
        # a run outside the study, on the same results folder, must not reach its board
        assert grid(plugin, tmp_path / "r", "--method", "fedavg", "--seeds", "0").exit_code == 0
    payload = board(plugin, tmp_path / "r", "--study", str(study))
    outside = rows(payload, "outside")
    assert outside == pytest.approx(
        {
            "mu: method.mu=0.0": 0.4 + 0.0 + 0.02,  # the default preset: 2 epochs
            "mu: method.mu=0.01": 0.4 + 0.01 + 0.02,
            "mu: method.mu=0.1": 0.4 + 0.1 + 0.02,
            "tent steps": 0.4 + 0.01 + 0.03,
        }
    )
    # inside, the tent part trains the same federation as the default: no row of its own
    assert rows(payload, "inside") == pytest.approx(
        {"mu: method.mu=0.0": 0.5, "mu: method.mu=0.01": 0.51, "mu: method.mu=0.1": 0.6}
    )
    assert {row["method"] for row in payload["boards"]["outside"]["rows"]} == {"fedprox"}
    assert any("8 of 8 cell(s) have an ok record" in note for note in payload["notes"])


def test_sweep_on_the_command_line_and_group_by(plugin, tmp_path):
    fake = ScoringExecute()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(local_backend, "execute", fake)
        args = ["--method", "fedprox", "--adapter", "tent", "--seeds", "0", "--holdout", "a"]
        sweep = ["--sweep", "method.mu=0,0.2", "--sweep", "adapter.epochs=1,2"]
        result = grid(plugin, tmp_path / "r", *args, *sweep)
    assert result.exit_code == 0, result.output
    assert len(fake.calls) == 4  # the product
    by_mu = board(plugin, tmp_path / "r", "--group-by", "method.mu")
    assert rows(by_mu, "inside") == pytest.approx({"method.mu=0.0": 0.5, "method.mu=0.2": 0.7})
    by_epochs = board(plugin, tmp_path / "r", "--group-by", "adapter.epochs")
    outside = rows(by_epochs, "outside")
    assert set(outside) == {"adapter.epochs=1", "adapter.epochs=2"}
    # each row averages the two mu values (the other swept key), and says so
    assert outside["adapter.epochs=2"] - outside["adapter.epochs=1"] == pytest.approx(0.01)
    assert outside["adapter.epochs=1"] == pytest.approx(0.4 + 0.1 + 0.01)
    assert any("averages the runs" in note for note in by_epochs["notes"])
    assert set(rows(by_epochs, "inside")) == {"-"}  # adapter settings make no inside rows


def test_parse_sweep_and_its_product():
    sweep = parse_sweep(["method.mu=0,0.01", "adapter.epochs=1,2,3"])
    assert sweep == {"method.mu": ["0", "0.01"], "adapter.epochs": ["1", "2", "3"]}
    variants = sweep_variants(sweep)
    assert len(variants) == 6
    assert variants[0].overrides == ("method.mu=0", "adapter.epochs=1")
    assert sweep_variants({})[0].overrides == ()
    for bad in (["mu=1,2"], ["method.mu="], ["method.mu"], ["method.mu=1,1"]):
        with pytest.raises(FedbenchError):
            parse_sweep(bad)
    with pytest.raises(FedbenchError, match="given twice"):
        parse_sweep(["method.mu=1", "method.mu=2"])
    with pytest.raises(FedbenchError, match="combinations"):
        sweep_variants({f"a.k{i}": ["1", "2"] for i in range(11)})


def test_nested_and_quoted_setting_keys_mean_the_same(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        'methods = ["fedavg"]\n[settings]\ntrain.lr = 0.01\n"data.size" = 32\n'
        '[[part]]\nname = "p"\nsweep = { method = { mu = [1, 2] } }\n'
    )
    found = load_study(path)
    assert found.name == "s"  # the file's stem when it names none
    (part,) = found.parts
    assert part.settings == ["train.lr=0.01", "data.size=32"]
    assert [v.overrides for v in part_variants(part)] == [
        ("train.lr=0.01", "data.size=32", "method.mu=1"),
        ("train.lr=0.01", "data.size=32", "method.mu=2"),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("methods = [", "is not valid TOML"),
        ('methods = ["fedavg"]\nseed = 1', "unknown key 'seed'"),
        ('name = "x"', "'methods' is missing"),
        ('methods = "fedavg"\n[[part]]\nname = "a"\n[[part]]\nname = "a"', "same name"),
        ("methods = [1]", "'methods' must be a list of names"),
        ('methods = ["fedavg"]\nrounds = 0', "'rounds' must be a positive integer"),
        ('methods = ["fedavg"]\nsweep = { "method.mu" = [] }', "non-empty list"),
        ('methods = ["fedavg"]\n[[part]]\nmode = 1', "part 1: unknown key 'mode'"),
    ],
)
def test_a_bad_study_file_is_one_line(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(FedbenchError, match=message):
        load_study(path)


def test_study_mistakes_on_the_command_line(plugin, tmp_path, study):
    missing = run_study(plugin, tmp_path / "r", tmp_path / "nope.toml")
    assert missing.exit_code != 0
    assert "cannot read study" in missing.output and "Traceback" not in missing.output
    mixed = run_study(plugin, tmp_path / "r", study, "--method", "fedavg", "--set", "train.lr=1")
    assert mixed.exit_code == 2
    assert "--study names its own cells; drop --method, --set" in mixed.output
    unknown = tmp_path / "u.toml"
    unknown.write_text('dataset = "grid-toy"\nmethods = ["fedavgg"]\n')
    result = run_study(plugin, tmp_path / "r", unknown)
    assert result.exit_code != 0 and "fedavgg" in result.output
    assert not (tmp_path / "r" / "runs").exists() or not any((tmp_path / "r" / "runs").iterdir())


@pytest.mark.parametrize("name", ["reference.toml", "iopfl-ablation.toml"])
def test_the_shipped_studies_expand(name):
    from fedbench.cli.studies import study_specs
    from fedbench.engine.registry import load_registry
    from fedbench.engine.resolve import RunSpec

    specs = study_specs(REPO / "results" / "studies" / name, RunSpec(method=""), load_registry())
    assert specs and all(
        s.study == load_study(REPO / "results" / "studies" / name).name for s in specs
    )


def test_the_record_keeps_the_study_and_variant(plugin):
    from fedbench.engine.registry import load_registry
    from fedbench.engine.resolve import RunSpec, resolve
    from fedbench.engine.run import run_identity
    from fedbench.results.record import build_record

    reg = load_registry((plugin,))
    spec = RunSpec(method="fedavg", dataset="grid-toy", study="s", variant="mu: method.mu=0")
    identity = run_identity(resolve(spec, reg))
    record = build_record(
        run_id="x",
        status="failed",
        identity=identity,
        holdouts=[],
        config={},
        config_hash="h",
        device="cpu",
        started_at="t",
        wall_s=0.0,
        error="e",
    )
    assert (record["study"], record["variant"]) == ("s", "mu: method.mu=0")
    plain = run_identity(resolve(RunSpec(method="fedavg", dataset="grid-toy"), reg))
    assert "study" not in plain and "variant" not in plain


def test_the_readme_study_is_a_valid_study(tmp_path):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "readme.toml").write_text(block)
    found = load_study(tmp_path / "readme.toml")
    assert [p.name for p in found.parts] == ["mu", "tent"]
    assert [len(part_variants(p)) for p in found.parts] == [3, 1]


def test_a_full_disk_stops_the_grid_with_one_line_and_no_failed_record(plugin, tmp_path):
    """Every next cell would fail the same way, and a failed record would keep it from rerunning."""
    from fedbench.storage import StorageError

    def full_disk(run, registry, reporter):
        raise StorageError(f"cannot write {run.spec.results_dir}/runs/x.json: No space left")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(local_backend, "execute", full_disk)
        result = grid(plugin, tmp_path / "r", "--method", "fedavg", "--seeds", "0,1")
    assert result.exit_code != 0
    assert "No space left" in result.output and "Traceback" not in result.output
    assert not list((tmp_path / "r" / "runs").glob("*.json"))


def test_a_reference_part_keeps_its_inside_row_when_no_sweep_names_it(plugin, tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        'name = "ref"\ndataset = "grid-toy"\nseeds = "0"\nholdout = "a"\nmethods = ["fedprox"]\n'
        '[[part]]\nname = "reference"\n'
        '[[part]]\nname = "mu"\nsweep = { "method.mu" = [0.0, 0.1] }\n'
    )
    fake = ScoringExecute()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(local_backend, "execute", fake)
        assert run_study(plugin, tmp_path / "r", path).exit_code == 0
    inside = rows(board(plugin, tmp_path / "r", "--study", str(path)), "inside")
    assert inside == pytest.approx(
        {"reference": 0.51, "mu: method.mu=0.0": 0.5, "mu: method.mu=0.1": 0.6}
    )


def test_options_the_study_sets_itself_are_refused_beside_it(plugin, tmp_path, study):
    result = run_study(plugin, tmp_path / "r", study, "--preset", "quick", "--seeds", "0")
    assert result.exit_code == 2
    assert "drop --seeds, --preset" in result.output
