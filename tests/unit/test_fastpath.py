"""The fast paths change how things are computed, never what: each switch against the reference path on the CPU."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from diffuse.diffusion.schedule import make_schedule
from diffuse.errors import UserError
from diffuse.fastpath import set_attention, switch
from diffuse.nets import build_network
from diffuse.nets.flops import forward_flops
from diffuse.pipeline.config import to_dict
from diffuse.pipeline.sampling import generate, plan_sampler
from diffuse.training.trainer import Trainer

TINY_UNET = {
    "arch": "unet",
    "ch": 32,
    "ch_mult": [1, 2],
    "attn_resolutions": [8],
    "heads": 2,
    "resolution": 8,
    "in_channels": 3,
}
TINY_DIT = {
    "arch": "dit",
    "hidden_size": 64,
    "depth": 2,
    "heads": 4,
    "patch_size": 2,
    "resolution": 8,
    "in_channels": 3,
}
TRAIN = [
    "dataset.size=64",
    "dataset.resolution=8",
    "model.ch=16",
    "model.ch_mult=[1,2]",
    "model.attn_resolutions=[4]",
    "trainer.batch_size=8",
    "trainer.sample_n=0",
    "trainer.log_every=1",
    "trainer.steps=3",
]


def _inputs(b=3, res=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 3, res, res, generator=g), torch.tensor([0, 500, 999][:b])


@pytest.mark.parametrize("cfg", [TINY_UNET, TINY_DIT], ids=["unet", "dit"])
def test_math_attention_equals_sdpa(cfg):
    torch.manual_seed(0)
    net = build_network(cfg).eval()
    with torch.no_grad():  # DiT's adaLN-Zero starts as the zero function: give every weight a value
        for p in net.parameters():
            p.normal_(0, 0.1)
    x, t = _inputs()
    with torch.no_grad():
        a = set_attention(net, "sdpa")(x, t)
        b = set_attention(net, "math")(x, t)
    assert (a - b).abs().max() < 1e-5 * a.abs().max() and a.abs().max() > 0.1


def test_channels_last_network_gives_the_same_output():
    torch.manual_seed(0)
    net = build_network(TINY_UNET).eval()
    x, t = _inputs()
    with torch.no_grad():
        a = net(x, t)
        b = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), t)
    assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("model", ["ddpm_cifar10", "dit_s"])
def test_analytic_flops_equal_torch_flop_counter(model, compose_cfg):
    """The count the throughput bench reports, against PyTorch's own operator-level count (math attention: the
    counter has no formula for the CPU's fused attention kernel)."""
    cfg = {**to_dict(compose_cfg("train", [f"model={model}"]).model), "resolution": 32, "in_channels": 3}
    net = set_attention(build_network(cfg), "math").eval()
    x, t = _inputs(1, 32)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, t)
    flops = forward_flops(net, x, t)
    assert flops == counter.get_total_flops()
    if model == "ddpm_cifar10":  # 6.2 G multiply-adds per 32x32 image, the figure usually quoted for it
        assert 6.1e9 < flops / 2 < 6.3e9


def _trained(compose_cfg, tmp_path, extra):
    trainer = Trainer(compose_cfg("train", TRAIN + extra), tmp_path)
    losses = [trainer.train_step() for _ in range(3)]
    return trainer, torch.stack(losses)


def test_trainer_switches_keep_the_run(compose_cfg, tmp_path):
    """foreach EMA vs one lerp per tensor, channels_last, math attention: the same run."""
    ref, ref_loss = _trained(compose_cfg, tmp_path / "a", [])
    extra = ["runtime.ema_foreach=false", "runtime.channels_last=true", "runtime.attention=math"]
    other, loss = _trained(compose_cfg, tmp_path / "b", extra)
    assert torch.allclose(loss, ref_loss, atol=1e-5)
    for (name, p), q in zip(ref.ema.state_dict().items(), other.ema.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-5), name
    assert not torch.equal(ref.ema.conv_in.weight, ref.net.conv_in.weight)  # the EMA lags: a real average was taken


@pytest.mark.parametrize(
    "override,needle",
    [
        ("runtime.compile=maybe", "runtime.compile='maybe'"),
        ("runtime.attention=flash", "runtime.attention='flash'"),
        ("runtime.compile_mode=fast", "runtime.compile_mode='fast'"),
        ("runtime.precision=fp16", "runtime.precision='fp16'"),
    ],
)
def test_bad_switches_are_one_clear_error(compose_cfg, tmp_path, override, needle):
    with pytest.raises(UserError, match=needle):
        Trainer(compose_cfg("train", TRAIN + [override]), tmp_path)


def test_switch_values():
    assert switch("k", "auto", True) and not switch("k", "auto", False)
    assert switch("k", True, False) and not switch("k", False, True)
    with pytest.raises(UserError, match="k='yes'"):
        switch("k", "yes", True)


def test_fixed_shape_padding_changes_no_image(compose_cfg):
    """A compiled sampler pads the short last batch; the images drawn must be those of the unpadded run."""
    torch.manual_seed(0)
    net = build_network(TINY_UNET).eval()
    sched = make_schedule("linear", T=100)

    def den(x, t, y=None):
        with torch.no_grad():
            return net(x, t)

    plan = plan_sampler(to_dict(compose_cfg("sample", ["sampler.eta=1.0"]).sampler), 3, sched, clip_default=True)
    kw = dict(shape=(3, 8, 8), seed=7, indices=list(range(5)), device=torch.device("cpu"), batch_size=4, progress=False)
    a = generate(den, plan, **kw).images
    b = generate(den, plan, **kw, fixed_shape=True).images
    c = generate(den, plan, **{**kw, "batch_size": 5}).images
    assert a.shape == b.shape == (5, 3, 8, 8)
    # Equal up to float rounding (kernels differ with the batch size); a misassigned noise stream would move pixels by O(1).
    assert (a - b).abs().max() < 1e-4 and (a - c).abs().max() < 1e-4
