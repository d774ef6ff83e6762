"""Super-resolution models through the real configs, in process: training and its exact resume, cascaded sampling,
diffuse upsample, and the one-line refusals of commands that sample from noise."""

import numpy as np
import pytest
import torch

from diffuse.checkpoint import load_checkpoint
from diffuse.errors import UserError
from diffuse.tasks import sample as sample_task
from diffuse.tasks import train as train_task
from diffuse.tasks import upsample as upsample_task
from tests.conftest import TINY_UNET

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = [
    "dataset.size=64",
    "model.ch=16",
    "model.ch_mult=[1,2]",
    "model.attn_resolutions=[]",
    "trainer.batch_size=8",
    "trainer.log_every=2",
    "trainer.sample_n=4",
    "trainer.sample_steps=2",
    "trainer.warmup=2",
    "trainer.lr=2e-3",
]
SR = ["condition=lowres", "condition.from_resolution=4", "dataset.resolution=8", "dataset.flip=true"]


def _train(compose, out, extra):
    return train_task.run(compose("train", SMALL + extra), out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.conftest import compose

    base, sr = tmp_path_factory.mktemp("base"), tmp_path_factory.mktemp("sr")
    _train(compose, base, ["dataset.resolution=4", "model.ch_mult=[1]", "trainer.steps=2", "trainer.sample_n=0"])
    _train(compose, sr, SR + ["trainer.steps=4", "trainer.ckpt_every=100"])
    return base, sr


def test_superres_checkpoint_records_its_condition(runs):
    _, sr = runs
    ck = load_checkpoint(sr / "checkpoints" / "last.safetensors")
    assert ck.config["condition"] == {
        "name": "lowres",
        "from_resolution": 4,
        "aug_max": 0.5,
        "aug_level": 0.1,
        "truncated": False,
    }
    assert (
        ck.config["model"]["in_channels"] == 6
        and ck.config["model"]["out_channels"] == 3
        and ck.config["model"]["aug_embedding"]
    )
    assert (sr / "grid.png").is_file()


def test_superres_resume_is_bit_identical(tmp_path, compose_cfg):
    """The augmentation levels and noise come from the checkpointed noise stream (flips from the data stream)."""
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    common = SR + ["trainer.ckpt_every=100", "trainer.sample_n=0"]
    _train(compose_cfg, straight, ["trainer.steps=4"] + common)
    _train(compose_cfg, halves, ["trainer.steps=2"] + common)
    _train(compose_cfg, halves, ["trainer.steps=4", "resume=true"] + common)
    a = load_checkpoint(straight / "checkpoints" / "last.safetensors")
    b = load_checkpoint(halves / "checkpoints" / "last.safetensors")
    assert a.step == b.step == 4
    for part in ("model", "ema"):
        for k in getattr(a, part):
            assert torch.equal(getattr(a, part)[k], getattr(b, part)[k]), (part, k)
    assert torch.equal(a.rng["noise"], b.rng["noise"])
    # another augmentation range is another run: refused, not continued
    with pytest.raises(UserError, match="condition"):
        _train(compose_cfg, halves, ["trainer.steps=8", "resume=true"] + common + ["condition.aug_max=0.3"])


def test_cascade_sample_and_upsample(runs, tmp_path, compose_cfg):
    base, sr = runs
    args = [f"cascade=[{base},{sr}]", "steps=3", "n=5", "save_npz=true"]
    sample_task.run(compose_cfg("sample", args + ["batch_size=5"]), tmp_path / "a")
    sample_task.run(compose_cfg("sample", args + ["batch_size=2"]), tmp_path / "b")
    a, b = np.load(tmp_path / "a" / "samples.npz")["arr_0"], np.load(tmp_path / "b" / "samples.npz")["arr_0"]
    # Image i depends only on (seed, i), every stage: with other noise the images would differ nearly everywhere.
    # The CPU kernels may round a pixel or two differently at another batch size, across a uint8 step.
    diff = np.abs(a.astype(int) - b.astype(int))
    assert a.shape == (5, 8, 8, 3) and diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).sum())
    info = (tmp_path / "a" / "sample.json").read_text()
    assert '"cascade"' in info and '"aug_level": 0.1' in info and '"nfe": 6' in info
    # the aug level is a sampling choice: another one, other images; truncation stops the base early
    sample_task.run(compose_cfg("sample", args + ["condition.aug_level=0.6"]), tmp_path / "c")
    sample_task.run(
        compose_cfg("sample", args + ["condition.aug_level=0.6", "condition.truncated=true", "sampler=ddpm"]),
        tmp_path / "d",
    )
    assert not np.array_equal(a, np.load(tmp_path / "c" / "samples.npz")["arr_0"])
    assert np.load(tmp_path / "d" / "samples.npz")["arr_0"].shape == (5, 8, 8, 3)

    from diffuse.images import save_png

    low = torch.from_numpy(a[:2]).permute(0, 3, 1, 2)[:, :, ::2, ::2].contiguous()
    (tmp_path / "in").mkdir()
    for i in range(2):
        save_png(low[i], tmp_path / "in" / f"x{i}.png")
    upsample_task.run(
        compose_cfg("upsample", [f"ckpt={sr}", f"image={tmp_path / 'in'}", "n=2", "steps=2"]), tmp_path / "up"
    )
    assert sorted(p.name for p in (tmp_path / "up").glob("x*.png")) == [
        "x0_00.png",
        "x0_01.png",
        "x1_00.png",
        "x1_01.png",
    ]
    assert (tmp_path / "up" / "grid.png").is_file()


def test_superres_checkpoints_are_refused_or_checked_in_one_line(runs, tmp_path, compose_cfg):
    base, sr = runs
    with pytest.raises(UserError, match="super-resolution model .*cascade="):
        sample_task.prepare(compose_cfg("sample", [f"ckpt={sr}"]), tmp_path)
    from diffuse.images import save_png
    from diffuse.tasks import distill, edit, inpaint

    img, mask = tmp_path / "x.png", tmp_path / "m.png"
    save_png(torch.zeros(3, 8, 8, dtype=torch.uint8), img)
    save_png(torch.full((1, 8, 8), 255, dtype=torch.uint8), mask)
    for task, cfg in [(inpaint, [f"image={img}", f"mask={mask}"]), (edit, [f"image={img}"])]:
        with pytest.raises(UserError, match="super-resolution model"):
            task.check(compose_cfg(task.__name__.rsplit(".", 1)[1], [f"ckpt={sr}"] + cfg), tmp_path)
    with pytest.raises(UserError, match="super-resolution model"):
        distill.check(compose_cfg("distill", [f"teacher={sr}"]), tmp_path)
    with pytest.raises(UserError, match="super-resolution model"):  # as a base: it does not sample from noise
        sample_task.prepare(compose_cfg("sample", [f"cascade=[{sr},{sr}]"]), tmp_path)
    with pytest.raises(UserError, match="super-resolves 3 x 4 x 4"):
        sample_task.prepare(compose_cfg("sample", [f"cascade=[{base},{sr},{sr}]"]), tmp_path)
    with pytest.raises(UserError, match="condition.aug_level"):
        sample_task.prepare(compose_cfg("sample", [f"cascade=[{base},{sr}]", "condition.aug_level=1.5"]), tmp_path)
    with pytest.raises(UserError, match="not a super-resolution model"):
        upsample_task.prepare(compose_cfg("upsample", [f"ckpt={base}", "image=x.png"]))
    with pytest.raises(UserError, match="from_resolution=5"):
        train_task.check(compose_cfg("train", SMALL + SR + ["condition.from_resolution=5"]), tmp_path)


def test_eval_scores_the_whole_cascade(runs, tmp_path, compose_cfg):
    """diffuse eval cascade=[...] scores the cascade's final images: the same FID as its saved samples."""
    from diffuse.checkpoint import Checkpoint, save_checkpoint
    from diffuse.nets import build_network
    from diffuse.tasks import evaluate

    base, sr = runs
    torch.manual_seed(0)
    net_cfg = dict(TINY_UNET)
    fx_path = tmp_path / "features.safetensors"
    net = build_network(net_cfg)
    save_checkpoint(
        fx_path,
        Checkpoint(
            config={"model": net_cfg, "schedule": {"kind": "linear", "T": 1000}, "objective": {"prediction": "eps"}},
            model=net.state_dict(),
            ema=net.state_dict(),
        ),
    )
    fx = [
        "metrics.features=checkpoint",
        f"metrics.features_ckpt={fx_path}",
        f"metrics.cache_dir={tmp_path / 'cache'}",
        "dataset=shapes",
        "dataset.resolution=8",
        "dataset.size=24",
        "metrics.kid_subset_size=8",
        "metrics.kid_subsets=4",
    ]
    cascade = [f"cascade=[{base},{sr}]", "steps=2", "seed=1"]
    sample_task.run(compose_cfg("sample", cascade + ["n=12", "save_npz=true"]), tmp_path / "s")
    gen = evaluate.run(compose_cfg("eval", fx + cascade + ["metric=[fid]", "n=12", "batch_size=5"]), tmp_path / "gen")
    saved = evaluate.run(
        compose_cfg("eval", fx + ["metric=[fid]", f"samples={tmp_path / 's' / 'samples.npz'}"]), tmp_path / "npz"
    )
    assert gen["metrics"]["fid"] == pytest.approx(saved["metrics"]["fid"], rel=1e-5) and gen["metrics"]["fid"] > 0
    assert gen["nfe"] == 4 and len(gen["cascade"]) == 2


def test_latent_base_is_decoded_before_super_resolution(runs, tmp_path, compose_cfg, monkeypatch):
    """A latent base model's samples reach the super-resolution stage as images: those `diffuse sample ckpt=BASE`
    writes, not its 4 x 2 x 2 latents; truncating after it (which would hand on a noised latent) is refused."""
    from diffuse.images import to_uint8
    from diffuse.pipeline import cascade
    from diffuse.tasks import train_ae

    _, sr = runs
    ae, base = tmp_path / "ae", tmp_path / "latent"
    train_ae.run(
        compose_cfg(
            "train_ae",
            [
                "dataset.resolution=4",
                "dataset.size=64",
                "autoencoder.ch=8",
                "autoencoder.ch_mult=[1,2]",
                "trainer.steps=2",
                "trainer.batch_size=8",
                "eval_n=8",
                "grid_n=0",
            ],
        ),
        ae,
    )
    _train(
        compose_cfg,
        base,
        [
            f"autoencoder_ckpt={ae}",
            "dataset.resolution=4",
            "model.ch_mult=[1]",
            "trainer.steps=2",
            "trainer.sample_n=0",
        ],
    )
    seen = []
    real = cascade.conditioned
    monkeypatch.setattr(
        cascade, "conditioned", lambda st, x, level, gen: (seen.append(x.clone()), real(st, x, level, gen))[1]
    )
    args = ["steps=3", "n=3", "save_npz=true"]
    sample_task.run(compose_cfg("sample", [f"cascade=[{base},{sr}]"] + args), tmp_path / "c")
    assert np.load(tmp_path / "c" / "samples.npz")["arr_0"].shape == (3, 8, 8, 3)
    given = torch.cat(seen)
    assert given.shape == (3, 3, 4, 4) and float(given.abs().max()) <= 1.0
    sample_task.run(compose_cfg("sample", [f"ckpt={base}"] + args), tmp_path / "b")
    alone = np.load(tmp_path / "b" / "samples.npz")["arr_0"]
    assert np.array_equal(to_uint8(given).permute(0, 2, 3, 1).numpy(), alone)
    with pytest.raises(UserError, match="truncated=true is not allowed after a latent base"):
        sample_task.prepare(
            compose_cfg(
                "sample",
                [f"cascade=[{base},{sr}]", "condition.aug_level=0.6", "condition.truncated=true", "sampler=ddpm"],
            ),
            tmp_path / "t",
        )
