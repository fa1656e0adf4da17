"""Plans no machine could run are refused before they are expanded (issue 31, item 4): a grid's
or a study's total cells are capped, and a study file nested too deep is one line."""

from __future__ import annotations

import time

from test_bad_settings import one_line

from fedbench.backends.grid import MAX_CELLS

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
