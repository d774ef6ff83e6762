"""The benches that need a command's whole job (a distillation, a sample grid) run the command itself, as a user
would: `python -m diffuse NAME OVERRIDES hydra.run.dir=OUT`, one process each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run_command(name: str, overrides: list[str], out: Path) -> None:
    """`diffuse NAME OVERRIDES` with its run dir at `out`; its output is the bench's, and a failure stops the bench."""
    subprocess.run([sys.executable, "-m", "diffuse", name, *overrides, f"hydra.run.dir={out}"], check=True)


def sample(overrides: list[str], out: Path) -> dict:
    """`diffuse sample` into `out`; its sample.json record (n, nfe, ...)."""
    run_command("sample", overrides, out)
    return json.loads((out / "sample.json").read_text())
