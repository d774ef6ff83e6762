"""DiT (Peebles & Xie 2023): shapes of every part, adaLN-Zero identity at init, and a tiny one that trains."""

import numpy as np
import pytest
import torch

from diffuse.checkpoint import load_checkpoint
from diffuse.diffusion.objectives import diffusion_loss
from diffuse.errors import UserError
from diffuse.nets import build_network
from diffuse.nets.dit import DiT, sincos_2d
from diffuse.pipeline.model import network_from_checkpoint
from diffuse.tasks import sample as sample_task
from diffuse.tasks import train as train_task

TINY = dict(resolution=8, in_channels=3, patch_size=2, hidden_size=32, depth=2, heads=2, num_classes=4)


def _randomise_adaln(net):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "adaLN" in name or "final_layer.linear" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def test_shapes_of_every_part():
    torch.manual_seed(0)
    net = DiT(**TINY)
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([0, 3, 4])
    tokens = net.patchify(x)
    assert tokens.shape == (3, 16, 32)  # (8/2)^2 tokens of hidden 32
    c = net.embed(t, y)
    assert c.shape == (3, 32)
    for block in net.blocks:
        assert block(tokens, c).shape == (3, 16, 32)
    assert net.final_layer(tokens, c).shape == (3, 16, 2 * 2 * 3)
    assert net(x, t, y).shape == (3, 3, 8, 8)
    assert net(x, torch.tensor([0.5, 10.25, 998.9]), None).shape == (3, 3, 8, 8)  # fractional t, no label
    assert sincos_2d(32, 4).shape == (16, 32)
    # unpatchify inverts the token layout: token (i, j) holds pixel block [2i:2i+2, 2j:2j+2], channels last
    img = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(1, 3, 8, 8)
    patches = img.reshape(1, 3, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(1, 16, 12)
    assert torch.equal(net.unpatchify(patches), img)


def test_sincos_2d_values_by_hand():
    """MAE / DiT's fixed embedding for dim 8 on a 2x2 grid: omega_i = 1/10000^(i/(D/4)), here omega = (1, 0.01);
    token k is grid cell (row, col) = divmod(k, 2), the raster order of patchify. Pinned order: the first half
    of the channels is the row, [sin(row omega), cos(row omega)], the second half the column. (MAE's reference
    code puts the column first, np.meshgrid(grid_w, grid_h); this is that embedding of the transposed grid,
    equivalent for a network trained with it, not for weights trained with the other.)"""
    sin, cos = np.sin, np.cos
    expected = []
    for row, col in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        expected.append(
            [
                sin(row * 1.0),
                sin(row * 0.01),
                cos(row * 1.0),
                cos(row * 0.01),
                sin(col * 1.0),
                sin(col * 0.01),
                cos(col * 1.0),
                cos(col * 0.01),
            ]
        )
    got = sincos_2d(8, 2)
    assert got.dtype == torch.float32 and got.shape == (4, 8)
    assert np.allclose(got.numpy(), np.array(expected), rtol=0, atol=1e-7)
    # a larger case, one token: dim 16 (four frequencies 10000^(-i/4)), 3x3 grid, cell (2, 1) is token 7
    w = 10000.0 ** (-np.arange(4) / 4)
    want = np.concatenate([sin(2 * w), cos(2 * w), sin(1 * w), cos(1 * w)])
    assert np.allclose(sincos_2d(16, 3)[7].numpy(), want, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(10, 2)


def test_adaln_zero_blocks_are_the_identity_at_init():
    torch.manual_seed(0)
    net = DiT(**TINY)
    h, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    for block in net.blocks:
        assert torch.equal(block.adaLN_modulation[-1].weight, torch.zeros_like(block.adaLN_modulation[-1].weight))
        assert torch.equal(block(h, c), h)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    assert torch.equal(net(x, t, torch.tensor([1, 2])), torch.zeros_like(x))  # zero final layer
    # once trained (here: perturbed) the blocks act, and the label and the null label matter
    _randomise_adaln(net)
    assert not torch.allclose(net.blocks[0](h, c), h)
    out = [net(x, t, torch.tensor([k, k])) for k in range(5)]
    assert not torch.allclose(out[0], out[1])
    assert torch.equal(net(x, t, None), out[4])  # y=None is the null label (index num_classes)


def test_configs_have_the_paper_sizes(compose_cfg):
    sizes = {}
    for name in ("dit_s", "dit_b"):
        cfg = dict(compose_cfg("train", [f"model={name}"]).model)
        sizes[name] = (cfg["hidden_size"], cfg["depth"], cfg["heads"], cfg["patch_size"])
    assert sizes == {"dit_s": (384, 12, 6, 2), "dit_b": (768, 12, 12, 2)}
    with pytest.raises(UserError, match="patch_size"):
        build_network({"arch": "dit", "resolution": 9, "patch_size": 2, "hidden_size": 32, "depth": 1, "heads": 2})


def test_tiny_conditional_dit_trains_on_shapes_and_samples(tmp_path, compose_cfg):
    over = [
        "model=dit_s",
        "model.hidden_size=32",
        "model.depth=2",
        "model.heads=2",
        "model.num_classes=4",
        "dataset.size=64",
        "dataset.resolution=8",
        "trainer.batch_size=16",
        "trainer.steps=12",
        "trainer.lr=3e-3",
        "trainer.warmup=1",
        "trainer.log_every=10",
        "trainer.ckpt_every=100",
        "trainer.sample_n=0",
        "objective.p_uncond=0.2",
    ]
    train_task.run(compose_cfg("train", over), tmp_path / "run")
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
    tn = network_from_checkpoint(ck, use_ema=False)
    net, schedule = tn.net, tn.schedule
    assert isinstance(net, DiT) and net.num_classes == 4
    from omegaconf import OmegaConf

    from diffuse.data import build_dataset

    x0, y = build_dataset(OmegaConf.create(ck.config["dataset"])).batch(torch.arange(64))
    g = torch.Generator().manual_seed(1)
    t, noise = torch.randint(0, 1000, (64,), generator=g), torch.randn(x0.shape, generator=g)
    torch.manual_seed(0)
    fresh = DiT(**{k: v for k, v in ck.config["model"].items() if k != "arch"})
    with torch.no_grad():
        before = diffusion_loss(fresh.eval(), x0, schedule, t=t, noise=noise, y=y).mean().item()
        after = diffusion_loss(net.eval(), x0, schedule, t=t, noise=noise, y=y).mean().item()
    assert before == pytest.approx(1.0, abs=0.05)  # the zero-initialised output predicts eps = 0
    assert after < 0.7 * before, (before, after)
    # the checkpoint rebuilds a class-conditional sampler: labels in samples.npz, guidance works
    info = sample_task.run(
        compose_cfg(
            "sample",
            [f"ckpt={tmp_path / 'run'}", "n=4", "steps=3", "save_npz=true", "guidance.scale=2", "sampler=dpm_solver"],
        ),
        tmp_path / "s",
    )
    assert np.load(tmp_path / "s" / "samples.npz")["arr_1"].tolist() == [0, 1, 2, 3] and info["nfe"] == 3
