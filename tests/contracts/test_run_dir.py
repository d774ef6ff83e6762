"""A run dir is one live process's (diffuse.rundir.lock), unusable run dirs and output paths are one line before any
work, a refused command leaves its run dir as it was (.hydra/ included), a -m sweep is checked job by job before
its first job, and under torchrun a bad input is one line with exit 2 from every rank. In process through the
real CLI where possible; two real processes (a holder, then one refused; a SIGKILLed holder) and one torchrun
launch where a real process is the point."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from diffuse.checkpoint import load_checkpoint
from diffuse.cli import app
from diffuse.rundir import lock

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "dataset.size=32",
    "dataset.resolution=8",
    "model.ch=16",
    "model.ch_mult=[1,2]",
    "model.attn_resolutions=[4]",
    "trainer.batch_size=4",
    "trainer.sample_n=0",
    "trainer.log_every=1",
]
ORACLE = ["model=oracle", "dataset=gmm", "steps=2"]
# One cheap refusable invocation of every Hydra command (the mixture oracle: no checkpoint to train first).
COMMANDS = {
    "train": ["train", *TINY, "trainer.steps=1"],
    "train resume": ["train", *TINY, "trainer.steps=1", "resume=true"],
    "sample": ["sample", *ORACLE, "n=2"],
    "sample resume": ["sample", *ORACLE, "n=2", "resume=true"],
    "inpaint": ["inpaint", "--image", "{img}", "--mask", "{img}", *ORACLE, "inpaint.method=replace"],
    "edit": ["edit", "--image", "{img}", *ORACLE, "n=1"],
    "eval": ["eval", "--metric", "nll", *ORACLE, "likelihood.n=4", "likelihood.methods=[vlb]"],
    "tune-schedule": ["tune-schedule", *ORACLE, "n=2", "n_eval=2", "tune.iterations=0", "tune.reference_steps=4"],
}


def _invoke(args, cwd, monkeypatch):
    monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def _one_error(r, needle):
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stdout + r.stderr


def _state(root: Path) -> dict:
    """Every entry under root with its bytes (files) or None (dirs): what 'nothing changed' compares."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture
def image(tmp_path):
    from PIL import Image

    path = tmp_path / "img.png"
    Image.fromarray(torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()).save(path)
    return path


# ----------------------------------------------------------------------------------------------- class 1: the lock


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_run_dir_held_by_a_live_process_refuses_every_command_and_nothing_changes(
    command, tmp_path, image, monkeypatch
):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("the first run's record\n")
    (run / "config.yaml").write_text("the first run's config\n")
    holder = lock.acquire(run, "diffuse train")  # another open file: flock refuses this process too
    try:
        before = _state(run)
        args = [a.format(img=image) for a in COMMANDS[command]]
        r = _invoke([*args, f"hydra.run.dir={run}"], tmp_path, monkeypatch)
        _one_error(r, f"run dir {run} is in use by diffuse train (pid {os.getpid()}")
        assert _state(run) == before
    finally:
        holder.release()
    assert not (run / lock.LOCK_NAME).exists()  # a holder that ends removes its lock


def test_a_stale_lock_is_taken_over_with_one_warning(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    dead = {"pid": 2**22 + 1, "host": "gone", "command": "diffuse sample", "started": "2026-01-01 00:00:00"}
    (run / lock.LOCK_NAME).write_text(json.dumps(dead))  # left by a killed run: nobody holds its flock
    r = _invoke(["sample", *ORACLE, "n=2", f"hydra.run.dir={run}"], tmp_path, monkeypatch)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    warnings = r.stderr.strip().splitlines()
    assert warnings == [
        f"warning: run dir {run} was locked by diffuse sample (pid {2**22 + 1} on gone, since 2026-01-01 00:00:00), "
        "which holds it no more (killed?): taking it over"
    ]
    assert (run / "grid.png").is_file() and not (run / lock.LOCK_NAME).exists()


def test_check_free_sees_a_holder_without_taking_or_writing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock.check_free(run)  # no lock file: free, and none is made
    assert not any(run.iterdir())
    holder = lock.acquire(run, "diffuse eval")
    try:
        with pytest.raises(lock.UserError, match="is in use by diffuse eval"):
            lock.check_free(run)
        with pytest.raises(lock.UserError, match="is in use by diffuse eval"):
            lock.acquire(run, "diffuse eval")
        info = json.loads((run / lock.LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["command"] == "diffuse eval"
    finally:
        holder.release()
    lock.acquire(run, "diffuse eval").release()  # released: free again


def _cli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "diffuse", *map(str, args)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait(cond, what, timeout=120):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_two_processes_one_run_dir_then_a_sigkilled_holder_is_taken_over(tmp_path, monkeypatch):
    """Two `diffuse train` on one run dir: the second gets one line, exit 2, and writes nothing (not .hydra/, not
    config.yaml, no step in metrics.jsonl twice). Killed with SIGKILL, the first leaves its lock file behind:
    resume=true takes it over with one warning and continues the run."""
    run = tmp_path / "run"
    first = _cli(
        "train",
        *TINY,
        "trainer.steps=100000",
        "trainer.ckpt_every=1",
        "trainer.keep=1",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    try:
        _wait(
            lambda: (
                (run / "checkpoints" / "last.safetensors").is_file()
                and (run / "metrics.jsonl").is_file()
                and (run / "metrics.jsonl").read_text().count("\n") >= 1
            ),
            "the first run's checkpoint",
        )
        record = {
            p: (run / p).read_bytes()
            for p in (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "config.yaml")
        }
        second = _cli("train", *TINY, "trainer.steps=3", "model.ch=32", f"hydra.run.dir={run}", cwd=tmp_path)
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2, (out, err)
        assert err.strip().splitlines() == [
            f"error: run dir {run} is in use by diffuse train (pid {first.pid} on {os.uname().nodename}, "
            f"since {json.loads((run / '.lock').read_text())['started']}): wait for it to end, or choose another run dir"
        ]
        assert {p: (run / p).read_bytes() for p in record} == record
        assert first.poll() is None  # the holder runs on, untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    assert (run / lock.LOCK_NAME).is_file()  # SIGKILL runs no cleanup; the kernel dropped the flock
    step = load_checkpoint(run / "checkpoints" / "last.safetensors").step
    r = _invoke(
        [
            "train",
            *TINY,
            f"trainer.steps={step + 1}",
            "trainer.ckpt_every=1",
            "trainer.keep=1",
            "resume=true",
            f"hydra.run.dir={run}",
        ],
        tmp_path,
        monkeypatch,
    )
    assert r.exit_code == 0, (r.stdout, r.stderr)
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert (
        len(warnings) == 1
        and f"locked by diffuse train (pid {first.pid}" in warnings[0]
        and "which holds it no more (killed?): taking it over" in warnings[0]
    )
    assert load_checkpoint(run / "checkpoints" / "last.safetensors").step == step + 1
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 2))  # each step logged once: the refused run wrote none
    assert not (run / lock.LOCK_NAME).exists()


@pytest.mark.slow
@pytest.mark.subprocess
def test_torchrun_ranks_share_the_lock_and_a_refusal_is_one_line_exit_2_from_every_rank(tmp_path):
    """Under torchrun rank 0 locks for the job and the other ranks follow its verdict: on a dir another process
    holds, the job prints one line and every rank exits 2 (torchrun itself then exits 1 with its own report)."""
    run = tmp_path / "run"
    run.mkdir()
    holder = lock.acquire(run, "diffuse sample")
    try:
        before = _state(run)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                "-m",
                "diffuse",
                "sample",
                *ORACLE,
                "n=4",
                f"hydra.run.dir={run}",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        holder.release()
    assert r.returncode != 0
    errors = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("error: ")]
    assert errors == [
        f"error: run dir {run} is in use by diffuse sample (pid {os.getpid()} on {os.uname().nodename}, "
        f"since {json.loads(before['.lock'])['started']}): wait for it to end, or choose another run dir"
    ], r.stderr
    exitcodes = [ln.split(":", 1)[1].split()[0] for ln in r.stderr.splitlines() if ln.strip().startswith("exitcode")]
    assert exitcodes == ["2", "2"], r.stderr  # neither rank was stopped by torchrun (that would be -15)
    assert not (run / ".hydra").exists() and sorted(p.name for p in run.iterdir()) == []


# --------------------------------------------------------------------------------- class 3: unusable paths, one line


def _unwritable(monkeypatch, request, path):
    """A dir nobody may write into: chmod for a user; for root, whom permissions do not stop, an immutable dir
    (chattr +i: EPERM even for root), or where that is not allowed the kernel's answer for one stood in for."""
    path.chmod(0o555)
    if os.geteuid() != 0:
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        request.addfinalizer(lambda: subprocess.run(["chattr", "-i", str(path)], capture_output=True))
        return
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, **k: False if Path(p) == path and mode & os.W_OK else real(p, mode, **k)
    )


@pytest.mark.parametrize(
    "case,needle",
    [
        ("file", "hydra.run.dir={run} is not a directory"),
        ("devnull", "hydra.run.dir=/dev/null is not a directory"),
        ("under_file", "hydra.run.dir={run}/sub cannot be created: {run} is not a directory"),
        ("read_only", "hydra.run.dir={run} is not writable"),
        ("under_read_only", "hydra.run.dir={run}/a/b cannot be created: {run} is not writable"),
        (
            "env",
            "hydra.run.dir=${{oc.env:DIFFUSE_TEST_UNSET}}/x cannot be resolved: Environment variable 'DIFFUSE_TEST_UNSET' not found",
        ),
        (
            "value_env",
            "seed=${{oc.env:DIFFUSE_TEST_UNSET}} cannot be resolved: Environment variable 'DIFFUSE_TEST_UNSET' not found",
        ),
        ("value_key", "seed=${{no.such.key}} cannot be resolved: Interpolation key 'no.such.key' not found"),
        ("subdir", "hydra.output_subdir= cannot be changed"),
        ("sweep_without_m", "steps=2,3 is a sweep: add -m"),
        # access() says yes to root there; the file system takes no new entries (issue 27, part 8)
        ("proc", "hydra.run.dir=/proc/diffuse-test/run cannot be created in /proc ("),
        ("sys", "hydra.run.dir=/sys/diffuse-test cannot be created in /sys ("),
    ],
)
def test_hydra_level_failures_are_one_line_and_leave_nothing(case, needle, tmp_path, monkeypatch, request):
    monkeypatch.delenv("DIFFUSE_TEST_UNSET", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    run = work / "run"
    extra, dir_arg = [], f"hydra.run.dir={run}"
    if case in ("file", "under_file"):
        run.write_text("not a dir")
        dir_arg += "/sub" if case == "under_file" else ""
    elif case == "devnull":
        dir_arg = "hydra.run.dir=/dev/null"
    elif case in ("read_only", "under_read_only"):
        run.mkdir()
        _unwritable(monkeypatch, request, run)
        dir_arg += "/a/b" if case == "under_read_only" else ""
    elif case == "env":
        dir_arg = "hydra.run.dir=${oc.env:DIFFUSE_TEST_UNSET}/x"
    elif case == "value_env":
        extra = ["seed=${oc.env:DIFFUSE_TEST_UNSET}"]
    elif case == "value_key":
        extra = ["seed=${no.such.key}"]
    elif case == "subdir":
        extra = ["hydra.output_subdir=record"]
    elif case == "sweep_without_m":
        extra = ["steps=2,3"]
    elif case in ("proc", "sys"):
        dir_arg = needle.partition(" ")[0]
    before = _state(work)
    r = _invoke(["sample", *ORACLE, "n=2", *extra, dir_arg], work, monkeypatch)
    _one_error(r, needle.format(run=run))
    assert _state(work) == before


@pytest.mark.parametrize(
    "command,entry,kind,needle",
    [
        ("sample", "grid.png", "dir", "grid.png is a directory: diffuse sample writes a file grid.png there"),
        ("sample", "images", "file", "images is not a directory: diffuse sample writes into a directory images/ there"),
        ("sample", "images/000001.png", "dir", "000001.png is a directory"),
        (
            "train",
            "checkpoints/last.safetensors",
            "dir",
            "last.safetensors is a directory: diffuse train writes a file",
        ),
        ("train", "metrics.jsonl", "dir", "metrics.jsonl is a directory"),
        ("eval", "metrics.json", "dir", "metrics.json is a directory: diffuse eval writes a file"),
        ("tune-schedule", "schedule.json", "dir", "schedule.json is a directory"),
        ("inpaint", "img_00.png", "dir", "img_00.png is a directory"),
        ("edit", "grid.png", "dir", "grid.png is a directory: diffuse edit writes a file grid.png there"),
        ("sample", ".hydra", "file", ".hydra is not a directory"),
    ],
)
def test_an_output_path_of_the_wrong_kind_is_one_line_before_any_work(
    command, entry, kind, needle, tmp_path, image, monkeypatch
):
    run = tmp_path / "run"
    (run / entry).parent.mkdir(parents=True, exist_ok=True)
    (run / entry).mkdir() if kind == "dir" else (run / entry).write_text("x")
    before = _state(run)
    args = [a.format(img=image) for a in COMMANDS[command]]
    import importlib

    task = importlib.import_module(
        f"diffuse.tasks.{ {'eval': 'evaluate', 'tune-schedule': 'tune_schedule'}.get(command, command) }"
    )
    called = []
    monkeypatch.setattr(task, "run", lambda cfg, out: called.append(out))
    r = _invoke([*args, f"hydra.run.dir={run}"], tmp_path, monkeypatch)
    _one_error(r, needle)
    assert _state(run) == before and not called  # refused before the job started


def test_save_ref_that_is_a_directory_is_refused_before_the_work(tmp_path, monkeypatch):
    (tmp_path / "stats.safetensors").mkdir()
    r = _invoke(
        [
            "eval",
            "--metric",
            "fid",
            *ORACLE,
            "n=4",
            "--save-ref",
            tmp_path / "stats.safetensors",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
        monkeypatch,
    )
    _one_error(r, f"--save-ref {tmp_path / 'stats.safetensors'} is a directory")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------- class 4: a refused command changes nothing


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of 2 steps through the CLI (so with its .hydra record), a checkpoint at each step."""
    d = tmp_path_factory.mktemp("trained")
    r = CliRunner().invoke(
        app,
        ["train", *TINY, "trainer.steps=2", "trainer.ckpt_every=1", "trainer.keep=2", f"hydra.run.dir={d / 'run'}"],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.stderr
    return d / "run"


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_refused_resume_keeps_the_runs_record_and_config(trained, tmp_path, monkeypatch):
    run = _copy(trained, tmp_path / "run")
    assert (run / ".hydra" / "overrides.yaml").is_file() and (run / "config.yaml").is_file()
    before = _state(run)
    r = _invoke(
        ["train", *TINY, "trainer.steps=3", "model.ch=32", "resume=true", f"hydra.run.dir={run}"], tmp_path, monkeypatch
    )
    _one_error(r, "cannot resume from")
    assert _state(run) == before  # .hydra/{config,hydra,overrides}.yaml as the run left them, and no new file


def test_a_refused_command_in_a_fresh_dir_leaves_no_dir(tmp_path, monkeypatch):
    r = _invoke(["sample", *ORACLE, "n=0", f"hydra.run.dir={tmp_path / 'new' / 'run'}"], tmp_path, monkeypatch)
    _one_error(r, "n=0")
    assert not (tmp_path / "new" / "run").exists()
    r = _invoke(["sample", *ORACLE, "n=0"], tmp_path, monkeypatch)  # the default timestamped dir under outputs/
    _one_error(r, "n=0")
    assert not (tmp_path / "outputs").exists()


def test_a_foreign_last_safetensors_is_never_overwritten(trained, tmp_path, monkeypatch):
    run = _copy(trained, tmp_path / "run")
    foreign = run / "checkpoints" / "last.safetensors"
    save_file({"w": torch.ones(3)}, str(foreign))
    data = foreign.read_bytes()
    for extra in (["resume=true"], []):  # neither resumed over nor trained over
        r = _invoke(["train", *TINY, "trainer.steps=3", *extra, f"hydra.run.dir={run}"], tmp_path, monkeypatch)
        _one_error(r, f"{foreign} is not a diffuse checkpoint: training would overwrite it")
        assert foreign.read_bytes() == data


def test_a_foreign_last_safetensors_is_passed_over_with_a_warning(trained, tmp_path, monkeypatch):
    """resume=RUN reads another run: its foreign last.safetensors is named in one warning line and the newest
    numbered checkpoint is used; the other run is not written to."""
    src = _copy(trained, tmp_path / "src")
    save_file({"w": torch.ones(3)}, str(src / "checkpoints" / "last.safetensors"))
    before = _state(src)
    r = _invoke(
        ["train", *TINY, "trainer.steps=3", f"resume={src}", f"hydra.run.dir={tmp_path / 'new'}"], tmp_path, monkeypatch
    )
    assert r.exit_code == 0, (r.stdout, r.stderr)
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "last.safetensors is a safetensors file but not a diffuse checkpoint" in warnings[0]
    assert "step_0000002.safetensors" in warnings[0]
    assert load_checkpoint(tmp_path / "new" / "checkpoints" / "last.safetensors").step == 3
    assert _state(src) == before


# -------------------------------------------------------------------------------------------- class 6: -m sweeps


@pytest.mark.parametrize(
    "sweep,needle",
    [
        (["steps=2,3,0"], "-m job #2 (steps=0): steps=0 is not allowed"),
        (["steps=2,3", "sampler=ddim,nope"], "-m job #1 (steps=2 sampler=nope)"),
        (["steps=2,3", "batch_size=2,0"], "-m job #1 (steps=2 batch_size=0): batch_size=0 is not allowed"),
        (["steps=2,3", "sampler.eta=0,nan"], "-m job #1 (steps=2 sampler.eta=nan): sampler.eta=nan"),
    ],
)
def test_one_bad_value_refuses_the_whole_sweep_before_its_first_job(sweep, needle, tmp_path, monkeypatch):
    r = _invoke(
        ["sample", "-m", "model=oracle", "dataset=gmm", "n=2", *sweep, f"hydra.sweep.dir={tmp_path / 'sw'}"],
        tmp_path,
        monkeypatch,
    )
    _one_error(r, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_sweep_with_a_job_dir_in_use_is_refused_before_its_first_job(tmp_path, monkeypatch):
    (tmp_path / "sw" / "1").mkdir(parents=True)
    holder = lock.acquire(tmp_path / "sw" / "1", "diffuse sample")
    try:
        r = _invoke(
            ["sample", "-m", *ORACLE, "n=2", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sw'}"], tmp_path, monkeypatch
        )
        _one_error(r, f"-m job #1 (seed=1): run dir {tmp_path / 'sw' / '1'} is in use by diffuse sample")
        holder2 = lock.acquire(tmp_path / "sw", "diffuse sample -m")  # the whole sweep dir held: refused likewise
        try:
            r = _invoke(
                ["sample", "-m", *ORACLE, "n=2", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sw'}"],
                tmp_path,
                monkeypatch,
            )
            _one_error(r, f"-m job #0 (seed=0): run dir {tmp_path / 'sw'} is in use by diffuse sample -m")
        finally:
            holder2.release()
    finally:
        holder.release()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["sw", "sw/1"]


def test_a_good_sweep_runs_every_job_each_in_its_own_locked_dir(tmp_path, monkeypatch):
    held = []
    real = lock.acquire
    monkeypatch.setattr(lock, "acquire", lambda d, c: held.append(Path(d)) or real(d, c))
    r = _invoke(
        ["sample", "-m", *ORACLE, "n=2", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sw'}"], tmp_path, monkeypatch
    )
    assert r.exit_code == 0, (r.stdout, r.stderr)
    sw = tmp_path / "sw"
    assert held == [sw, sw / "0", sw / "1"]  # the sweep dir, then each job's
    for job in ("0", "1"):
        assert (sw / job / "grid.png").is_file() and (sw / job / ".hydra" / "overrides.yaml").read_text().count(
            "seed="
        ) == 1
    assert (sw / "multirun.yaml").is_file() and not list(sw.rglob(lock.LOCK_NAME))


def test_tune_schedule_does_not_write_into_a_checkpoint_whose_run_is_live(trained, tmp_path, monkeypatch):
    """write_ckpt=true writes the tuned levels into the checkpoint at the end: refused before the work while the
    run that owns the checkpoint holds its dir."""
    run = _copy(trained, tmp_path / "train")
    holder = lock.acquire(run, "diffuse train")
    try:
        before = _state(run)
        r = _invoke(
            [
                "tune-schedule",
                f"ckpt={run}",
                "steps=2",
                "n=2",
                "n_eval=2",
                "tune.iterations=0",
                "tune.reference_steps=4",
                f"hydra.run.dir={tmp_path / 'tune'}",
            ],
            tmp_path,
            monkeypatch,
        )
        _one_error(r, f"ckpt={run}: run dir {run} is in use by diffuse train")
        assert _state(run) == before and not (tmp_path / "tune").exists()
    finally:
        holder.release()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["sample", "ckpt={run}", "n=2", "steps=2"], "{run} is the run dir of diffuse train: diffuse sample writes"),
        (["eval", "ckpt={run}", "n=2", "steps=2"], "{run} is the run dir of diffuse train: diffuse eval writes"),
        (
            ["train-ae", "dataset=shapes", "dataset.resolution=8", "autoencoder.ch=8", "trainer.steps=1"],
            "{run} is the run dir of diffuse train: diffuse train-ae writes",
        ),
        (["distill", "teacher={run}", "trainer.steps=1"], "{run} is the run dir of diffuse train: diffuse distill"),
        (
            ["train", *TINY, "trainer.steps=2"],
            "{run} already holds the outputs of an earlier diffuse train (checkpoints): resume=true continues it",
        ),
    ],
)
def test_a_run_dir_belongs_to_one_run(args, needle, trained, tmp_path, monkeypatch):
    """Another command's run dir, or a fresh run into a dir holding this command's outputs, is refused before
    anything is written (issue 27, part 1): a training run's checkpoints, config and record stay as they were."""
    run = _copy(trained, tmp_path / "run")
    before = _state(run)
    r = _invoke([*(a.format(run=run) for a in args), f"hydra.run.dir={run}"], tmp_path, monkeypatch)
    _one_error(r, needle.format(run=run))
    assert _state(run) == before


def test_a_fresh_sample_into_an_earlier_sample_is_refused_and_resume_continues_it(tmp_path, monkeypatch):
    run = tmp_path / "s"
    args = ["sample", *ORACLE, "n=2", f"hydra.run.dir={run}"]
    assert _invoke(args, tmp_path, monkeypatch).exit_code == 0
    before = _state(run)
    _one_error(_invoke(args, tmp_path, monkeypatch), f"{run} already holds the outputs of an earlier diffuse sample")
    assert _state(run) == before
    r = _invoke([*args, "n=3", "resume=true"], tmp_path, monkeypatch)
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in (run / "images").iterdir()) == ["000000.png", "000001.png", "000002.png"]
