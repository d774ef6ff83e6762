"""The command line in a subprocess, as a user runs it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import HydraException
from typer.testing import CliRunner

from diffuse.cli import app
from diffuse.conf_help import FEW, conf_root, groups_of, options
from tests.conftest import compose
from tests.helpers import diffuse

TINY = [
    "dataset.size=64",
    "dataset.resolution=8",
    "model.ch=16",
    "model.ch_mult=[1,2]",
    "model.attn_resolutions=[4]",
    "trainer.batch_size=8",
    "trainer.log_every=2",
    "trainer.sample_n=4",
    "trainer.sample_steps=2",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cli")
    r = diffuse("train", *TINY, "trainer.steps=4", cwd=cwd)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("run dir: ")
    out = Path(last[len("run dir: ") :])
    assert out.parent == (cwd / "outputs" / "train").resolve()  # the documented default location
    return out


@pytest.mark.subprocess
def test_train_then_sample_end_to_end(run_dir, tmp_path):
    assert (run_dir / "checkpoints" / "last.safetensors").is_file()
    assert (run_dir / "config.yaml").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    r = diffuse(
        "sample",
        f"ckpt={run_dir}",
        "n=5",
        "batch_size=2",
        "steps=3",
        "save_npz=true",
        f"hydra.run.dir={tmp_path / 's'}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == f"run dir: {(tmp_path / 's').resolve()}"
    assert len(list((tmp_path / "s" / "images").glob("*.png"))) == 5
    assert (tmp_path / "s" / "samples.npz").is_file() and (tmp_path / "s" / "grid.png").is_file()


@pytest.mark.subprocess
def test_multirun_sweep_and_cfg_job(run_dir, tmp_path):
    r = diffuse(
        "sample",
        "-m",
        f"ckpt={run_dir}",
        "n=2",
        "sampler=ddim,ddpm",
        "steps=2",
        f"hydra.sweep.dir={tmp_path / 'sw'}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "sw" / "0" / "grid.png").is_file() and (tmp_path / "sw" / "1" / "grid.png").is_file()
    r = diffuse("train", "--cfg", "job", "model=small", "schedule=cosine", cwd=tmp_path)
    assert r.returncode == 0 and "kind: cosine" in r.stdout and "ch: 64" in r.stdout
    assert not (tmp_path / "outputs").exists()


# The whole bad-input matrix runs in process (test_bad_input.py, test_run_dir.py); these go through a real
# process: an override Hydra cannot compose, a bad value the job itself finds, and two that Hydra itself met.
@pytest.mark.subprocess
@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "model=huge"], "model/huge"),
        (["sample", "ckpt=/no/such/file.safetensors"], "does not exist"),
        # Hydra-level failures, once a 150-line traceback with exit 1 that left .hydra/ behind
        (["sample", "seed=${oc.env:DIFFUSE_TEST_UNSET}"], "seed=${oc.env:DIFFUSE_TEST_UNSET} cannot be resolved"),
        (["train", "hydra.run.dir=/dev/null"], "hydra.run.dir=/dev/null is not a directory"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(args, needle, run_dir, tmp_path):
    cmd, *rest = args
    if cmd == "sample" and not any(a.startswith(("ckpt=", "model=")) for a in rest):
        rest = [f"ckpt={run_dir}", *rest]
    r = diffuse(cmd, *rest, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*"))


@pytest.mark.subprocess
def test_help_reads_well(tmp_path):
    r = diffuse("--help", cwd=tmp_path)
    assert r.returncode == 0 and "train" in r.stdout and "sample" in r.stdout
    r = diffuse("train", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "diffuse train experiment=quickstart" in r.stdout and "runtime.device=auto" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "sample", "inpaint", "edit", "eval", "tune_schedule", "distill"])
def test_help_lists_every_option_of_every_group_and_each_composes(command, tmp_path):
    """The help is read from conf/: every file of every group the command composes is an option there, and
    composes. A group or option added to conf/ shows up without touching the help."""
    r = CliRunner().invoke(app, [command.replace("_", "-"), "--help"])
    assert r.exit_code == 0, r.output
    rows = {
        line.split()[0]: line.split()[1:] for line in r.output.splitlines() if line.startswith("    ") and line.split()
    }
    groups = groups_of(command)
    assert groups and {g for g, _ in groups} >= {"runtime", "sampler"} | ({"trainer"} if command == "train" else set())
    for group, default in groups:
        folder = group.split("@")[0]  # sampler@tune.reference: the sampler group, chosen for another key
        on_disk = sorted(p.name[:-5] for p in (conf_root() / folder).iterdir() if p.name.endswith(".yaml"))
        assert options(folder) == on_disk
        listed = [o.rstrip("*") for o in rows[group] if o not in ("|", "(none", "by", "default)")]
        assert sorted(listed) == on_disk, (group, rows[group])
        assert (f"{default}*" in rows[group]) if default else "(none" in rows[group]
        for option in on_disk:
            try:
                compose(command, [f"{group}={option}"])
            except HydraException as e:
                raise AssertionError(f"{command} {group}={option}: {e}") from None
    for key in compose(command, []).runtime:  # the runtime group's keys, each listed with its default
        assert f"runtime.{key}=" in r.output
    for group, _ in groups:  # a group of a few options: each option's keys (inherited ones too) under a heading
        package = {"method": "distill"}.get(group, group)
        if (
            "@" in group
            or len(options(group)) > FEW
            or options(group) == ["default"]
            or group in ("experiment", "hydra")
        ):
            continue
        for opt in options(group):
            section = r.output.split(f"{package}.* with {group}={opt}:")[1].split("\n\n")[0]
            listed = sorted(
                line.split("=")[0].strip() for line in section.strip().splitlines() if "=" in line.split()[0]
            )
            assert listed == sorted(f"{package}.{k}" for k in compose(command, [f"{group}={opt}"])[package]), (
                group,
                opt,
            )


@pytest.mark.subprocess
def test_moved_keys_point_to_their_new_place(tmp_path):
    r = diffuse("sample", "model=oracle", "device=cpu", cwd=tmp_path)
    assert (
        r.returncode == 2
        and r.stderr.strip()
        == "error: device= is now runtime.device= (the runtime group: device, precision and fast paths for every command)"
    )
    r = diffuse("train", "trainer.compile=true", cwd=tmp_path)
    assert r.returncode == 2 and "trainer.compile= is now runtime.compile=" in r.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigterm_saves_a_checkpoint_and_exits_0(tmp_path):
    """A preemptible cluster's contract: SIGTERM during training leaves a fresh checkpoint and exit code 0."""
    import signal
    import time

    from diffuse.checkpoint import load_checkpoint

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "diffuse",
            "train",
            *TINY,
            "trainer.steps=100000",
            "trainer.ckpt_every=100000",
            f"hydra.run.dir={out}",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.2)
    assert metrics.exists(), "training never logged a step"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "stopped by signal" in stdout
    ck = load_checkpoint(out / "checkpoints" / "last.safetensors")
    assert 2 <= ck.step < 100000
