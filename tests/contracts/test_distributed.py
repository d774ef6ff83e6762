"""torchrun on the CPU (gloo, two processes): the same training and the same images as one process."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffuse.checkpoint import load_checkpoint

TINY = [
    "dataset.size=64",
    "dataset.resolution=8",
    "model.ch=16",
    "model.ch_mult=[1,2]",
    "model.attn_resolutions=[4]",
    "trainer.batch_size=8",
    "trainer.log_every=2",
    "trainer.sample_n=0",
    "trainer.lr=2e-3",
    "trainer.warmup=1",
    "dataset.flip=true",
]


def _run(args, cwd, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    r = subprocess.run(
        [*launcher, "-m", "diffuse", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def _state(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "last.safetensors")


@pytest.mark.slow
def test_ddp_training_and_world_size_change_match_one_process(tmp_path):
    """DDP's job is the gradient: Adam's first moment (a running mean of gradients) must agree to float
    tolerance. Weights agree to within Adam's first-step sign amplification of float noise (lr per step on
    parameters whose gradient is ~0), so they are checked against 2 lr."""
    _run(["train", *TINY, "trainer.steps=2", f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    _run(["train", *TINY, "trainer.steps=2", f"hydra.run.dir={tmp_path / 'two'}"], tmp_path, nproc=2)
    # two processes for 1 step, then resumed by one process: the data order continues across world sizes
    _run(["train", *TINY, "trainer.steps=1", f"hydra.run.dir={tmp_path / 'mixed'}"], tmp_path, nproc=2)
    _run(["train", *TINY, "trainer.steps=2", "resume=true", f"hydra.run.dir={tmp_path / 'mixed'}"], tmp_path)
    ref = _state(tmp_path / "one")
    for other in ("two", "mixed"):
        ck = _state(tmp_path / other)
        assert ck.step == ref.step == 2
        for idx, st in ref.optim["state"].items():
            torch.testing.assert_close(ck.optim["state"][idx]["exp_avg"], st["exp_avg"], rtol=1e-3, atol=1e-6)
        for k in ref.model:
            torch.testing.assert_close(ck.model[k], ref.model[k], rtol=0, atol=2 * 2e-3)
    grads = torch.cat([st["exp_avg"].flatten() for st in ref.optim["state"].values()])
    assert grads.abs().max() > 1e-3  # there were gradients to agree on
    assert (tmp_path / "two" / "metrics.jsonl").read_text().count("\n") == 1  # rank 0 alone logs


@pytest.mark.slow
def test_distributed_sampling_is_byte_identical(tmp_path):
    _run(["train", *TINY, "trainer.steps=2", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    common = [f"ckpt={tmp_path / 'run'}", "n=7", "steps=3", "save_npz=true"]
    _run(["sample", *common, "batch_size=3", f"hydra.run.dir={tmp_path / 'dist'}"], tmp_path, nproc=2)
    _run(["sample", *common, "batch_size=7", f"hydra.run.dir={tmp_path / 'single'}"], tmp_path)
    a = np.load(tmp_path / "dist" / "samples.npz")["arr_0"]
    b = np.load(tmp_path / "single" / "samples.npz")["arr_0"]
    assert a.shape == (7, 8, 8, 3) and np.array_equal(a, b)
    for i in range(7):
        assert (tmp_path / "dist" / "images" / f"{i:06d}.png").read_bytes() == (
            tmp_path / "single" / "images" / f"{i:06d}.png"
        ).read_bytes()


def test_pick_device_gives_each_torchrun_rank_its_own_gpu(monkeypatch):
    """Under torchrun, device=auto|cuda means GPU LOCAL_RANK, chosen before anything is placed (a network loaded
    onto GPU 0 by every rank met its noise on GPU LOCAL_RANK); an explicit cuda:N is kept."""
    import torch

    from diffuse.pipeline.runtime import pick_device

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: chosen.append(dev))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert pick_device("auto") == torch.device("cuda", 3) and chosen == [torch.device("cuda", 3)]
    assert pick_device("cuda") == torch.device("cuda", 3)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert pick_device("cuda") == torch.device("cuda")


@pytest.mark.slow
@pytest.mark.subprocess
def test_distillation_under_torchrun_matches_one_process(tmp_path):
    """diffuse distill shards the batch like training: each rank draws the whole batch's levels and noise and keeps
    its slice, so two processes take the gradient one process takes (Adam's first moment to float tolerance)."""
    common = [
        "distill",
        "teacher=oracle",
        "model=tiny",
        "model.ch=16",
        "model.ch_mult=[1,2]",
        "model.attn_resolutions=[]",
        "dataset=gmm",
        "dataset.size=64",
        "dataset.resolution=4",
        "dataset.channels=1",
        "trainer.batch_size=8",
        "trainer.log_every=1",
        "trainer.sample_n=0",
        "trainer.warmup=0",
        "trainer.steps=2",
    ]
    for method in ("progressive", "consistency"):
        extra = ["distill.start_steps=4", "distill.target_steps=2"] if method == "progressive" else []
        for name, nproc in (("one", 1), ("two", 2)):
            _run(
                [*common, f"method={method}", *extra, f"hydra.run.dir={tmp_path / method / name}"],
                tmp_path,
                nproc=nproc,
            )
        ref, ck = _state(tmp_path / method / "one"), _state(tmp_path / method / "two")
        assert ck.step == ref.step == 2 and set(ck.aux) == set(ref.aux)
        for idx, st in ref.optim["state"].items():
            torch.testing.assert_close(ck.optim["state"][idx]["exp_avg"], st["exp_avg"], rtol=1e-3, atol=1e-6)
        assert (tmp_path / method / "two" / "metrics.jsonl").read_text().count("\n") == 2  # rank 0 alone logs
