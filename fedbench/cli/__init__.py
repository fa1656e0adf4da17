"""The `fedbench` command line (Typer). `main` is the console entry point; importing this
package registers every command on `app`."""

from __future__ import annotations

import os

from fedbench.cli import datasets, grid, plugin, results, run  # noqa: F401  (each registers)
from fedbench.cli.app import app


def main() -> None:
    # Idle OpenMP threads sleep instead of spinning: with spinning, a second busy process on a
    # small machine (a grid, a test run) slows every torch step down many times over.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app()


__all__ = ["app", "main"]
