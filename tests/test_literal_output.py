"""Strings fedbench did not write (paths, record fields, plugin text, study labels, values) are
printed literally: never read as rich markup, never as Markdown/HTML or spreadsheet formulas,
and never splitting a one-line message. Each case reproduces a finding of issue 31 (items 3, 7)."""

from __future__ import annotations

import json
import textwrap
from io import StringIO
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console
from test_grid import TOY_PLUGIN, FakeExecute
from test_leaderboard import make_record, write
from typer.testing import CliRunner

from fedbench.backends import local as local_backend
from fedbench.cli import app, run_app
from fedbench.cli.progress import RichReporter
from fedbench.engine import run as engine_run

cli = CliRunner()
MARKUP = "[/]<i>"
SCRIPT = "<script>alert(1)</script>"


def board_folder(tmp_path: Path, method: str = "fedavg", adapter: str = MARKUP) -> Path:
    """Two seeds of one method on a toy dataset, with an odd adapter and an odd site name."""
    results = tmp_path / "results"
    for seed in (0, 1):
        inside = {"x": 0.7 + seed / 10, "[red]y": 0.6}
        write(results, make_record(f"a{seed}", method, seed, inside, adapter=adapter))
    return results


def leaderboard(results: Path, *args: str):
    return cli.invoke(app, ["leaderboard", "--results-dir", str(results), *args])


def test_record_fields_on_the_terminal_board_are_literal(tmp_path):
    result = leaderboard(board_folder(tmp_path), "--format", "table")
    assert result.exit_code == 0, result.output
    assert MARKUP in result.stdout and "[red]y" in result.stdout


def test_record_fields_in_a_table_file_are_literal(tmp_path):
    out = tmp_path / "board.txt"
    result = leaderboard(board_folder(tmp_path), "--format", "table", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert MARKUP in out.read_text() and "[red]y" in out.read_text()


def plugin_file(tmp_path: Path, description: str) -> Path:
    path = tmp_path / "odd_plugin.py"
    path.write_text(
        textwrap.dedent(
            f"""
            from fedbench.hookspecs import hookimpl
            from fedbench_plugins.fedavg import FedAvg

            class Odd(FedAvg):
                name = "odd"
                description = {description!r}

            @hookimpl
            def fedbench_methods():
                return [Odd]
            """
        )
    )
    return path


def test_a_plugin_description_with_markup_is_listed_literally(tmp_path):
    path = plugin_file(tmp_path, "closes [/] and :smile:")
    result = cli.invoke(app, ["--plugin", str(path), "list", "methods"])
    assert result.exit_code == 0, result.output
    assert "closes [/] and :smile:" in result.stdout


def fake_record(run: object, adapter: str | None = None) -> engine_run.Outcome:
    """What execute returns for a run, without training."""
    spec = run.spec  # type: ignore[attr-defined]
    record = {
        "run_id": "fedavg-odd",
        "status": "ok",
        "method": "fedavg",
        "adapter": adapter,
        "dataset": "synth-prostate",
        "seed": spec.seed,
        "wall_s": 1.0,
        "cost": {"bytes_up": 0, "bytes_down": 0},
        "metrics": [
            {"regime": r, "site": "[b]s", "holdout": None, "metric": "dice", "value": 0.5}
            | {"selection": "final"}
            for r in ("inside", "outside")
        ],
    }
    return engine_run.Outcome(record, {})


@pytest.mark.parametrize("folder", ["r[/]", "r[bold]x", "r:smile:"])
def test_a_results_folder_with_markup_is_printed_as_given(tmp_path, monkeypatch, folder):
    monkeypatch.setattr(engine_run, "execute", lambda run, reg, rep: fake_record(run, MARKUP))
    results = tmp_path / folder
    args = ["run", "--method", "fedavg", "--holdout", "none", "--results-dir", str(results)]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"record {results / 'runs' / 'fedavg-odd.json'}" in result.stdout
    assert f"outside dice ({MARKUP})" in result.stdout and "[b]s" in result.stdout


def test_progress_labels_are_literal():
    buffer = StringIO()
    reporter = RichReporter(Console(file=buffer, force_terminal=True, width=120))
    reporter.start("federation without [/]", 2)
    reporter.advance()
    reporter.finish()
    reporter.close()
    assert "federation without [/]" in buffer.getvalue()


def test_a_study_part_with_markup_is_a_literal_row(tmp_path, monkeypatch):
    plugin = tmp_path / "grid_toy_plugin.py"
    plugin.write_text(TOY_PLUGIN)
    study = tmp_path / "odd.toml"
    study.write_text(
        'name = "odd"\ndataset = "grid-toy"\nseeds = "0"\nholdout = "a"\nmethods = ["fedprox"]\n'
        '[[part]]\nname = "[/]"\nsettings = { "method.mu" = 0.5 }\n'
    )
    monkeypatch.setattr(local_backend, "execute", FakeExecute())
    results = tmp_path / "r"
    base = ["--plugin", str(plugin)]
    ran = cli.invoke(app, [*base, "grid", "--study", str(study), "--results-dir", str(results)])
    assert ran.exit_code == 0, ran.output
    board = cli.invoke(
        app, [*base, "leaderboard", "--results-dir", str(results), "--study", str(study)]
    )
    assert board.exit_code == 0, board.output
    assert "[/]" in board.stdout


def test_markdown_cells_carry_no_newline_or_html(tmp_path):
    results = board_folder(tmp_path, method=f"evil\n{SCRIPT}", adapter="a|b")
    result = leaderboard(results, "--format", "md")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "<script>" not in text and "&lt;script&gt;" in text
    rows = [line for line in text.splitlines() if "evil" in line]
    assert len(rows) == 2 and all(line.startswith("| ") and line.endswith(" |") for line in rows)
    assert all("| evil\\\\n&lt;script&gt;" in line for line in rows)
    assert "| a\\|b |" in rows[1]  # the outside board has the adapter column
    assert "\\[red\\]y" in text  # a site name is a header: no link or markup either


def test_html_board_escapes_record_fields(tmp_path):
    result = leaderboard(board_folder(tmp_path, method=SCRIPT), "--format", "html")
    assert result.exit_code == 0, result.output
    assert SCRIPT not in result.stdout and "&lt;script&gt;" in result.stdout


@pytest.mark.parametrize("method", ["=1+2", "+cmd", "-2+3", "@SUM(A1)", "\t=x"])
def test_csv_text_cells_never_start_a_formula(tmp_path, method):
    results = board_folder(tmp_path, method=method, adapter="=HYPERLINK(1)")
    result = leaderboard(results, "--format", "csv")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(StringIO(result.stdout), keep_default_na=False)
    assert set(frame["method"]) == {"'" + method}
    assert set(frame["adapter"]) - {""} == {"'=HYPERLINK(1)"}
    assert frame["x"].dtype.kind == "f"  # numbers stay numbers, a negative one included


def test_csv_site_headers_never_start_a_formula(tmp_path):
    results = tmp_path / "results"
    write(results, make_record("a0", "m", 0, {"=x": 0.5, "-y": 0.4}))
    result = leaderboard(results, "--format", "csv")
    assert result.exit_code == 0, result.output
    header = result.stdout.splitlines()[0].split(",")
    assert "'=x" in header and "'-y" in header and "=x" not in header


def one_line(result) -> str:
    """The command's stderr, which must be exactly one line."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_an_unknown_name_with_a_newline_is_one_line(tmp_path):
    result = cli.invoke(app, ["run", "--method", "x\ny", "--results-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "'x\\ny'" in one_line(result)


def test_a_format_with_a_newline_is_one_line(tmp_path):
    result = leaderboard(board_folder(tmp_path), "--format", "md\nhtml")
    assert result.exit_code == 2
    assert one_line(result).startswith("error: unknown format 'md\\nhtml'")


def test_a_plugin_path_with_a_newline_is_one_line(tmp_path):
    missing = tmp_path / "my\nplugin.py"
    result = cli.invoke(app, ["--plugin", str(missing), "list", "methods"])
    assert result.exit_code == 2
    assert "my\\nplugin.py" in one_line(result)


def test_a_record_file_name_with_a_newline_is_one_warning(tmp_path):
    results = board_folder(tmp_path)
    (results / "runs" / "bad\nname.json").write_text("{")
    result = leaderboard(results, "--format", "json")
    assert result.exit_code == 0, result.output
    assert "bad\\nname.json" in one_line(result)
    json.loads(result.stdout)


def test_a_usage_error_with_a_newline_is_one_line(capsys):
    """A guard: Click already quotes these values; the line stays one line either way."""
    assert run_app(["leader\nboard"]) == 2
    assert run_app(["run", "--met\nhod", "x"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)


def test_csv_leaves_numbers_and_the_placeholder_as_they_are():
    from fedbench.results.formats import csv_text

    assert [csv_text(v) for v in ("-", "-0.5", "+1e-3", -2.0, "fedavg-ft")] == [
        "-",
        "-0.5",
        "+1e-3",
        -2.0,
        "fedavg-ft",
    ]
    assert [csv_text(v) for v in ("-cmd", "=1+2", "-inf x")] == ["'-cmd", "'=1+2", "'-inf x"]
