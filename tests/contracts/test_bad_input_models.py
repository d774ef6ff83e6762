"""Misuses of the newer commands and options (latent diffusion, cascades, upsample, export, convert --from
improved-diffusion, DINOv2 features, pr/dc, in-training evaluation, resume=auto), each found refused badly once: in
process through the real CLI, exit code 2, exactly one `error:` line naming the value, no traceback, nothing left in
the run dir or beside the output. Also: every new command's --help lists its keys, and export, convert and upsample
stopped by a signal leave nothing half-written."""

import os
import shutil
import signal
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from diffuse.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = [
    "dataset.size=32",
    "model.ch=16",
    "model.ch_mult=[1]",
    "model.attn_resolutions=[]",
    "trainer.batch_size=4",
    "trainer.sample_n=0",
    "trainer.steps=1",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 4x4 base, a 4 -> 8 super-resolution model, a width-32 base that diffusers can express, a tiny
    autoencoder, a truncated safetensors file and low-resolution images."""
    from diffuse.tasks import train as train_task
    from diffuse.tasks import train_ae as train_ae_task
    from tests.conftest import compose

    d = tmp_path_factory.mktemp("new")
    train_task.run(compose("train", SMALL + ["dataset.resolution=4"]), d / "base")
    train_task.run(
        compose("train", SMALL + ["condition=lowres", "condition.from_resolution=4", "dataset.resolution=8"]), d / "sr"
    )
    train_task.run(compose("train", SMALL + ["dataset.resolution=4", "model.ch=32"]), d / "base32")
    train_ae_task.run(
        compose(
            "train_ae",
            ["autoencoder.ch=8", "dataset.resolution=8", "dataset.size=32", "trainer.batch_size=4", "trainer.steps=1"],
        ),
        d / "ae",
    )
    whole = (d / "base" / "checkpoints" / "last.safetensors").read_bytes()
    (d / "trunc.safetensors").write_bytes(whole[: len(whole) // 2])
    rng = np.random.RandomState(0)
    (d / "imgs").mkdir()
    for name, size in (("low.png", 4), ("high.png", 8)):
        Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8")).save(d / "imgs" / name)
    (d / "twins").mkdir()
    Image.open(d / "imgs" / "low.png").save(d / "twins" / "a.png")
    Image.open(d / "imgs" / "low.png").save(d / "twins" / "a.jpg")
    return d


def _invoke(args, cwd, monkeypatch):
    monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, args, catch_exceptions=False)


B, S, A, T, IMGS = "{d}/base", "{d}/sr", "{d}/ae", "{d}/trunc.safetensors", "{d}/imgs"
TRAIN = ["train", *SMALL, "dataset.resolution=8"]
EVAL = ["eval", f"ckpt={B}", "n=8", "steps=2", "ref=shapes"]
CASES = [
    # with an autoencoder the condition's keys were checked against the latent side: "below dataset.resolution=2"
    (
        [*TRAIN, f"autoencoder={A}", "condition=lowres", "condition.from_resolution=4"],
        "condition=lowres with autoencoder= is not supported",
    ),
    # the latents' side was named as the dataset.resolution the user typed: "dataset.resolution=2 is not allowed"
    (
        [*TRAIN, f"autoencoder={A}", "model.ch_mult=[1,2,2]"],
        "with autoencoder= the network sees 2x2 latents of dataset.resolution=8: the latent side 2 is not allowed",
    ),
    # a FileExistsError traceback from the encoding, after .hydra/ was written
    (
        [*TRAIN, f"autoencoder={A}", f"latent_cache={T}"],
        "latent_cache='{d}/trunc.safetensors' is not allowed: it is a file",
    ),
    # metrics.seeds means nothing to training: it was silently ignored
    ([*TRAIN, "metrics.seeds=3"], "metrics.seeds=3 is diffuse eval's protocol"),
    # a place even root cannot make a folder in: an OSError traceback from the cache's mkdir
    (
        [*TRAIN, f"autoencoder={A}", "latent_cache=/proc/diffuse-cache"],
        "/proc/diffuse-cache",
    ),  # as root: from the mkdir; else the up-front check
    # the wrong order was named as a misuse of sample ckpt=, and a missing stage as ckpt='nosuch'
    (["sample", f"cascade=[{S},{B}]", "n=2", "steps=2"], "its first checkpoint '{d}/sr' is a super-resolution model"),
    (["sample", f"cascade=[{B},{{d}}/nosuch]", "n=2", "steps=2"], "cascade[1]='{d}/nosuch' does not exist"),
    # the model's output size was given as what the input must be
    (["upsample", "--image", f"{IMGS}/high.png", f"ckpt={S}", "steps=2"], "is 8x8 but the model takes 4x4"),
    # a.png and a.jpg both wrote a_00.png
    (["upsample", "--image", "{d}/twins", f"ckpt={S}", "steps=2"], "a.jpg and a.png would both write a_00.png"),
    # exported, then diffusers could not build it (GroupNorm(32, 16))
    (
        ["export", "--to", "diffusers", "--ckpt", B, "--out", "{tmp}/pipe"],
        "a 16-channel layer (model.ch=16) that 32 norm groups",
    ),
    # "does not exist (or is not a file)" for a folder that exists
    (
        [
            "convert",
            "--from",
            "improved-diffusion",
            "{d}/base",
            "--out",
            "{tmp}/x.safetensors",
            "--resolution",
            "4",
            "--schedule",
            "cosine",
        ],
        "{d}/base is a folder: --from improved-diffusion takes the network's .safetensors file",
    ),
    # a traceback (SafetensorError), with .hydra/ left in the run dir
    ([*EVAL, "--metric", "fd", "metrics.features=dinov2", f"metrics.dinov2_weights={T}"], "not DINOv2 vitb14 weights"),
    (
        [*EVAL, "--metric", "fd", "metrics.features=dinov2", "metrics.dinov2_weights={d}"],
        "is a folder: give the .safetensors file",
    ),
    # refused only after every sample was drawn, without naming the key
    ([*EVAL, "--metric", "pr", "metrics.pr_k=50"], "metrics.pr_k=50 is not allowed with n=8"),
    ([*EVAL, "--metric", "dc", "metrics.dc_k=8"], "metrics.dc_k=8 is not allowed with n=8"),
    # a weights file the user named was skipped with a warning, the run training on without its evaluations
    (
        [*TRAIN, "trainer.eval_every=1", "trainer.eval_n=4", "metrics.features=dinov2", f"metrics.dinov2_weights={T}"],
        "not DINOv2 vitb14 weights",
    ),
    # Hydra's ValueError traceback ("Only one of --run, --multirun, --cfg ...")
    (["train", "-m", "--cfg", "job"], "-m cannot be combined with --cfg or --info"),
    # resume=maybe read as a path, with no word of the modes
    ([*TRAIN, "resume=maybe"], "resume='maybe' does not exist: give true, false, auto"),
]


@pytest.mark.parametrize("args,needle", CASES, ids=[" ".join(c[0][:2]) + f" [{i}]" for i, c in enumerate(CASES)])
def test_misuse_is_one_line_exit_2_and_nothing_written(args, needle, runs, tmp_path, monkeypatch):
    fill = {"d": runs, "tmp": tmp_path}
    args = [a.format(**fill) for a in args]
    run = tmp_path / "run"
    hydra = [] if args[0] in ("export", "convert") else [f"hydra.run.dir={run}"]
    r = _invoke([*args, *hydra], tmp_path, monkeypatch)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle.format(**fill) in lines[0], r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert not run.exists() or not any(run.rglob("*")), sorted(run.rglob("*"))
    assert [p.name for p in tmp_path.iterdir()] in ([], ["run"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_export_to_an_unwritable_place_is_one_line(runs, tmp_path, monkeypatch):
    """/proc refuses a new folder even to root (a chmod 555 folder would not): this was a FileNotFoundError
    traceback from mkdtemp, and a parent made by the export stayed behind."""
    for out in ("/proc/pipe", "/proc/a/b/pipe"):
        r = _invoke(
            ["export", "--to", "diffusers", "--ckpt", str(runs / "base32"), "--out", out], tmp_path, monkeypatch
        )
        assert (
            r.exit_code == 2
            and r.stderr.strip() == f"error: --out={out!r} cannot be written: No such file or directory"
        ), r.stderr


@pytest.mark.skipif(shutil.which("srun") is not None, reason="a SLURM cluster: the launcher can run here")
def test_slurm_launcher_without_slurm_is_one_line(tmp_path, monkeypatch):
    """Was submitit's RuntimeError traceback, with the sweep dir and its multirun.yaml left behind."""
    r = _invoke(
        [
            "train",
            *SMALL,
            "dataset.resolution=4",
            "hydra/launcher=submitit_slurm",
            "-m",
            f"hydra.sweep.dir={tmp_path / 'sw'}",
        ],
        tmp_path,
        monkeypatch,
    )
    assert r.exit_code == 2 and r.stderr.strip().startswith("error: hydra/launcher=submitit_slurm needs SLURM"), (
        r.stderr
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "command,keys",
    [
        (
            "convert",
            ["--resolution", "--schedule", "--head-channels", "--out FILE.safetensors"],
        ),  # was a FileNotFoundError traceback
        ("export", ["--ckpt", "--out DIR", "--no-ema"]),
        ("train-ae", ["loss.kl_weight=", "loss.disc_weight=", "autoencoder.* with autoencoder=kl_f4", "resume="]),
        ("upsample", ["ckpt=", "n=", "resize=", "condition.aug_level="]),
        ("train", ["trainer.eval_every=", "logger.mode=", "condition.aug_max=", "autoencoder=", "resume="]),
        ("sample", ["cascade=", "condition.truncated="]),
        ("eval", ["metrics.seeds=", "metrics.pr_k=", "metrics.dinov2_arch=", "fd, pr, dc"]),
    ],
)
def test_help_of_every_new_command_lists_its_keys(command, keys):
    r = CliRunner().invoke(app, [command, "--help"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # click rewraps docstrings
    missing = [k for k in keys if k not in text]
    assert not missing, (missing, r.output)


def _signal_during(monkeypatch, module, name):
    """Make `module.name` (a writer) send this process SIGTERM once it has written, as a kill mid-export would."""
    real = getattr(module, name)

    def write(*a, **k):
        out = real(*a, **k)
        os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(module, name, write)


def test_export_and_convert_stopped_by_sigterm_leave_nothing(runs, tmp_path, monkeypatch):
    """The default SIGTERM killed them mid-write, leaving .NAME.XXXX.tmp beside out= (and the parents export made)."""
    import safetensors.torch

    pipe = tmp_path.parent / f"{tmp_path.name}_pipe"  # a whole export, to convert back
    assert (
        _invoke(
            ["export", "--to", "diffusers", "--ckpt", str(runs / "base32"), "--out", str(pipe)], tmp_path, monkeypatch
        ).exit_code
        == 0
    )
    _signal_during(monkeypatch, safetensors.torch, "save_file")
    r = _invoke(
        ["export", "--to", "diffusers", "--ckpt", str(runs / "base32"), "--out", str(tmp_path / "a" / "pipe")],
        tmp_path,
        monkeypatch,
    )
    assert r.exit_code == 0 and "stopped by signal (SIGTERM): nothing written" in r.stdout, (r.stdout, r.stderr)
    assert list(tmp_path.iterdir()) == []
    r = _invoke(
        ["convert", "--from", "diffusers", str(pipe), "--out", str(tmp_path / "x.safetensors")], tmp_path, monkeypatch
    )
    assert r.exit_code == 0 and "stopped by signal (SIGTERM): nothing written" in r.stdout, (r.stdout, r.stderr)
    assert list(tmp_path.iterdir()) == []


def test_upsample_stopped_lists_what_is_not_done(runs, tmp_path, monkeypatch):
    """A stopped upsample said '1 of 2 images upsampled' and its upsample.json did not say which were left."""
    import json

    from diffuse.rundir import per_image

    real = per_image.save_png

    def save(img, path, **k):
        real(img, path, **k)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(per_image, "save_png", save)
    (tmp_path / "in").mkdir()
    for name in ("p.png", "q.png"):
        Image.open(runs / "imgs" / "low.png").save(tmp_path / "in" / name)
    run = tmp_path / "run"
    r = _invoke(
        ["upsample", "--image", str(tmp_path / "in"), f"ckpt={runs / 'sr'}", "steps=2", f"hydra.run.dir={run}"],
        tmp_path,
        monkeypatch,
    )
    assert r.exit_code == 0 and "1 of 2 images upsampled" in r.stdout and "not_done" in r.stdout, (r.stdout, r.stderr)
    info = json.loads((run / "upsample.json").read_text())
    assert info["images"] == 1 and info["not_done"] == [str(tmp_path / "in" / "q.png")]
    assert (run / "p_00.png").is_file() and not (run / "q_00.png").exists()
