"""conf/ lives at the top of the repository and ships inside the wheel as the package diffuse.conf: a non-editable
install from a wheel and the editable install of the checkout both find it."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

from tests.helpers import ROOT


def _packages_on_disk() -> set[str]:
    found = {"diffuse.conf"}
    for init in (ROOT / "diffuse").rglob("__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT).parts))
    return found


def test_the_package_list_names_every_package_folder():
    """pyproject.toml lists the packages by hand (conf/ is mapped, invisible to the finder): none may be forgotten."""
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert sorted(listed) == sorted(_packages_on_disk())


def test_editable_install_reads_conf_from_the_checkout():
    import diffuse.conf

    assert Path(diffuse.conf.__file__).parent == ROOT / "conf"
    assert Path(diffuse.__file__).parent == ROOT / "diffuse"


@pytest.mark.subprocess
def test_a_built_wheel_carries_conf_and_composes_from_anywhere(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("diffuse", "conf"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "dist").glob("diffuse-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    yamls = sorted(str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml"))
    assert yamls and all(f"diffuse/conf/{y}" in names for y in yamls)
    assert not any(n.startswith("conf/") for n in names)  # no top-level "conf" package in site-packages

    target = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    # From a directory that is not the checkout, with the installed copy first on the path.
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    where = subprocess.run(
        [sys.executable, "-c", "import diffuse.conf; print(diffuse.conf.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert where.returncode == 0 and Path(where.stdout.strip()).parent == target / "diffuse" / "conf", where.stderr
    r = subprocess.run(
        [sys.executable, "-m", "diffuse", "train", "--cfg", "job", "experiment=fashion_mnist"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "name: fashion_mnist" in r.stdout and "model:" in r.stdout and "device: auto" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "diffuse", "inpaint", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "repaint* | conditioned | replace" in r.stdout, r.stdout
