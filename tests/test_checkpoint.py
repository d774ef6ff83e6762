import json

import pytest
import torch
from safetensors.torch import save_file

from diffuse.checkpoint import Checkpoint, load_checkpoint, resolve_ckpt_path, save_checkpoint
from diffuse.errors import UserError
from diffuse.nets.unet import UNet


def _ckpt():
    torch.manual_seed(0)
    net = UNet(resolution=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), groups=8)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(2, 3, 8, 8), torch.tensor([1, 2])).pow(2).mean().backward()
    opt.step()
    cfg = {"model": {"arch": "unet", "ch": 16}, "schedule": {"kind": "linear", "T": 1000}}
    rng = {"data": torch.Generator().manual_seed(3).get_state()}
    return Checkpoint(config=cfg, step=7, model=net.state_dict(), ema=net.state_dict(), optim=opt.state_dict(), rng=rng, extra={"skipped": 2})


def test_round_trip_is_bit_exact(tmp_path):
    ck = _ckpt()
    path = save_checkpoint(tmp_path / "c.safetensors", ck)
    back = load_checkpoint(path)
    assert back.config == ck.config and back.step == 7 and back.extra == {"skipped": 2}
    for k, v in ck.model.items():
        assert torch.equal(back.model[k], v) and back.model[k].dtype == v.dtype
    assert torch.equal(back.rng["data"], ck.rng["data"])
    for idx, state in ck.optim["state"].items():
        for key, val in state.items():
            assert torch.equal(back.optim["state"][idx][key], val)
    assert json.dumps(back.optim["param_groups"]) == json.dumps(json.loads(json.dumps(ck.optim["param_groups"])))
    # the optimizer state loads back into a fresh optimizer
    net = UNet(resolution=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), groups=8)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    opt.load_state_dict(back.optim)
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was renamed away


def test_corrupted_and_truncated_files_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", _ckpt())
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupted"):
        load_checkpoint(bad)
    short = tmp_path / "short.safetensors"
    short.write_bytes(path.read_bytes()[: len(data) // 2])
    with pytest.raises(UserError, match="truncated|corrupted|readable"):
        load_checkpoint(short)


def test_foreign_files_are_refused(tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(UserError, match="not a diffuse checkpoint"):
        load_checkpoint(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_text("hello")
    with pytest.raises(UserError):
        load_checkpoint(junk)
    with pytest.raises(UserError, match="does not exist"):
        resolve_ckpt_path(tmp_path / "nope.safetensors")
    with pytest.raises(UserError, match="without checkpoints"):
        resolve_ckpt_path(tmp_path)
