"""`fedbench tune --backend ray`: trials run as parallel Ray tasks on one study, and the
tuning they make is the one a local tuning reads back (nothing run twice)."""

from __future__ import annotations

import optuna
import pytest
from typer.testing import CliRunner

from fedbench.backends.ray_tuning import shares
from fedbench.cli import app

pytest.importorskip("ray")


def test_trials_are_shared_evenly_and_no_task_is_empty():
    assert shares(5, 2) == [3, 2] and shares(1, 4) == [1] and shares(0, 2) == []
    assert sum(shares(17, 3)) == 17 and max(shares(17, 3)) - min(shares(17, 3)) <= 1


@pytest.mark.slow
def test_parallel_trials_on_ray_fill_one_study(tmp_path):
    results = tmp_path / "r"
    # default-preset trials of several seconds: the second Ray worker, which takes seconds to
    # start, still finds the first trial running
    args = ["tune", "--method", "fedavg", "--preset", "default", "--rounds", "2", "--trials", "2"]
    args += ["--results-dir", str(results), "--backend", "ray", "--parallel", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (summary,) = optuna.get_all_study_summaries(f"sqlite:///{results / 'tuning' / 'optuna.db'}")
    study = optuna.load_study(
        study_name=summary.study_name, storage=f"sqlite:///{results / 'tuning' / 'optuna.db'}"
    )
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    first, second = sorted(trials, key=lambda t: t.datetime_start)
    assert second.datetime_start < first.datetime_complete, "the two trials did not overlap"
    assert first.params != second.params
    local = CliRunner().invoke(app, [*args[:-4]])  # the same tuning, now local: all done
    assert local.exit_code == 0 and ": trial " not in local.output
