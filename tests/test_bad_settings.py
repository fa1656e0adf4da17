"""Bad seeds and settings are refused before any work, each with one line and a non-zero exit
(issue 16: unbounded seed ranges, negative or huge seeds, nan/inf learning rates, --rounds
fighting --set train.rounds)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fedbench.backends.grid import MAX_SEEDS, parse_seeds
from fedbench.cli import app
from fedbench.engine.config import MAX_SEED
from fedbench.errors import FedbenchError

RUN = ["run", "--method", "fedavg", "--preset", "quick"]


def one_line(args: list[str], tmp_path) -> str:
    result = CliRunner().invoke(app, [*args, "--results-dir", str(tmp_path)])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())
    return lines[0]


@pytest.mark.parametrize("seed", ["-1", str(10**23), str(MAX_SEED + 1)])
def test_a_seed_outside_what_generators_take_is_refused(seed, tmp_path):
    line = one_line([*RUN, "--seed", seed], tmp_path)
    assert line == f"error: seed must be an integer from 0 to {MAX_SEED}, got {int(seed)}"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0"])
def test_a_learning_rate_must_be_positive_and_finite(value, tmp_path):
    line = one_line([*RUN, "--set", f"train.lr={value}"], tmp_path)
    assert line.startswith("error: setting train.lr must be a positive finite number")


def test_rounds_given_twice_is_refused(tmp_path):
    line = one_line([*RUN, "--rounds", "3", "--set", "train.rounds=4"], tmp_path)
    assert line == "error: --rounds and --set train.rounds both given; use one of them"


def test_a_huge_seed_range_is_refused_before_it_is_expanded(tmp_path):
    args = ["grid", "--method", "fedavg", "--seeds", "0-99999999", "--dry-run"]
    line = one_line(args, tmp_path)
    assert line == f"error: --seeds '0-99999999' asks for more than {MAX_SEEDS} seeds"


def test_seed_lists_within_the_bounds_parse():
    assert parse_seeds("0-2,5") == [0, 1, 2, 5]
    assert len(parse_seeds(f"0-{MAX_SEEDS - 1}")) == MAX_SEEDS
    assert parse_seeds(str(MAX_SEED)) == [MAX_SEED]
    for bad in (f"0-{MAX_SEEDS}", "-1", f"{MAX_SEED + 1}", "a", "", "0,5-3"):
        with pytest.raises(FedbenchError):
            parse_seeds(bad)


def fedbench_process(*args: str) -> subprocess.CompletedProcess:
    """The real entry point (Click's own error box is replaced in `main`, not in `app`)."""
    code = "from fedbench.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["run", "--rounds", "two"],
            "error: Invalid value for '--rounds': Input should be a valid integer, unable to "
            "parse string as an integer (see: fedbench run --help)",
        ),
        (
            ["run", "--method", "fedavg", "--checkpoint-every", "0"],
            "error: Invalid value for '--checkpoint-every': Input should be greater than or "
            "equal to 1 (see: fedbench run --help)",
        ),
        (
            ["grid"],
            "error: give --method NAME (repeat for more) or --study FILE "
            "(see: fedbench grid --help)",
        ),
    ],
)
def test_command_line_mistakes_are_one_line_not_a_box(args, expected):
    result = fedbench_process(*args)
    assert result.returncode == 2
    assert result.stderr.strip() == expected and result.stdout == ""


def test_a_bare_group_still_shows_its_help():
    result = fedbench_process("datasets")
    assert "prepare" in result.stdout and result.stderr == ""
