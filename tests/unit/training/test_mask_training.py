"""Mask-conditioned training (objective.mask_training): the network learns to use the known pixels; its
checkpoint rebuilds it; `diffuse sample` and every inpaint method work with it.

Data where context is everything: a mixture of 64 flat colours (8x8 images of one random colour each, std 0.05).
A known pixel gives the colour of every missing one, while from x_t alone the colour is hazy at moderate and
high noise. The two models train with the same seed, data and steps; only objective.mask_training differs.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse.checkpoint import load_checkpoint
from diffuse.diffusion.inpainting import MaskConditioned, mask_context
from diffuse.diffusion.masks import check_mask_kinds, draw_masks
from diffuse.diffusion.prediction import target
from diffuse.diffusion.schedule import coefficients, q_sample
from diffuse.errors import UserError
from diffuse.pipeline.config import model_of, runtime_of
from diffuse.tasks import inpaint as inpaint_task
from diffuse.tasks import sample as sample_task
from diffuse.training.trainer import Trainer

STEPS = 120


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    c = torch.rand(64, 3, 1, 1, generator=g) * 1.6 - 0.8
    path = tmp_path_factory.mktemp("mix") / "colours.safetensors"
    save_file(
        {
            "means": c.expand(64, 3, 8, 8).contiguous(),
            "stds": torch.full((64,), 0.05),
            "weights": torch.full((64,), 1 / 64),
        },
        str(path),
    )
    return path, c


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(colours, tmp_path_factory, one_thread):
    from tests.conftest import compose

    common = [
        "dataset=gmm",
        f"dataset.path={colours[0]}",
        "dataset.size=512",
        "model.ch=16",
        "model.ch_mult=[1,2]",
        "model.attn_resolutions=[]",
        "objective.prediction=x0",
        "trainer.batch_size=32",
        "trainer.warmup=10",
        "trainer.lr=3e-3",
        "trainer.sample_n=0",
        "trainer.ema_decay=0",
        f"trainer.steps={STEPS}",
    ]
    runs = {}
    for masked in (False, True):
        out = tmp_path_factory.mktemp(f"masked_{masked}")
        tr = Trainer(compose("train", common + [f"objective.mask_training={str(masked).lower()}"]), out)
        for _ in range(STEPS):
            tr.train_step()
        tr.save()
        runs[masked] = (tr, out)
    return runs


@pytest.mark.slow
def test_mask_conditioned_model_uses_the_context(trained):
    """Its loss on the pixels to generate is well below the unconditioned model's at the same step count.
    Evaluated at t in [300, 1000), where x_t alone leaves the colour uncertain, on 512 images and masks of the
    three kinds with known pixels (x0 prediction, simple weighting: the training objective itself)."""
    tr = trained[True][0]
    g = torch.Generator().manual_seed(99)
    n = 512
    x0, _ = tr.data.batch(torch.randint(0, len(tr.data), (n,), generator=g))
    generate = draw_masks(n, 8, 8, check_mask_kinds({"boxes": 1, "strokes": 1, "half": 1}), g)
    t = torch.randint(300, 1000, (n,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x_t = q_sample(tr.schedule, x0, t, eps)
    a, s = coefficients(tr.schedule, t, x0)
    goal = target("x0", x0, eps, a, s)
    loss = {}
    with torch.no_grad():
        for masked, (trainer, _) in trained.items():
            net = trainer.net.eval()
            f = MaskConditioned(net, mask_context(x0, 1 - generate)) if masked else net
            err = (f(x_t, t) - goal).pow(2)
            loss[masked] = float((err * generate).sum() / (generate.sum() * 3))
    print(
        f"\nmasked-pixel loss after {STEPS} steps: unconditioned {loss[False]:.4f}, mask-conditioned {loss[True]:.4f}"
    )
    assert loss[True] < 0.7 * loss[False], loss


def test_checkpoint_records_the_wider_input_and_rebuilds_it(trained, compose_cfg):
    ck = load_checkpoint(trained[True][1] / "checkpoints" / "last.safetensors")
    assert ck.config["objective"]["mask_training"] is True
    assert ck.config["model"]["in_channels"] == 2 * 3 + 1 and ck.config["model"]["out_channels"] == 3
    cfg = compose_cfg("sample", [f"ckpt={trained[True][1]}"])
    model = model_of(cfg, runtime_of(cfg))
    assert isinstance(model.denoiser.net, MaskConditioned) and model.shape == (3, 8, 8)
    plain = load_checkpoint(trained[False][1] / "checkpoints" / "last.safetensors")
    assert plain.config["model"]["in_channels"] == 3 and not plain.config["objective"]["mask_training"]


def test_sample_is_inpainting_with_nothing_known(trained, half_image, compose_cfg):
    """`diffuse sample` of a mask-trained model tells it that nothing is known: the images are exactly those of
    the conditioned method given an all-white mask (same seed, same noise, deterministic DDIM)."""
    d, _ = half_image
    from PIL import Image as _Image

    _Image.fromarray(np.full((8, 8), 255, "uint8")).save(d / "white.png")
    ckpt = trained[True][1]
    sample_task.run(
        compose_cfg("sample", [f"ckpt={ckpt}", "sampler=ddim", "steps=10", "n=4", "save_npz=true"]), d / "s"
    )
    inpaint_task.run(
        compose_cfg(
            "inpaint",
            [
                f"ckpt={ckpt}",
                "sampler=ddim",
                "steps=10",
                "n=4",
                f"image={d / 'img.png'}",
                f"mask={d / 'white.png'}",
                "inpaint.method=conditioned",
            ],
        ),
        d / "i",
    )
    sampled = np.load(d / "s" / "samples.npz")["arr_0"]
    assert sampled.shape == (4, 8, 8, 3)
    for j in range(4):
        assert np.array_equal(np.asarray(Image.open(d / "i" / f"img_{j:02d}.png")), sampled[j])
    assert len({sampled[j].tobytes() for j in range(4)}) == 4


@pytest.fixture
def half_image(colours, tmp_path):
    c = colours[1][5, :, 0, 0]
    img = ((c + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    Image.fromarray(np.broadcast_to(img, (8, 8, 3)).copy()).save(tmp_path / "img.png")
    m = np.zeros((8, 8), "uint8")
    m[:, 4:] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    return tmp_path, img


@pytest.mark.parametrize("method", ["conditioned", "replace", "repaint"])
def test_every_method_inpaints_with_a_mask_trained_model(trained, half_image, compose_cfg, method):
    d, colour = half_image
    out = d / method
    args = [
        f"ckpt={trained[True][1]}",
        f"image={d / 'img.png'}",
        f"mask={d / 'mask.png'}",
        "steps=20",
        "n=4",
        f"inpaint.method={method}",
        "inpaint.jump_length=2",
        "inpaint.resamples=2",
    ]
    info = inpaint_task.run(compose_cfg("inpaint", args), out)
    assert info["method"] == method and info["nfe"] == (20 if method != "repaint" else 24)
    for j in range(4):
        res = np.asarray(Image.open(out / f"img_{j:02d}.png")).astype(int)
        assert (res[:, :4] == colour).all()  # known pixels: the input's, exactly
        if method == "conditioned":  # the filled half takes the context's colour
            assert np.abs(res[:, 4:].reshape(-1, 3).mean(0) - colour).max() < 40, (res[:, 4:].mean((0, 1)), colour)


def test_conditioned_method_is_refused_without_mask_training(trained, half_image, compose_cfg):
    d, _ = half_image
    args = [
        f"ckpt={trained[False][1]}",
        f"image={d / 'img.png'}",
        f"mask={d / 'mask.png'}",
        "inpaint.method=conditioned",
    ]
    with pytest.raises(UserError, match="objective.mask_training=true"):
        inpaint_task.run(compose_cfg("inpaint", args), d / "refused")
    assert not (d / "refused").exists()


def test_resume_compares_objectives_as_before_mask_training():
    """A checkpoint written before mask training existed has no mask keys: it still resumes a plain run."""
    from diffuse.training.config import objective_key as _objective_key

    old = {"prediction": "eps", "weighting": "simple", "min_snr_gamma": 5.0, "p_uncond": 0.1}
    new = {**old, "mask_training": False, "mask_kinds": {"boxes": 0.3, "strokes": 0.3, "half": 0.2, "none": 0.2}}
    assert _objective_key(old) == _objective_key(new)
    assert _objective_key(old) != _objective_key({**new, "mask_training": True})
    changed = {**new, "mask_training": True, "mask_kinds": {"half": 1.0}}
    assert _objective_key(changed) != _objective_key({**new, "mask_training": True})
