"""`fedbench flower new`: a ready Flower app project for one fedbench method and dataset. Its
components are fedbench's own apps (`fedbench.flower.apps`); its run config names the run as the
command line would, and a deployment changes it with `flwr run --run-config`."""

from __future__ import annotations

import re
from pathlib import Path

from fedbench.errors import FedbenchError
from fedbench.flower.plan import Plan
from fedbench.flower.run import ROUND_TIMEOUT_S

APP_MODULE = "fedbench_app.py"


def toml_value(value: object) -> str:
    """A TOML literal for a string, an int or a float."""
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def pyproject(plan: Plan, name: str) -> str:
    config = {**plan.run_config(), "round-timeout": ROUND_TIMEOUT_S}
    lines = "\n".join(f"{key} = {toml_value(value)}" for key, value in config.items())
    return f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "fedbench: {plan.method} on {plan.dataset}, as a Flower app"
license = "Apache-2.0"
# none: the SuperLink and SuperNodes run it in the environment where fedbench[flower] is
# installed (start the SuperLink with --disable-runtime-dependency-installation)
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedbench"

[tool.flwr.app.components]
serverapp = "fedbench_app:server_app"
clientapp = "fedbench_app:client_app"

[tool.flwr.app.config]
{lines}
"""


APP = '''"""This Flower app: fedbench's server and client apps (fedbench.flower.apps)."""

from fedbench.flower.apps import client_app, server_app

__all__ = ["client_app", "server_app"]
'''


def write_project(folder: Path, plan: Plan, sites: list[str]) -> list[Path]:
    """The project's files in `folder` (new, or empty); refuses a folder holding anything."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FedbenchError(f"{folder} exists and is not an empty folder; choose a new one")
    folder.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^a-z0-9]+", "-", f"fedbench-{plan.method}-{plan.dataset}".lower())
    files = {
        "pyproject.toml": pyproject(plan, name.strip("-")),
        APP_MODULE: APP,
        "README.md": readme(plan, sites),
    }
    for file, text in files.items():
        (folder / file).write_text(text)
    return [folder / file for file in files]


def readme(plan: Plan, sites: list[str]) -> str:
    nodes = "\n".join(
        f"flower-supernode --insecure --superlink 127.0.0.1:8000 --port {9094 + i} "
        f"--node-config \"site='{site}'\" &"
        for i, site in enumerate(sites)
    )
    return f"""# {plan.method} on {plan.dataset}, as a Flower app

Written by `fedbench flower new`. One SuperNode per site; each loads only its own site through
fedbench's dataset plugin (`--node-config "site='NAME'"`, and `data-path='...'` for a dataset
read from disk). The run's record is written to `results-dir` of `[tool.flwr.app.config]`.

On one machine, without TLS (a test):

```bash
flower-superlink --insecure --disable-runtime-dependency-installation &
{nodes}
flwr run . local-fedbench --stream   # local-fedbench: [superlink.local-fedbench] in
                                     # $FLWR_HOME/config.toml, address "127.0.0.1:8000",
                                     # insecure = true
```

For hospitals, follow Flower's guides for TLS (`--ssl-ca-certfile`, `--ssl-certfile`,
`--ssl-keyfile` on the SuperLink, `--root-certificates` on each SuperNode) and SuperNode
authentication (`--enable-supernode-auth` on the SuperLink, `flwr supernode register` with each
node's public key, `--auth-supernode-private-key` on the node); see fedbench's README, "Flower".
"""
