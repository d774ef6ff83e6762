"""The plain-torch DINOv2 held to Hugging Face transformers' Dinov2Model on random weights, its weight files
(the hub's safetensors names, the official names; never a pickle) and its preprocessing."""

import pytest
import torch
from safetensors.torch import save_file

from diffuse.errors import UserError
from diffuse.metrics import dinov2
from diffuse.metrics.dinov2 import DINOv2Features, build, find_weights, load_dinov2, preprocess

pytestmark = pytest.mark.usefixtures("one_thread")

# The hub file's names for transformers 5's (checkpoints on the hub predate the q/k/v_proj renaming).
HUB_NAMES = {
    "attention.q_proj": "attention.attention.query",
    "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value",
    "attention.o_proj": "attention.output.dense",
}


def hf_model(layers=2, image_size=70):
    transformers = pytest.importorskip("transformers")
    # ViT-S/14's width and heads (the arch is read from them), two blocks, a 5 x 5 position grid.
    config = transformers.Dinov2Config(
        hidden_size=384,
        num_hidden_layers=layers,
        num_attention_heads=6,
        image_size=image_size,
        patch_size=14,
        layerscale_value=0.7,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.Dinov2Model(config).eval()
    with torch.no_grad():  # random layer scales and biases too: every tensor's mapping is exercised
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def hub_state(model):
    sd = {}
    for k, v in model.state_dict().items():
        for new, old in HUB_NAMES.items():
            k = k.replace(new, old)
        sd[k] = v.contiguous()
    return sd


def test_matches_transformers_on_random_weights():
    theirs = hf_model()
    ours = build(hub_state(theirs), "vits14", interpolate_offset=0.0)
    g = torch.Generator().manual_seed(1)
    for size in (70, 112):  # the native 5 x 5 grid, and 8 x 8 (position embeddings resized)
        x = torch.randn(3, 3, size, size, generator=g)
        with torch.no_grad():
            a, b = ours(x), theirs(pixel_values=x).pooler_output
        assert b.abs().max() > 0.1
        assert (a - b).abs().max() < 1e-4 * b.abs().max(), (size, (a - b).abs().max())
    # The official position-embedding resize (offset 0.1) samples the grid slightly differently, not wildly.
    official = build(hub_state(theirs), "vits14")
    with torch.no_grad():
        c, d = official(x), ours(x)
    assert 0 < (c - d).abs().max() < 0.1 * d.abs().max()


def test_weight_files_load_from_hub_or_official_names_and_are_checked(tmp_path, monkeypatch):
    theirs = hf_model(layers=1)
    save_file(hub_state(theirs), str(tmp_path / "hub.safetensors"))
    net, sha = load_dinov2(tmp_path / "hub.safetensors", "vits14")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "official.safetensors"))
    again, _ = load_dinov2(tmp_path / "official.safetensors", "vits14", None)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    assert len(sha) == 64
    with pytest.raises(UserError, match="SHA-256 .* is not metrics.dinov2_sha256"):
        load_dinov2(tmp_path / "hub.safetensors", "vits14", "0" * 64)
    with pytest.raises(UserError, match="not DINOv2 vitb14 weights"):
        load_dinov2(tmp_path / "hub.safetensors", "vitb14")
    (tmp_path / "w.pth").write_bytes(b"\x80\x04not read")
    with pytest.raises(UserError, match="pickled checkpoints are refused"):
        find_weights("vits14", str(tmp_path / "w.pth"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("DIFFUSE_OFFLINE", "1")
    with pytest.raises(
        UserError,
        match=r"not available offline: download https://huggingface.co/facebook/dinov2-small/resolve/main/model.safetensors "
        r"and put it at .*dinov2_vits14.safetensors",
    ):
        find_weights("vits14", None)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "dinov2_vits14.safetensors").write_bytes(
        (tmp_path / "hub.safetensors").read_bytes()
    )
    assert find_weights("vits14", None) == tmp_path / "hub" / "checkpoints" / "dinov2_vits14.safetensors"


def test_preprocessing_and_extractor():
    grey = torch.full((2, 1, 224, 224), 51, dtype=torch.uint8)  # 0.2 in every channel, no resize at 224
    x = preprocess(grey)
    want = (0.2 - torch.tensor(dinov2.MEAN)) / torch.tensor(dinov2.STD)
    assert x.shape == (2, 3, 224, 224) and torch.allclose(x[0, :, 5, 7], want, atol=1e-6)
    # A constant image stays constant through the (antialiased bicubic) resize.
    assert torch.allclose(preprocess(grey[:, :, :16, :16]), x, atol=1e-5)
    net = build(hub_state(hf_model(layers=1)), "vits14")
    fx = DINOv2Features(net, "ab" * 32, torch.device("cpu"), size=70)
    out = fx(torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8))["pool"]
    assert out.shape == (3, 384) and fx.dim == 384 and torch.isfinite(out).all()
    with pytest.raises(UserError, match="1- or 3-channel"):
        fx.check_shape(4, 16)


def test_eval_scores_in_dinov2_space_with_a_pinned_file(tmp_path):
    import hashlib
    from pathlib import Path

    from diffuse.tasks import evaluate
    from tests.conftest import compose

    torch.manual_seed(0)
    net = dinov2.DINOv2(384, 1, 6, grid=4)  # ViT-S/14's width, one block, a small position grid
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    sha = hashlib.sha256((tmp_path / "w.safetensors").read_bytes()).hexdigest()
    base = [
        "metric=[fd,pr]",
        "model=oracle",
        "dataset=gmm",
        "dataset.size=20",
        "n=12",
        "steps=2",
        "metrics.features=dinov2",
        "metrics.dinov2_arch=vits14",
        f"metrics.dinov2_weights={tmp_path / 'w.safetensors'}",
        f"metrics.cache_dir={tmp_path / 'c'}",
    ]
    res = evaluate.run(compose("eval", [*base, f"metrics.dinov2_sha256={sha}"]), Path(tmp_path / "run"))
    assert res["features"] == "dinov2" and res["weights_sha256"] == sha
    assert res["metrics"]["fd_dinov2"] > 0 and 0 <= res["metrics"]["precision"] <= 1
    with pytest.raises(UserError, match="is not metrics.dinov2_sha256"):
        evaluate.run(compose("eval", [*base, f"metrics.dinov2_sha256={'ab' * 32}"]), Path(tmp_path / "run2"))
    with pytest.raises(
        UserError, match="metrics.dinov2_arch='vitg14' is not allowed: choose one of vits14, vitb14, vitl14"
    ):
        evaluate.run(compose("eval", [*base, "metrics.dinov2_arch=vitg14"]), Path(tmp_path / "run3"))
