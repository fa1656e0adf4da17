"""fedbench's own files when the disk or the folder says no, or when they load with the wrong
structure (issue 16, items 4, 5 and 8): a full disk or a folder fedbench cannot write is one line
naming the path, never a failed record blaming the method, and nothing already written changes; a
cache entry or checkpoint that does not fit the model is one warning naming it, then retrained."""

from __future__ import annotations

import errno
import io
import json
import os
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.engine import cache
from fedbench.engine.federations import data_fingerprint, load_or_train
from fedbench.engine.registry import load_registry
from fedbench.engine.resolve import RunSpec, resolve
from fedbench.errors import FedbenchError
from fedbench.storage import write_atomic, write_text_atomic

TINY = ["model.channels=[4,8]", "data.cases_per_site=3", "data.size=16", "data.num_sites=3"]
TINY += ["data.slices_per_case=2"]
FULL = "No space left on device"
HAS_PROC_FD = Path("/proc/self/fd").is_dir()
needs_proc_fd = pytest.mark.skipif(not HAS_PROC_FD, reason="needs /proc/self/fd to know a file")


def run_tiny(results: Path, *extra: str):
    """`fedbench run` of a one-round fedavg on three tiny sites, inside only."""
    args = ["run", "--method", "fedavg", "--preset", "quick", "--rounds", "1", "--holdout"]
    args += ["none", "--results-dir", str(results), "--json", *extra]
    for setting in TINY:
        args += ["--set", setting]
    return CliRunner().invoke(app, args)


def error_line(result) -> str:
    """The one line a failed command printed (no traceback, nothing else)."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def files_under(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` with its bytes (what must stay unchanged)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


class FillingFile(io.FileIO):
    """A file on a disk with `room` bytes left: a write past them fails as the OS answers."""

    def __init__(self, fd: int, disk: dict[str, int]) -> None:
        super().__init__(fd, "wb")
        self.disk = disk

    def write(self, data) -> int:
        size = len(memoryview(data))
        if size > self.disk["room"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.disk["room"] -= size
        return super().write(data)


def full_disk(monkeypatch, folder: Path, room: int = 0) -> None:
    """Files opened for writing below `folder` (by fd, as fedbench's temp files are) sit on a
    disk that fills after `room` bytes."""
    real_fdopen, disk = os.fdopen, {"room": room}

    def fdopen(fd: int, mode: str = "r", *args, **kwargs):
        where = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if "w" in mode and Path(folder).resolve() in where.parents:
            return io.BufferedWriter(FillingFile(fd, disk))
        return real_fdopen(fd, mode, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", fdopen)


def read_only(monkeypatch, folder: Path) -> None:
    """`folder` and everything under it behave as read-only for a user who is not root:
    creating a file or a folder there is refused (tests run as root, where chmod is not)."""
    real_open, real_mkdir, top = os.open, os.mkdir, Path(folder).resolve()

    def inside(path) -> bool:
        where = Path(path).resolve()
        return where == top or top in where.parents

    def guarded_open(path, flags, *args, **kwargs):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR) and inside(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if inside(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)


# --- a full disk -------------------------------------------------------------------------


def test_a_full_disk_keeps_the_old_file_whole_and_names_it(tmp_path, monkeypatch):
    target = tmp_path / "out" / "record.json"
    write_text_atomic(target, "old and whole")
    monkeypatch.setattr(
        os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, FULL))
    )
    with pytest.raises(FedbenchError) as caught:
        write_text_atomic(target, "new")
    assert str(caught.value) == f"cannot write {target}: {FULL}"
    assert isinstance(caught.value, OSError), "code that tolerates an unwritable cache still can"
    assert files_under(tmp_path / "out") == {"record.json": b"old and whole"}


@needs_proc_fd
@pytest.mark.parametrize("room", [0, 3000])
def test_torch_save_on_a_full_disk_names_the_file_not_torch(tmp_path, monkeypatch, room):
    """A little room makes torch.save fail with its own RuntimeError; the disk's answer wins."""
    target = tmp_path / "out" / "entry.pt"
    write_atomic(target, lambda handle: handle.write(b"old"))
    full_disk(monkeypatch, tmp_path / "out", room)
    payload = {"weights": torch.zeros(20_000)}
    with pytest.raises(FedbenchError) as caught:
        write_atomic(target, lambda handle: torch.save(payload, handle))
    assert str(caught.value) == f"cannot write {target}: {FULL}"
    assert files_under(tmp_path / "out") == {"entry.pt": b"old"}


@needs_proc_fd
@pytest.mark.parametrize(
    ("folder", "room"),
    [("runs", 0), ("cache/federations", 0), ("cache/checkpoints", 3000), ("predictions", 0)],
)
def test_a_full_disk_during_a_run_is_one_line_and_no_failed_record(
    tmp_path, monkeypatch, folder, room
):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "earlier.json").write_text('{"kept": true}')
    (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    full_disk(monkeypatch, tmp_path / folder, room)
    line = error_line(run_tiny(tmp_path))
    suffix = "json" if folder == "runs" else "npz" if folder == "predictions" else "pt"
    pattern = rf"error: cannot write {re.escape(str(tmp_path / folder))}/[^ /]+\.{suffix}: {FULL}"
    assert re.fullmatch(pattern, line), line
    assert "method" not in line and "failed" not in line, "the disk is named, not the method"
    assert files_under(runs) == {"earlier.json": b'{"kept": true}'}, "no failed record"
    assert not [p for p in tmp_path.rglob("*.tmp")], "no temp file left behind"


# --- folders fedbench cannot write -------------------------------------------------------


@pytest.mark.parametrize(
    "folder", ["cache", "cache/federations", "cache/checkpoints", "predictions"]
)
def test_a_file_where_fedbench_writes_a_folder_is_refused_before_training(tmp_path, folder):
    (tmp_path / folder).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / folder).write_text("not a folder")
    before = files_under(tmp_path)
    line = error_line(run_tiny(tmp_path))
    assert line == f"error: {tmp_path / folder} is a file, not a folder"
    assert files_under(tmp_path) == before, "nothing written, nothing changed"


@pytest.mark.parametrize("folder", ["cache", "predictions"])
def test_a_read_only_folder_is_refused_before_training(tmp_path, monkeypatch, folder):
    (tmp_path / folder).mkdir(parents=True)
    read_only(monkeypatch, tmp_path / folder)
    line = error_line(run_tiny(tmp_path))
    assert line == f"error: cannot write in {tmp_path / folder}: Permission denied"
    assert not list((tmp_path / "runs").glob("*.json")), "no failed record blaming the method"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_a_chmod_read_only_cache_is_refused_before_training(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache").chmod(0o555)
    try:
        line = error_line(run_tiny(tmp_path))
    finally:
        (tmp_path / "cache").chmod(0o755)
    assert line == f"error: cannot write in {tmp_path / 'cache'}: Permission denied"


# --- cache entries and checkpoints of the wrong structure --------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A resolved one-round fedavg run on three tiny sites and its data."""
    results = tmp_path_factory.mktemp("tiny")
    spec = RunSpec("fedavg", preset="quick", rounds=1, overrides=TINY, results_dir=results)
    spec.keep_checkpoints = True
    run = resolve(spec, load_registry())
    return run, run.dataset.load(run.config["data"], 0, results / "cache")


def paths(run, data) -> tuple[Path, Path]:
    """The federation cache entry and the checkpoint of the run's inside federation."""
    identity = run.federation_identity(None, data_fingerprint(data))
    results = Path(run.spec.results_dir)
    return cache.cache_path(results, identity), cache.cache_path(results, identity, "checkpoints")


def warnings_in(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("warning: ")]


def same_federation(a, b) -> bool:
    states = zip([a.global_state, *a.personalized], [b.global_state, *b.personalized], strict=True)
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in states)


def tamper_entry(payload, how: str):
    if how == "no global":
        del payload["global"]
    elif how == "wrong shape":
        key = next(k for k, v in payload["global"].items() if v.dim() > 1)
        payload["global"][key] = torch.zeros(3)
    elif how == "one site short":
        payload["personalized"], payload["sites"] = (
            payload["personalized"][:-1],
            payload["sites"][:-1],
        )
    elif how == "other keys":
        payload["personalized"][0] = {"bogus.weight": torch.zeros(2)}
    elif how == "not a dict":
        payload = [1, 2, 3]
    return payload


@pytest.mark.parametrize(
    "how", ["no global", "wrong shape", "one site short", "other keys", "not a dict"]
)
def test_a_cache_entry_that_does_not_fit_is_one_warning_and_retrained(tiny, capsys, how):
    run, data = tiny
    good = load_or_train(run, data, None, lambda *_: None)
    entry, _ = paths(run, data)
    payload = tamper_entry(torch.load(entry, weights_only=True), how)
    torch.save(payload, entry)
    capsys.readouterr()
    again = load_or_train(run, data, None, lambda *_: None)
    (warning,) = warnings_in(capsys.readouterr().err)
    assert warning.startswith(f"warning: ignoring the cached federation {entry}: ")
    assert warning.endswith("; training it again")
    assert same_federation(again, good), "retrained from scratch to the same models"
    assert cache.load(entry, run.device, lambda: run.build_model(data.task)) is not None
    assert not warnings_in(capsys.readouterr().err), "the entry was overwritten with a good one"


def tamper_snapshot(saved, how: str):
    if how == "other keys":
        saved["training"]["global_state"] = {"bogus.weight": torch.zeros(2)}
    elif how == "client short":
        saved["training"]["client_states"] = saved["training"]["client_states"][:-1]
    elif how == "wrong shape":
        state = saved["training"]["client_states"][0]
        state[next(k for k, v in state.items() if v.dim() > 1)] = torch.zeros(5)
    elif how == "no progress":
        del saved["progress"]
    elif how == "round is text":
        saved["round"] = "one"
    return saved


@pytest.mark.parametrize(
    "how", ["other keys", "client short", "wrong shape", "no progress", "round is text"]
)
def test_a_checkpoint_that_does_not_fit_is_one_warning_and_training_starts_over(tiny, capsys, how):
    run, data = tiny
    entry, checkpoint = paths(run, data)
    good = load_or_train(run, data, None, lambda *_: None)
    entry.unlink()
    saved = tamper_snapshot(torch.load(checkpoint, weights_only=True), how)
    torch.save(saved, checkpoint)
    capsys.readouterr()
    again = load_or_train(run, data, None, lambda *_: None)
    (warning,) = warnings_in(capsys.readouterr().err)
    assert warning.startswith(f"warning: ignoring the checkpoint {checkpoint}: ")
    assert warning.endswith("; training from round 1")
    assert same_federation(again, good)


def test_a_cache_entry_of_the_wrong_shape_reruns_from_the_command_line(tmp_path):
    assert run_tiny(tmp_path).exit_code == 0
    (entry,) = (tmp_path / "cache" / "federations").glob("*.pt")
    payload = torch.load(entry, weights_only=True)
    torch.save(tamper_entry(payload, "wrong shape"), entry)
    result = run_tiny(tmp_path)
    assert result.exit_code == 0, result.output
    (warning,) = warnings_in(result.stderr)
    assert warning.startswith(f"warning: ignoring the cached federation {entry}: ")
    assert json.loads(result.stdout)["status"] == "ok"


# --- settings checked before training ----------------------------------------------------


def resolved(*overrides: str, preset: str = "default", seed: int = 0):
    return resolve(
        RunSpec("fedavg", preset=preset, seed=seed, overrides=list(overrides)), load_registry()
    )


@pytest.mark.parametrize(
    ("size", "preset", "model", "multiple", "examples"),
    [
        (18, "default", "unet", 8, "16 or 24"),
        (18, "quick", "unet", 4, "16 or 20"),
        (40, "paper", "release-unet", 16, "32 or 48"),
        (3, "default", "unet", 8, "8 or 16"),
    ],
)
def test_an_image_size_the_model_cannot_take_is_refused_when_resolved(
    size, preset, model, multiple, examples
):
    with pytest.raises(FedbenchError) as caught:
        resolved(f"data.size={size}", preset=preset)
    assert str(caught.value) == (
        f"setting data.size={size} does not fit model '{model}': it takes sizes that are a "
        f"multiple of {multiple} (e.g. {examples})"
    )


def test_data_size_18_is_one_line_from_the_command_line(tmp_path):
    args = ["run", "--method", "fedavg", "--set", "data.size=18", "--results-dir", str(tmp_path)]
    line = error_line(CliRunner().invoke(app, args))
    assert line == (
        "error: setting data.size=18 does not fit model 'unet': it takes sizes that are a "
        "multiple of 8 (e.g. 16 or 24)"
    )
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


@pytest.mark.parametrize(
    ("size", "preset"), [(16, "default"), (24, "default"), (96, "paper"), (12, "quick")]
)
def test_image_sizes_the_model_takes_still_resolve(size, preset):
    assert resolved(f"data.size={size}", preset=preset).config["data"]["size"] == size


@pytest.mark.parametrize("value", ["0", "-16"])
def test_a_size_below_one_is_refused(value):
    with pytest.raises(
        FedbenchError, match=rf"^setting data.size must be an integer of at least 1, got {value}$"
    ):
        resolved(f"data.size={value}")


def test_a_seed_of_10_to_the_23_is_refused_everywhere(tmp_path):
    big = str(10**23)
    with pytest.raises(FedbenchError, match="^seed must be an integer from 0 to 4294967295"):
        resolved(seed=10**23)
    for args in (
        ["run", "--method", "fedavg", "--seed", big],
        ["grid", "--method", "fedavg", "--seeds", big, "--dry-run"],
    ):
        line = error_line(CliRunner().invoke(app, [*args, "--results-dir", str(tmp_path)]))
        assert "4294967295" in line and big in line, line
