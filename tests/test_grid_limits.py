"""Plans no machine could run are refused before they are expanded (issue 31, item 4): a grid's
or a study's total cells are capped, and a study file nested too deep is one line."""

from __future__ import annotations

import time

from test_bad_settings import one_line
from typer.testing import CliRunner

from fedbench.backends.grid import MAX_CELLS
from fedbench.cli import app

MU = ",".join(str(i / 1000) for i in range(1, 1000))  # 999 values


def test_a_grid_product_of_sweeps_and_seeds_is_refused_before_expansion(tmp_path):
    clock = time.perf_counter()
    args = ["grid", "--method", "all", "--sweep", f"method.mu={MU}", "--seeds", "0-999"]
    line = one_line([*args, "--dry-run"], tmp_path)
    assert line.startswith("error: the grid asks for ") and f"at most {MAX_CELLS:,}" in line
    assert time.perf_counter() - clock < 30  # nothing was expanded


def test_a_study_of_many_parts_is_counted_as_a_whole(tmp_path):
    """Each part alone under the cap (1 method x 999 values x 10 seeds), 20 together over it."""
    parts = "".join(
        f'[[part]]\nname = "p{i}"\nsweep = {{ "method.mu" = [{MU}] }}\n' for i in range(20)
    )
    study = tmp_path / "big.toml"
    study.write_text(f'name = "big"\nseeds = "0-9"\nmethods = ["fedprox"]\n{parts}')
    line = one_line(["grid", "--study", str(study), "--dry-run"], tmp_path)
    assert line.startswith(f"error: study {study} asks for 199,800 cells; at most {MAX_CELLS:,}")


def test_a_study_nested_thousands_deep_is_one_line(tmp_path):
    study = tmp_path / "deep.toml"
    study.write_text(
        'name = "deep"\nmethods = ["fedavg"]\nsettings = '
        + "{a = " * 5000
        + "1"
        + "}" * 5000
        + "\n"
    )
    line = one_line(["grid", "--study", str(study), "--dry-run"], tmp_path)
    assert line.startswith(f"error: study {study}")


# issue 31, item 7: settings that silently lose, and labels that mean nothing


def test_a_sweep_of_a_key_that_set_also_gives_is_refused(tmp_path):
    args = ["grid", "--method", "fedprox", "--set", "method.mu=0.5", "--sweep", "method.mu=0,0.1"]
    line = one_line([*args, "--dry-run"], tmp_path)
    assert "setting method.mu is given twice" in line


def test_a_study_part_sweeping_a_key_its_settings_fix_is_refused(tmp_path):
    study = tmp_path / "clash.toml"
    study.write_text(
        'methods = ["fedprox"]\n[[part]]\nname = "p"\nsettings = { "method.mu" = 0.5 }\n'
        'sweep = { "method.mu" = [0.0, 0.1] }\n'
    )
    line = one_line(["grid", "--study", str(study), "--dry-run"], tmp_path)
    assert "setting method.mu is given twice" in line


def test_a_study_sweep_repeating_a_value_is_refused(tmp_path):
    study = tmp_path / "again.toml"
    study.write_text('methods = ["fedprox"]\nsweep = { "method.mu" = [0.1, 0.1] }\n')
    line = one_line(["grid", "--study", str(study), "--dry-run"], tmp_path)
    assert line.endswith("sweep 'method.mu' repeats a value")


def test_group_by_a_setting_no_record_has_is_one_line(tmp_path):
    from test_leaderboard import make_record, write

    write(tmp_path, make_record("a0", "a", 0, {"x": 0.5}))
    result = CliRunner().invoke(
        app, ["leaderboard", "--results-dir", str(tmp_path), "--group-by", "method.nope"]
    )
    assert result.exit_code != 0
    assert result.stderr.strip() == (
        "error: --group-by method.nope: no record has that setting (e.g. method.mu)"
    )


def test_a_dry_run_with_a_bad_sweep_value_exits_non_zero(tmp_path):
    args = ["grid", "--method", "fedprox", "--sweep", "method.mu=0.1,abc", "--dry-run"]
    result = CliRunner().invoke(app, [*args, "--results-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert (
        result.stderr.strip().splitlines()[-1] == "error: 3 cell(s) cannot run (listed above)"
    )  # 3 seeds


def test_a_dry_run_writes_nothing(tmp_path):
    """So it works on a results folder it could not write to (a read-only copy of records)."""
    results = tmp_path / "fresh"
    args = ["grid", "--method", "fedavg", "--dry-run", "--track", "tensorboard"]
    result = CliRunner().invoke(app, [*args, "--results-dir", str(results)])
    assert result.exit_code == 0, result.output
    assert not results.exists()
