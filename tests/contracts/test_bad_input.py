"""The bad-input matrix, in process through the real CLI (typer's CliRunner -> Hydra -> the task): for every
command and every kind of bad value, exit code 2, exactly one line on stderr naming the value, and no new file
in the run dir. test_cli.py keeps a few of these as real subprocesses."""

import errno
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from diffuse.checkpoint import load_checkpoint, save_checkpoint
from diffuse.cli import app
from tests.conftest import TINY_TRAIN

TINY = TINY_TRAIN
ORACLE = ["model=oracle", "dataset=gmm", "steps=3"]
INPAINT = ["--image", "img.png", "--mask", "mask.png", *ORACLE, "inpaint.method=replace"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_run):
    """A tiny checkpoint, files that only look like one, and images and masks in odd modes."""

    d = tmp_path_factory.mktemp("bad")
    shutil.copytree(tiny_run, d / "trained")
    ckpt = d / "trained" / "checkpoints" / "last.safetensors"
    (d / "junk.safetensors").write_bytes(np.random.RandomState(0).bytes(4096))
    save_file({"w": torch.zeros(2)}, str(d / "foreign.safetensors"))
    ck = load_checkpoint(ckpt)
    ck.ema = {("renamed." + k if i == 0 else k): v for i, (k, v) in enumerate(ck.ema.items())}
    save_checkpoint(d / "renamed.safetensors", ck)  # verifies, but its weights do not fit its architecture
    rgb = (np.random.RandomState(1).rand(8, 8, 3) * 255).astype("uint8")
    Image.fromarray(rgb).save(d / "img.png")
    half = np.zeros((8, 8), "uint8")
    half[:, 4:] = 255
    Image.fromarray(half).save(d / "mask.png")
    Image.fromarray(np.zeros((6, 6), "uint8")).save(d / "small.png")
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(d / "palette.png")
    Image.fromarray(rgb[..., 0].astype("uint16") * 257).save(d / "sixteen.png")
    Image.fromarray(np.dstack([rgb, np.full((8, 8), 255, "uint8")])).save(d / "rgba.png")
    Image.fromarray(rgb[..., 0]).save(d / "grey.png")
    Image.fromarray(np.dstack([half] * 3)).save(d / "mask_rgb.png")
    Image.fromarray(half.astype("uint16") * 257).save(d / "mask16.png")
    Image.fromarray(rgb[..., 0].astype("float32") / 255).save(d / "float.tiff")
    alpha = np.full((8, 8), 255, "uint8")
    alpha[0, 0] = 0
    Image.fromarray(np.dstack([half] * 3 + [alpha])).save(d / "mask_alpha.png")
    red = np.dstack([half] * 3)
    red[0, 0] = (255, 0, 0)
    Image.fromarray(red).save(d / "mask_red.png")
    return d, ckpt


pytestmark = pytest.mark.usefixtures("one_thread")


def _invoke(args, cwd, monkeypatch):
    monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, args, catch_exceptions=False)


def _disk_full_safetensors(monkeypatch):
    import safetensors.torch

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)


def _disk_full_png(monkeypatch):
    def full(self, fp, format=None, **params):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)


J, F, R, C = "{junk}", "{foreign}", "{renamed}", "{ckpt}"
CASES = [
    # train
    (["train", "trainer.stepz=5"], "trainer.stepz", None),
    (["train", "model=huge"], "model/huge", None),
    (["train", "trainer.lr=abc"], "trainer.lr='abc'", None),
    (["train", "trainer.lr=-1"], "trainer.lr=-1", None),
    (["train", "trainer.steps=0"], "trainer.steps=0", None),
    (["train", "trainer.max_nonfinite=0"], "trainer.max_nonfinite=0", None),
    (["train", f"resume={J}"], "junk.safetensors: not a readable safetensors file", None),
    (["train", f"resume={F}"], "not a diffuse checkpoint", None),
    (["train", f"resume={C}", "model.ch=32"], "cannot resume from", None),
    (["train", "resume=nosuch.safetensors"], "'nosuch.safetensors' does not exist", None),
    (["train"], "No space left on device", _disk_full_safetensors),
    # sample
    (["sample", f"ckpt={C}", "foo=1"], "foo", None),
    (["sample", f"ckpt={C}", "sampler=nope"], "sampler/nope", None),
    (["sample", f"ckpt={C}", "n=abc"], "n='abc'", None),
    (["sample", f"ckpt={C}", "n=0"], "n=0", None),
    (["sample", f"ckpt={C}", "steps=0"], "steps=0", None),
    (["sample", f"ckpt={C}", "steps=1001"], "steps=1001", None),
    (["sample", f"ckpt={C}", "guidance.scale=nan"], "guidance.scale=nan", None),
    (["sample", *ORACLE, "sampler.eta=nan"], "sampler.eta=nan", None),
    (["sample", *ORACLE, "sampler.eta=5"], "sampler.eta=5 is not allowed: it must be in [0, 1]", None),
    (["sample", "ckpt=nosuch.safetensors"], "'nosuch.safetensors' does not exist", None),
    (["sample", f"ckpt={C}", "model=oracle"], "ckpt= and model='oracle' cannot both be given", None),
    (["sample", f"ckpt={C}", "schedule=cosine"], "schedule= cannot be changed when sampling a checkpoint", None),
    (["sample", f"ckpt={C}", "runtime.precision=fp16"], "runtime.precision='fp16' is not allowed", None),
    (["sample", "model=tiny"], "only model=oracle samples without a checkpoint", None),
    (["sample", "model=oracle", "dataset=shapes"], "model=oracle needs dataset=gmm", None),
    (["sample", f"ckpt={J}"], "not a readable safetensors file", None),
    (["sample", f"ckpt={F}"], "not a diffuse checkpoint", None),
    (["sample", f"ckpt={R}"], "weights do not fit", None),
    (["sample", f"ckpt={C}", "n=2", "steps=2"], "No space left on device", _disk_full_png),
    # inpaint
    ([*INPAINT[:4], "model=oracle", "dataset=gmm", "foo=1"], "foo", None),
    ([*INPAINT, "sampler=nope"], "sampler/nope", None),
    ([*INPAINT, "steps=0"], "steps=0", None),
    ([*INPAINT, "steps=1001"], "steps=1001", None),
    ([*INPAINT, "n=0"], "n=0", None),
    ([*INPAINT[:4], f"ckpt={J}"], "not a readable safetensors file", None),
    ([*INPAINT[:4], f"ckpt={F}"], "not a diffuse checkpoint", None),
    ([*INPAINT[:4], f"ckpt={R}"], "weights do not fit", None),
    ([*INPAINT[:4], "ckpt=nosuch.safetensors"], "'nosuch.safetensors' does not exist", None),
    (["--image", "float.tiff", "--mask", "mask.png", *ORACLE], "float.tiff is a floating-point image", None),
    (["--image", "img.png", "--mask", "mask_alpha.png", *ORACLE], "mask_alpha.png has transparent pixels", None),
    (["--image", "img.png", "--mask", "mask_red.png", *ORACLE], "mask_red.png has coloured pixels", None),
    (["--image", J, "--mask", "mask.png", *ORACLE], "junk.safetensors is not a readable image", None),
    (["--image", "img.png", "--mask", "small.png", *ORACLE], "small.png is 6x6 but image", None),
    (["--image", "nosuch.png", "--mask", "mask.png", *ORACLE], "nosuch.png: no such file", None),
    ([*INPAINT, "inpaint.method=magic"], "inpaint.method='magic'", None),
    (INPAINT, "No space left on device", _disk_full_png),
    # a key spelled as an option (issue 27, part 9): the override to give instead, not Hydra's lexer error
    (["sample", *ORACLE, "--n", "4"], "--n 4 is not an option of this command: its keys are overrides, n=4", None),
    (
        ["sample", *ORACLE, "--steps=20"],
        "--steps=20 is not an option of this command: its keys are overrides, steps=20",
        None,
    ),
    (["train", "--batch-size", "8"], "its keys are overrides, batch_size=8", None),
]


@pytest.mark.parametrize("args,needle,patch", CASES, ids=[" ".join(c[0][:3]) + f" [{i}]" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_exit_2_and_nothing_written(args, needle, patch, files, tmp_path, monkeypatch):
    d, ckpt = files
    args = [
        a.format(
            junk=d / "junk.safetensors", foreign=d / "foreign.safetensors", renamed=d / "renamed.safetensors", ckpt=ckpt
        )
        for a in args
    ]
    if args[0] == "--image":
        args = ["inpaint", *args]
    if args[0] == "train":
        args = ["train", *TINY, *args[1:]]
    args = [a if not a.endswith((".png", ".tiff")) or "=" in a else str(d / a) for a in args]
    run = tmp_path / "run"
    if patch:
        patch(monkeypatch)
    r = _invoke([*args, f"hydra.run.dir={run}"], tmp_path, monkeypatch)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert not run.exists() or not any(run.rglob("*")), sorted(run.rglob("*"))
    assert [p.name for p in tmp_path.iterdir()] in ([], ["run"])


@pytest.mark.parametrize(
    "image,mask",
    [
        ("palette.png", "mask.png"),
        ("sixteen.png", "mask.png"),
        ("rgba.png", "mask.png"),
        ("grey.png", "mask.png"),
        ("img.png", "mask_rgb.png"),
        ("img.png", "mask16.png"),
    ],
)
def test_odd_modes_that_convert_plainly_are_accepted(image, mask, files, tmp_path, monkeypatch):
    """Palette, 16-bit (scaled, not clipped), alpha (dropped), grey for an RGB model; RGB or 16-bit masks in
    black and white. The kept half of every result is the converted input, exactly."""
    d, _ = files
    r = _invoke(
        [
            "inpaint",
            "--image",
            str(d / image),
            "--mask",
            str(d / mask),
            *ORACLE,
            "inpaint.method=replace",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
        monkeypatch,
    )
    assert r.exit_code == 0, (r.stdout, r.stderr)
    res = np.asarray(Image.open(tmp_path / "run" / f"{image.split('.')[0]}_00.png"))
    src = np.asarray(Image.open(d / "img.png"))
    expect = {
        "palette.png": np.asarray(Image.open(d / "palette.png").convert("RGB")),
        "sixteen.png": np.dstack([src[..., 0]] * 3),
        "grey.png": np.dstack([src[..., 0]] * 3),
    }.get(image, src)
    assert np.array_equal(res[:, :4], expect[:, :4])


def test_nonfinite_stop_exits_3_and_keeps_the_checkpoints(files, tmp_path, monkeypatch):
    from diffuse.training import objectives as objectives_module

    real = objectives_module.diffusion_loss
    calls = []

    def loss(*a, **k):
        calls.append(1)
        return real(*a, **k) * (float("nan") if len(calls) > 2 else 1.0)

    monkeypatch.setattr(objectives_module, "diffusion_loss", loss)
    run = tmp_path / "run"
    r = _invoke(
        [
            "train",
            *TINY,
            "trainer.steps=50",
            "trainer.ckpt_every=2",
            "trainer.log_every=1",
            "trainer.max_nonfinite=2",
            f"hydra.run.dir={run}",
        ],
        tmp_path,
        monkeypatch,
    )
    assert r.exit_code == 3, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "2 steps in a row had a non-finite loss" in lines[0], r.stderr
    assert load_checkpoint(run / "checkpoints" / "last.safetensors").step == 2  # steps 3 and 4 were the NaNs
    assert (run / "metrics.jsonl").is_file() and (run / "config.yaml").is_file()
