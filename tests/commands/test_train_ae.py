"""Latent diffusion: diffuse train-ae (round trip, exact resume), the latent training set (its measured scale factor,
its cache), and latent checkpoints sampled, inpainted and refused with a mismatching autoencoder."""

import json

import pytest
import torch
from typer.testing import CliRunner

from diffuse.checkpoint import load_checkpoint, save_checkpoint
from diffuse.cli import app
from diffuse.data import build_dataset
from diffuse.errors import UserError
from diffuse.images import save_png, to_uint8
from diffuse.pipeline.config import to_dict
from diffuse.pipeline.latent import load_autoencoder
from diffuse.tasks import inpaint as inpaint_task
from diffuse.tasks import sample as sample_task
from diffuse.tasks import train_ae
from diffuse.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

# What 100 steps of the fixture's autoencoder reach on held-out 16x16 shapes (measured: 15.7 dB); a grey image
# scores 7.4 dB against them.
MIN_PSNR = 14.0

AE = [
    "autoencoder.ch=16",
    "autoencoder.groups=8",
    "dataset.size=1024",
    "loss.recon=l2",
    "trainer.lr=4e-3",
    "trainer.warmup=10",
    "trainer.batch_size=16",
    "trainer.ema_decay=0.5",
    "trainer.log_every=50",
    "trainer.ckpt_every=1000",
    "eval_n=256",
    "grid_n=8",
]


def _train_ae(compose_cfg, out, extra):
    return train_ae.run(compose_cfg("train_ae", AE + extra), out)


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    from tests.conftest import compose

    out = tmp_path_factory.mktemp("ae")
    result = _train_ae(compose, out, ["trainer.steps=100"])
    return out, result


@pytest.mark.slow
def test_autoencoder_round_trip_beats_stated_psnr(ae_run):
    out, result = ae_run
    report = json.loads((out / "ae.json").read_text())
    assert report["psnr"] == result["psnr"] > MIN_PSNR, report
    assert report["latent_shape"] == [4, 4, 4] and report["factor"] == 4
    # The figure is the EMA network's on the held-out draw (seed 1), not on the training images.
    codec = load_autoencoder(out)
    held = build_dataset({"name": "shapes", "resolution": 16, "channels": 3, "num_classes": 4, "size": 1024, "seed": 1})
    x, _ = held.batch(torch.arange(256))
    again = train_ae.psnr(to_uint8(x), to_uint8(codec.net.decode(codec.encode_unscaled(x)))).mean()
    assert abs(float(again) - report["psnr"]) < 1e-6
    assert (out / "reconstructions.png").is_file()


SMALL = ["autoencoder.ch=8", "dataset.resolution=8", "dataset.size=64", "trainer.batch_size=8", "trainer.log_every=2"]
# The patch discriminator at a size 8-pixel images allow (one stride-2 layer: 2x2 patches)
DISC = ["loss.disc_weight=0.5", "loss.disc_ch=8", "loss.disc_layers=1"]


@pytest.mark.parametrize("disc", [[], DISC + ["loss.disc_start=2"]], ids=["plain", "discriminator"])
def test_train_ae_resume_is_bit_identical(tmp_path, compose_cfg, disc):
    """With the discriminator, it joins at step 2 and the run is cut at 3: its weights and moments must carry over."""
    small = SMALL + disc
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    _train_ae(compose_cfg, straight, small + ["trainer.steps=6"])
    _train_ae(compose_cfg, halves, small + ["trainer.steps=3"])  # stops inside a log interval
    _train_ae(compose_cfg, halves, small + ["trainer.steps=6", "resume=true"])
    a = load_checkpoint(straight / "checkpoints" / "last.safetensors")
    b = load_checkpoint(halves / "checkpoints" / "last.safetensors")
    assert a.step == b.step == 6
    for part in ("model", "ema", "aux"):
        assert getattr(a, part).keys() == getattr(b, part).keys()
        for k in getattr(a, part):
            assert torch.equal(getattr(a, part)[k], getattr(b, part)[k]), (part, k)
    assert any(k.startswith("disc_optim.") for k in a.aux) == bool(disc)
    logs = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (straight, halves)]
    # The first half ends by logging its step 3, so the intervals differ between the runs; the last one does not.
    assert logs[0][-1] == {**logs[1][-1], "images_per_s": logs[0][-1]["images_per_s"]}
    assert logs[0][-1]["step"] == 6 and logs[0][-1]["recon"] > 0
    # The discriminator's losses are logged once it is on, and only then.
    assert ("disc" in logs[0][0], "disc" in logs[0][-1], "adv" in logs[0][-1]) == (False, bool(disc), bool(disc))


def _same_run(a, b):
    for part in ("model", "ema"):
        for k in getattr(a, part):
            assert torch.equal(getattr(a, part)[k], getattr(b, part)[k]), (part, k)
    for k in a.optim["state"][0]:
        assert all(torch.equal(a.optim["state"][i][k], b.optim["state"][i][k]) for i in a.optim["state"])
    assert all(torch.equal(a.rng[k], b.rng[k]) for k in a.rng)


def test_discriminator_before_its_start_or_at_weight_zero_changes_nothing(tmp_path, compose_cfg):
    runs = {
        "none": [],
        "later": DISC + ["loss.disc_start=3"],
        "zero": DISC[1:] + ["loss.disc_weight=0", "loss.disc_start=0"],
    }
    ck = {}
    for name, extra in runs.items():
        _train_ae(compose_cfg, tmp_path / name, SMALL + ["trainer.steps=3"] + extra)
        ck[name] = load_checkpoint(tmp_path / name / "checkpoints" / "last.safetensors")
    _same_run(ck["none"], ck["later"])
    _same_run(ck["none"], ck["zero"])
    assert any(k.startswith("disc.") for k in ck["later"].aux) and not any(
        k.startswith("disc.") for k in ck["zero"].aux
    )
    # A checkpoint without a discriminator is not resumed as if it had one.
    with pytest.raises(UserError, match="holds no discriminator"):
        _train_ae(compose_cfg, tmp_path / "none", SMALL + ["trainer.steps=4", "resume=true"] + DISC)


def test_discriminator_learns_to_tell_reconstructions_apart(tmp_path, compose_cfg):
    """After 24 steps from step 0, D scores held-out images above the autoencoder's reconstructions of them, and its
    hinge loss on them is below its initial weights' (about 1: logits near 0)."""
    from diffuse.nets.autoencoder import PatchDiscriminator
    from diffuse.training.autoencoder import hinge_d_loss

    out = tmp_path / "gan"
    _train_ae(
        compose_cfg,
        out,
        SMALL
        + DISC
        + [
            "loss.disc_start=0",
            "loss.disc_weight=0.05",
            "trainer.steps=24",
            "trainer.lr=2e-3",
            "trainer.log_every=6",
            "trainer.warmup=2",
        ],
    )
    ck = load_checkpoint(out / "checkpoints" / "last.safetensors")
    codec = load_autoencoder(out)
    held = build_dataset({"name": "shapes", "resolution": 8, "channels": 3, "num_classes": 4, "size": 64, "seed": 1})
    x, _ = held.batch(torch.arange(64))
    with torch.no_grad():
        xr = codec.net.decode(codec.encode_unscaled(x))
        scores = {}
        for name in ("initial", "trained"):
            torch.manual_seed(0 + 3)  # trainer.seed + 3: the discriminator's initial weights
            d = PatchDiscriminator(3, 8, 1)
            if name == "trained":
                d.load_state_dict({k[len("disc.") :]: v for k, v in ck.aux.items() if k.startswith("disc.")})
            real, fake = d(x), d(xr)
            scores[name] = (float(hinge_d_loss(real, fake)), float(real.mean() - fake.mean()))
    assert scores["trained"][0] < scores["initial"][0] - 0.05, scores
    assert scores["trained"][1] > 0.1 and scores["trained"][1] > scores["initial"][1] + 0.1, scores
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("disc" in r and "adv" in r for r in logs) and logs[-1]["disc"] < logs[0]["disc"], logs


LATENT = [
    "dataset.size=512",
    "trainer.steps=4",
    "trainer.batch_size=16",
    "trainer.sample_n=4",
    "trainer.sample_steps=3",
    "trainer.ckpt_every=1000",
]


@pytest.fixture(scope="module")
def latent_run(ae_run, tmp_path_factory):
    from diffuse.tasks import train as train_task
    from tests.conftest import compose

    ae_dir, _ = ae_run
    out = tmp_path_factory.mktemp("latent")
    train_task.run(compose("train", [f"autoencoder_ckpt={ae_dir}"] + LATENT), out)
    return ae_dir, out


def test_latent_training_data_has_unit_variance(latent_run, compose_cfg, capsys):
    ae_dir, out = latent_run
    ckpt = load_checkpoint(out / "checkpoints" / "last.safetensors")
    rec = ckpt.config["autoencoder"]
    codec = load_autoencoder(ae_dir)
    assert rec["hash"] == codec.hash and rec["path"] == codec.path
    # The scale factor is 1 / std of the posterior means of the training images, encoded here independently.
    data = build_dataset(to_dict(compose_cfg("train", ["dataset.size=512"]).dataset))
    z = codec.encode_unscaled(data.batch(torch.arange(len(data)))[0]).double()
    assert rec["scale_factor"] == pytest.approx(1 / float(z.std()), rel=1e-5)
    assert float(z.std()) != pytest.approx(1.0, abs=0.05)  # not unit variance before scaling: the factor does the work
    # The network is sized for the latents, and a second run reads them from the cache, unit variance again.
    assert ckpt.config["model"]["resolution"] == 4 and ckpt.config["model"]["in_channels"] == 4
    capsys.readouterr()
    cfg = to_dict(compose_cfg("train", [f"autoencoder_ckpt={ae_dir}"] + LATENT))
    tr = Trainer(cfg, out)
    assert "latents read from" in capsys.readouterr().out
    assert float(tr.data.images.double().std()) == pytest.approx(1.0, abs=1e-6)
    assert tr.latent.scale_factor == rec["scale_factor"]
    assert (out / "grid.png").is_file()


def test_latent_checkpoint_samples_images_and_refuses_another_autoencoder(latent_run, tmp_path, compose_cfg):
    ae_dir, out = latent_run
    cfg = compose_cfg("sample", [f"ckpt={out}", "n=3", "steps=3", "save_npz=true"])
    info = sample_task.run(cfg, tmp_path / "s")
    import numpy as np

    arr = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    assert arr.shape == (3, 16, 16, 3)  # decoded: the images' size, not the latents' 4 x 4
    assert info["autoencoder"] == load_autoencoder(ae_dir).path
    # The same weights under other metadata are another file: its hash differs, and it is refused in one line.
    other = tmp_path / "other.safetensors"
    ck = load_checkpoint(ae_dir / "checkpoints" / "last.safetensors")
    ck.extra = {**ck.extra, "note": "retrained"}
    save_checkpoint(other, ck)
    with pytest.raises(UserError, match="not the autoencoder this model was trained with"):
        sample_task.run(
            compose_cfg("sample", [f"ckpt={out}", f"autoencoder_ckpt={other}", "n=1", "steps=2"]), tmp_path / "t"
        )
    # Through the command line, where autoencoder= is the key's name: exit 2, one line, nothing written.
    r = CliRunner().invoke(
        app,
        ["sample", f"ckpt={out}", f"autoencoder={other}", "n=1", f"hydra.run.dir={tmp_path / 'u'}"],
        catch_exceptions=False,
    )
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "not the autoencoder this model was trained with" in lines[0], (
        r.output
    )
    assert not (tmp_path / "u" / "images").exists()


def test_latent_inpainting_keeps_known_pixels(latent_run, tmp_path, compose_cfg):
    _, out = latent_run
    img = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 16, 16, dtype=torch.uint8)
    mask[:, 4:10, 6:13] = 255  # white: generate; not aligned to the 4-pixel latent cells
    save_png(img, tmp_path / "img.png")
    save_png(mask, tmp_path / "mask.png")
    cfg = compose_cfg(
        "inpaint",
        [
            f"ckpt={out}",
            f"image={tmp_path / 'img.png'}",
            f"mask={tmp_path / 'mask.png'}",
            "n=2",
            "steps=3",
            "inpaint=replace",
        ],
    )
    inpaint_task.run(cfg, tmp_path / "r")
    from diffuse.images import read_png

    for j in range(2):
        res = read_png(tmp_path / "r" / f"img_{j:02d}.png")
        keep = mask[0] == 0
        assert torch.equal(res[:, keep], img[:, keep])
        assert not torch.equal(res[:, ~keep], img[:, ~keep])  # the hole was drawn, not copied


@pytest.mark.parametrize(
    "change,needle",
    [
        (lambda m: m.update(latent_channels="four"), "latent_channels='four' is not allowed"),
        (lambda m: m.update(ch_mult=[]), "ch_mult=[] is not allowed"),
    ],
)
def test_a_crafted_autoencoder_header_is_one_line(ae_run, tmp_path, change, needle):
    """The autoencoder's header config is user input: checked before any of its keys is read."""
    from tests.helpers import rewrite

    def config(cfg):
        change(cfg["model"])

    bad = rewrite(ae_run[0] / "checkpoints" / "last.safetensors", tmp_path / "bad.safetensors", config=config)
    from diffuse.errors import UserError
    from diffuse.pipeline.latent import autoencoder_header

    with pytest.raises(UserError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        autoencoder_header(str(bad))
