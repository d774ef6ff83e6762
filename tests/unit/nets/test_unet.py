import pytest
import torch

from diffuse.errors import UserError
from diffuse.nets import build_network
from diffuse.nets.layers import timestep_embedding
from diffuse.nets.unet import UNet


def test_ddpm_cifar10_has_the_papers_size(compose_cfg):
    cfg = compose_cfg("train", ["model=ddpm_cifar10"])
    from omegaconf import OmegaConf

    net = build_network({**OmegaConf.to_container(cfg.model), "resolution": 32, "in_channels": 3})
    n = sum(p.numel() for p in net.parameters())
    assert n == 35_746_307  # Ho et al.: 35.7M


@pytest.mark.parametrize("res,mult", [(16, (1, 2, 2)), (32, (1, 2)), (8, (1,))])
def test_unet_shapes_and_class_slot(res, mult):
    net = UNet(
        resolution=res,
        in_channels=3,
        ch=16,
        ch_mult=mult,
        num_res_blocks=1,
        attn_resolutions=(res // 2,),
        num_classes=5,
        groups=8,
    )
    x = torch.randn(3, 3, res, res)
    t = torch.tensor([0, 500, 999])
    out = net(x, t, torch.tensor([0, 4, 5]))  # 5 = the null label
    assert out.shape == x.shape
    assert net.label_emb.num_embeddings == 6
    assert torch.equal(net(x, t, None), net(x, t, torch.full((3,), 5)))


def test_timestep_embedding_is_sin_cos_of_ho_et_al():
    emb = timestep_embedding(torch.tensor([0.0, 3.0]), 8)
    assert torch.allclose(emb[0], torch.tensor([0, 0, 0, 0, 1, 1, 1, 1.0]))
    import math

    freqs = [math.exp(-math.log(10000) * i / 3) for i in range(4)]
    assert torch.allclose(emb[1, :4], torch.tensor([math.sin(3 * f) for f in freqs]), atol=1e-6)


def test_build_network_allow_list():
    with pytest.raises(UserError, match="arch"):
        build_network({"arch": "os.system"})
    with pytest.raises(UserError, match="refused"):
        build_network({"arch": "unet", "_target_": "os.system"})
    with pytest.raises(UserError, match="not an argument"):
        build_network({"arch": "unet", "evil": 1})
