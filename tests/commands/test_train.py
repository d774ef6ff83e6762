"""Training and sampling through the real configs, in process (the CLI's subprocess path is in test_cli.py)."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from diffuse.checkpoint import load_checkpoint
from diffuse.diffusion.objectives import diffusion_loss
from diffuse.pipeline.model import network_from_checkpoint
from diffuse.tasks import sample as sample_task
from diffuse.tasks import train as train_task
from tests.conftest import compose

SMALL = [
    "dataset.size=256",
    "dataset.resolution=8",
    "model.ch=16",
    "model.ch_mult=[1,2]",
    "model.attn_resolutions=[4]",
    "trainer.batch_size=16",
    "trainer.log_every=5",
    "trainer.sample_n=4",
    "trainer.sample_steps=3",
    "trainer.warmup=5",
    "trainer.lr=2e-3",
]


def _train(compose_cfg, out, extra):
    cfg = compose_cfg("train", SMALL + extra)
    return train_task.run(cfg, out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.conftest import compose

    out = tmp_path_factory.mktemp("run")
    train_task.run(compose("train", SMALL + ["trainer.steps=40", "trainer.ckpt_every=20"]), out)
    return out


def test_training_lowers_the_loss(trained, compose_cfg):
    ck = load_checkpoint(trained / "checkpoints" / "last.safetensors")
    assert ck.step == 40
    tn = network_from_checkpoint(ck, use_ema=False)
    net, schedule = tn.net, tn.schedule
    from diffuse.data import build_dataset

    data = build_dataset(OmegaConf.create(ck.config["dataset"]))
    x0, _ = data.batch(torch.arange(128))
    g = torch.Generator().manual_seed(123)
    t = torch.randint(0, 1000, (128,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    fresh = type(net)(
        **{k: (tuple(v) if isinstance(v, list) else v) for k, v in ck.config["model"].items() if k != "arch"}
    )
    with torch.no_grad():
        before = diffusion_loss(fresh.eval(), x0, schedule, t=t, noise=noise).mean().item()
        after = diffusion_loss(net.eval(), x0, schedule, t=t, noise=noise).mean().item()
    assert after < 0.5 * before, (before, after)
    lines = (trained / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8 and '"images_per_s"' in lines[0]
    assert (trained / "grid.png").is_file() and (trained / "samples" / "step_0000040.png").is_file()
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == [
        "last.safetensors",
        "step_0000020.safetensors",
        "step_0000040.safetensors",
    ]


def test_resume_is_bit_identical(tmp_path, compose_cfg):
    """With random flips and mask training on: their coin tosses and masks come from the checkpointed data
    generator."""
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    common = ["trainer.ckpt_every=100", "trainer.sample_n=0", "dataset.flip=true", "objective.mask_training=true"]
    _train(compose_cfg, straight, ["trainer.steps=10"] + common)
    _train(compose_cfg, halves, ["trainer.steps=5"] + common)
    _train(compose_cfg, halves, ["trainer.steps=10", "resume=true"] + common)
    a = load_checkpoint(straight / "checkpoints" / "last.safetensors")
    b = load_checkpoint(halves / "checkpoints" / "last.safetensors")
    assert a.step == b.step == 10
    for part in ("model", "ema"):
        for k in getattr(a, part):
            assert torch.equal(getattr(a, part)[k], getattr(b, part)[k]), (part, k)
    for idx in a.optim["state"]:
        for key, val in a.optim["state"][idx].items():
            assert torch.equal(val, b.optim["state"][idx][key])


def _sample(compose_cfg, out, ckpt, extra):
    cfg = compose_cfg("sample", [f"ckpt={ckpt}", "steps=4"] + extra)
    return sample_task.run(cfg, out)


def test_sampling_rebuilds_from_checkpoint_and_is_reproducible(trained, tmp_path, compose_cfg):
    _sample(compose_cfg, tmp_path / "a", trained, ["n=6", "batch_size=6", "save_npz=true"])
    _sample(
        compose_cfg,
        tmp_path / "b",
        trained / "checkpoints" / "last.safetensors",
        ["n=6", "batch_size=1", "save_npz=true"],
    )
    _sample(compose_cfg, tmp_path / "c", trained, ["n=6", "batch_size=4", "save_npz=true", "seed=1"])
    a = np.load(tmp_path / "a" / "samples.npz")["arr_0"]
    b = np.load(tmp_path / "b" / "samples.npz")["arr_0"]
    c = np.load(tmp_path / "c" / "samples.npz")["arr_0"]
    assert a.shape == (6, 8, 8, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)  # image i is the same in a batch of 6 and of 1
    assert not np.array_equal(a, c)  # another seed, other images
    assert sorted(p.name for p in (tmp_path / "a" / "images").iterdir()) == [f"{i:06d}.png" for i in range(6)]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "images" / "000003.png")), a[3])
    assert (tmp_path / "a" / "grid.png").is_file()


def test_batch_of_one_equals_batch_of_sixteen(trained, tmp_path, compose_cfg):
    _sample(compose_cfg, tmp_path / "one", trained, ["n=16", "batch_size=1", "save_npz=true", "sampler=ddpm"])
    _sample(compose_cfg, tmp_path / "all", trained, ["n=16", "batch_size=16", "save_npz=true", "sampler=ddpm"])
    assert np.array_equal(
        np.load(tmp_path / "one" / "samples.npz")["arr_0"], np.load(tmp_path / "all" / "samples.npz")["arr_0"]
    )


def test_oracle_samples_without_checkpoint(tmp_path, compose_cfg):
    info = _sample_oracle(compose_cfg, tmp_path)
    assert info["model"] == "oracle"
    x = np.load(tmp_path / "samples.npz")["arr_0"]
    assert x.shape == (8, 8, 8, 3)


def _sample_oracle(compose_cfg, out):
    cfg = compose_cfg("sample", ["model=oracle", "dataset=gmm", "n=8", "steps=20", "save_npz=true"])
    return sample_task.run(cfg, out)


@pytest.mark.parametrize("experiment", ["quickstart", "fashion_mnist"])
@pytest.mark.parametrize(
    "objective,prediction", [("edm", "x0"), ("consistency", "x0"), ("min_snr", "v"), ("simple", "eps"), ("v", "v")]
)
def test_an_objective_brings_its_own_prediction_whatever_the_experiment(experiment, objective, prediction):
    """The experiments train v through the objective=v option, not by setting objective.prediction: a user's
    objective= replaces it with that objective's own prediction (the docs' first EDM example, issue 27 part 9)."""
    from diffuse.pipeline.config import to_dict
    from diffuse.training.config import validate_objective

    cfg = compose("train", [f"experiment={experiment}", f"objective={objective}"])
    assert cfg.objective.prediction == prediction
    validate_objective(to_dict(cfg.objective))  # the refusal the docs' example met: prediction v with kind edm
    assert compose("train", [f"experiment={experiment}"]).objective.prediction == "v"
