"""Training survives SIGKILL at any moment: killed several times (once in the middle of a checkpoint write),
resumed each time, it ends bit-identical to a run that was never interrupted (CPU)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from diffuse.checkpoint import load_checkpoint
from diffuse.tasks import train as train_task

ARGS = [
    "dataset.size=64",
    "dataset.resolution=8",
    "model.ch=16",
    "model.ch_mult=[1,2]",
    "model.attn_resolutions=[4]",
    "trainer.batch_size=8",
    "trainer.log_every=1",
    "trainer.sample_n=0",
    "trainer.warmup=2",
    "trainer.lr=2e-3",
    "trainer.steps=30",
    "trainer.ckpt_every=2",
    "trainer.keep=2",
    "dataset.flip=true",
]

# The CLI with the test's thread count (float sums must match the in-process reference) and, when asked, a
# checkpoint writer that stalls after writing its temp file and before the rename, touching a marker first:
# a kill then lands in the middle of a checkpoint write for certain.
WRAPPER = """
import os, sys, time, torch
torch.set_num_threads(int(os.environ["KILL_THREADS"]))
marker = os.environ.get("KILL_MARKER")
if marker:
    import diffuse.checkpoint as C
    real = C.atomic_write
    def stalling(path, write):
        def w(tmp):
            write(tmp)
            if str(path).endswith(".safetensors"):
                open(marker, "w").close()
                time.sleep(60)
        real(path, w)
    C.atomic_write = stalling
from diffuse.cli import main
sys.argv = ["diffuse", *sys.argv[1:]]
main()
"""


def _wait(cond, what, timeout=120):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, compose_cfg):
    rng = random.Random(20261123)
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.safetensors"
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    # One thread here and there: float sums then match, and a shared machine's cores are not oversubscribed.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_THREADS": "1"}

    def start(resume: bool, marker=None):
        e = {**env, **({"KILL_MARKER": str(marker)} if marker else {})}
        cmd = [
            sys.executable,
            str(wrapper),
            "train",
            *ARGS,
            f"hydra.run.dir={out}",
            *(["resume=true"] if resume else []),
        ]
        return subprocess.Popen(cmd, cwd=tmp_path, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def kill(proc):
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill: {proc.returncode} {err}"

    def after_next_checkpoint(proc):
        """Once a checkpoint newer than the one on disk is written: a random moment, then SIGKILL."""
        before = last.stat().st_mtime_ns if last.exists() else None
        _wait(lambda: last.exists() and last.stat().st_mtime_ns != before, "a checkpoint")
        time.sleep(rng.uniform(0.0, 0.5))
        kill(proc)

    after_next_checkpoint(start(resume=False))
    marker = tmp_path / "in_write"
    proc = start(resume=True, marker=marker)
    _wait(marker.exists, "a checkpoint write")
    time.sleep(rng.uniform(0.0, 0.2))
    kill(proc)
    assert list((out / "checkpoints").glob(".*.tmp")), "the kill was to leave a half-done write's temp file"

    after_next_checkpoint(start(resume=True))
    proc = start(resume=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert not list((out / "checkpoints").glob(".*.tmp"))  # killed writes' temp files were cleaned
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))  # each step logged once, no half line

    ref = tmp_path / "straight"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_task.run(compose_cfg("train", ARGS), ref)
    finally:
        torch.set_num_threads(threads)
    a, b = load_checkpoint(ref / "checkpoints" / "last.safetensors"), load_checkpoint(last)
    assert a.step == b.step == 30
    for part in ("model", "ema", "rng"):
        for k, v in getattr(a, part).items():
            assert torch.equal(v, getattr(b, part)[k]), (part, k)
    for i, st in a.optim["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b.optim["state"][i][k]), ("optim", i, k)
