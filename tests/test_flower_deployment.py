"""The Flower bridge deployed (issue 27): a SuperLink and three SuperNodes on the loopback
address (insecure mode, each SuperNode its own site), the project `fedbench flower new` wrote,
`flwr run`, and the run's final status read from Flower (`flwr ls`), never from an exit code;
then the record the server app wrote. A SuperNode killed during the run makes it fail in one
line naming the site, recorded failed. Prints the wall time and the bytes per round."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("flwr") is None, reason="needs fedbench[flower]"),
]
BIN = Path(sys.executable).parent
SITES = ("RUNMC", "BMC", "I2CVB")
FINISHED = "finished:"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Federation:
    """A SuperLink and one SuperNode per site, stopped when the test ends."""

    def __init__(self, home: Path) -> None:
        self.home, self.port = home, free_port()
        # Flower's processes start each other by name (flower-superexec, flwr-serverapp, ...)
        path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
        self.env = {**os.environ, "FLWR_HOME": str(home), "PATH": path}
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs: list = []

    def start(self, name: str, *args: str) -> None:
        """`args` in a process group of its own (what it starts is stopped with it)."""
        log = open(self.home / f"{name}.log", "w")  # noqa: SIM115 (closed in stop)
        self.logs.append(log)
        self.processes[name] = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            env=self.env,
            stdout=log,
            stderr=log,
            cwd=self.home,
            start_new_session=True,
        )

    def up(self) -> Federation:
        self.start(
            "superlink", "flower-superlink", "--insecure", "--port", str(self.port),
            "--disable-runtime-dependency-installation",
        )  # fmt: skip
        self.wait_for_port(self.port, self.processes["superlink"])
        for site in SITES:
            self.start(
                site, "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                "--port", str(free_port()), "--node-config", f"site='{site}'",
            )  # fmt: skip
        return self

    def flwr(self, *args: str, cwd: Path | None = None) -> dict:
        done = subprocess.run(
            [str(BIN / "flwr"), *args, "test", "--format", "json"],
            env=self.env, cwd=cwd, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        return json.loads(done.stdout)

    def run(self, project: Path, *config: str) -> str:
        extra = ["--run-config", " ".join(config)] if config else []
        started = self.flwr("run", str(project), *extra, cwd=project)
        assert started["success"], started
        return started["run-id"]

    def status(self, run_id: str, limit_s: float = 600) -> dict:
        """The run as Flower lists it once finished (polled)."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            (run,) = self.flwr("ls", "--run-id", run_id)["runs"]
            if run["status"].startswith(FINISHED):
                return run
            time.sleep(2)
        raise AssertionError(f"run {run_id} did not finish in {limit_s} s")

    def wait_for_port(self, port: int, process: subprocess.Popen, limit_s: float = 120) -> None:
        """Until `process` listens on the loopback `port` (the SuperLink, started)."""
        deadline = time.monotonic() + limit_s
        while True:
            if process.poll() is not None:
                log = (self.home / "superlink.log").read_text()[-2000:]
                raise AssertionError(f"the SuperLink exited:\n{log}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            assert time.monotonic() < deadline, f"nothing listens on port {port}"
            time.sleep(0.5)

    def wait_for_replies(self, count: int, limit_s: float = 300) -> None:
        """Until the SuperLink has taken `count` replies from the nodes (its log says each)."""
        deadline = time.monotonic() + limit_s
        while (self.home / "superlink.log").read_text().count("Push replies") < count:
            assert time.monotonic() < deadline, f"fewer than {count} replies in {limit_s} s"
            time.sleep(0.5)

    def stop(self) -> None:
        """Every process group ended (terminated, then killed after 20 s); the logs closed."""
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for log in self.logs:
            log.close()


@pytest.fixture
def federation(tmp_path):
    federation = Federation(tmp_path / "flwr")
    try:
        yield federation.up()
    finally:
        federation.stop()


def new_project(folder: Path) -> Path:
    from fedbench.cli import app

    args = ["flower", "new", str(folder), "--method", "fedavg", "--preset", "quick"]
    result = CliRunner().invoke(app, [*args, "--set", "data.num_sites=3"])
    assert result.exit_code == 0, result.output
    return folder


def records(project: Path) -> list[dict]:
    return [
        json.loads(p.read_text()) for p in sorted((project / "results" / "runs").glob("*.json"))
    ]


def test_two_rounds_on_three_supernodes_write_a_flower_marked_record(federation, tmp_path):
    project = new_project(tmp_path / "app")
    clock = time.perf_counter()
    run = federation.status(federation.run(project))
    wall = time.perf_counter() - clock
    assert run["status"] == "finished:completed", run["status-details"]
    (record,) = records(project)
    assert record["status"] == "ok"
    assert record["config"]["backend"] == {
        "name": "flower",
        "engine": "deployment",
        "flwr": "1.42.0",
    }
    cost = record["cost"]["federations"]["inside"]
    assert cost["rounds"] == 2 and cost["participation"] == [[0, 1, 2], [0, 1, 2]]
    sites = {m["site"] for m in record["metrics"] if m["regime"] == "inside"}
    assert set(SITES) <= sites
    traffic = run["network-traffic"]
    print(
        f"\ndeployment: {wall:.0f} s from `flwr run` to finished; per round, fedbench counted "
        f"{(cost['bytes_down'] + cost['bytes_up']) / 2:.0f} B, Flower serialized "
        f"{(cost['flower_bytes_train_down'] + cost['flower_bytes_train_up']) / 2:.0f} B of "
        f"training messages; Flower's own count for the whole run: {traffic['total-bytes']} B"
    )


def test_a_killed_supernode_fails_the_run_in_one_line_naming_its_site(federation, tmp_path):
    """Flower takes minutes to mark a run whose ServerApp exited (exit code 201) as
    finished:failed; the record is written at once, so this test reads it and then checks only
    that Flower does not call the run completed."""
    project = new_project(tmp_path / "app")
    run_id = federation.run(project, "round-timeout=20.0")
    federation.wait_for_replies(len(SITES))  # each has said which site it is
    os.killpg(federation.processes["BMC"].pid, signal.SIGKILL)
    deadline = time.monotonic() + 300
    while not (project / "results" / "runs").is_dir() or not records(project):
        assert time.monotonic() < deadline, "no record within 300 s"
        time.sleep(1)
    (record,) = records(project)
    assert record["status"] == "failed"
    # killed as its first reply lands, BMC may or may not have counted as connected (round 0)
    named = r"^site BMC: no (node answered .*\(round 0, connecting\)|reply in round \d+ \(\w)"
    assert re.match(named, record["error"]), record["error"]
    assert "\n" not in record["error"]
    (run,) = federation.flwr("ls", "--run-id", run_id)["runs"]
    assert run["status"] != "finished:completed"
