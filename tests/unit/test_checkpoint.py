import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from diffuse.checkpoint import Checkpoint, load_checkpoint, resolve_ckpt_path, save_checkpoint
from diffuse.errors import UserError
from diffuse.nets.unet import UNet
from tests.helpers import ROOT


def _ckpt():
    torch.manual_seed(0)
    net = UNet(resolution=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), groups=8)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(2, 3, 8, 8), torch.tensor([1, 2])).pow(2).mean().backward()
    opt.step()
    cfg = {"model": {"arch": "unet", "ch": 16}, "schedule": {"kind": "linear", "T": 1000}}
    rng = {"data": torch.Generator().manual_seed(3).get_state()}
    return Checkpoint(
        config=cfg,
        step=7,
        model=net.state_dict(),
        ema=net.state_dict(),
        optim=opt.state_dict(),
        rng=rng,
        extra={"skipped": 2},
    )


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


def _raw(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize(
    "key", ["diffuse.config", "diffuse.step", "diffuse.optim", "diffuse.extra", "diffuse.tuned", "diffuse.format"]
)
def test_the_hash_covers_every_metadata_entry(tmp_path, key):
    """Editing any metadata entry (prediction type, schedule, step...), adding one or deleting one breaks the hash."""
    path = save_checkpoint(tmp_path / "c.safetensors", _ckpt())
    meta, tensors = _raw(path)
    edits = {
        "changed": {**meta, key: meta[key].replace("1", "2") if "1" in meta[key] else meta[key] + " "},
        "deleted": {k: v for k, v in meta.items() if k != key},
    }
    for what, m in edits.items():
        save_file(tensors, str(tmp_path / f"{what}.safetensors"), metadata=m)
        refusal = (
            "not a diffuse checkpoint" if (what, key) == ("deleted", "diffuse.config") else "content hash mismatch"
        )
        with pytest.raises(UserError, match=refusal):
            load_checkpoint(tmp_path / f"{what}.safetensors")
        with pytest.raises(UserError, match=refusal):  # verify=False never lets a damaged file in
            load_checkpoint(tmp_path / f"{what}.safetensors", verify=False)
    save_file(tensors, str(tmp_path / "added.safetensors"), metadata={**meta, "diffuse.note": "x"})
    with pytest.raises(UserError, match="content hash mismatch"):
        load_checkpoint(tmp_path / "added.safetensors")


def test_the_hash_covers_the_tensors_and_is_unambiguous(tmp_path):
    from diffuse.checkpoint import checkpoint_hash

    t = {"a": torch.arange(4, dtype=torch.float32)}
    base = checkpoint_hash(t, {"k": "v"})
    assert checkpoint_hash({"a": t["a"].clone()}, {"k": "v"}) == base
    assert checkpoint_hash({"a": t["a"] + 1}, {"k": "v"}) != base
    assert checkpoint_hash({"a": t["a"].reshape(2, 2)}, {"k": "v"}) != base
    assert checkpoint_hash({"a": t["a"].view(torch.int32)}, {"k": "v"}) != base  # same bytes, other dtype
    assert checkpoint_hash({"b": t["a"]}, {"k": "v"}) != base
    # A character moved across a field boundary is another content.
    assert checkpoint_hash({}, {"ab": "c"}) != checkpoint_hash({}, {"a": "bc"})
    assert checkpoint_hash({}, {"k": "v", "diffuse.sha256": "anything"}) == checkpoint_hash({}, {"k": "v"})


def test_a_file_without_hash_loads_only_with_verify_false(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", _ckpt())
    meta, tensors = _raw(path)
    meta.pop("diffuse.sha256")
    save_file(tensors, str(tmp_path / "n.safetensors"), metadata=meta)
    with pytest.raises(UserError, match=r"n.safetensors carries no content hash .* verify=false"):
        load_checkpoint(tmp_path / "n.safetensors")
    said = []
    back = load_checkpoint(tmp_path / "n.safetensors", verify=False, report=said.append)
    assert back.verified == "none" and back.step == 7
    assert len(said) == 1 and "n.safetensors" in said[0] and "unverified" in said[0]
    ok = []
    assert load_checkpoint(path, verify=False, report=ok.append).verified == "all" and not ok


def test_format_1_files_load_with_their_tensors_verified(tmp_path):
    """Written before the hash covered the metadata: the tensors still verify, and a warning says the metadata
    does not. A file that says it is format 2 is never held to that weaker rule."""
    from diffuse.checkpoint import content_hash

    path = save_checkpoint(tmp_path / "c.safetensors", _ckpt())
    meta, tensors = _raw(path)
    old = {**meta, "diffuse.format": "1", "diffuse.sha256": content_hash(tensors)}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=old)
    said = []
    back = load_checkpoint(tmp_path / "old.safetensors", report=said.append)
    assert back.verified == "tensors" and back.config == _ckpt().config
    assert len(said) == 1 and "old.safetensors" in said[0] and "older" in said[0] and "metadata" in said[0]
    flipped = dict(tensors)
    flipped["model.conv_in.bias"] = flipped["model.conv_in.bias"] + 1
    save_file(flipped, str(tmp_path / "old_bad.safetensors"), metadata=old)
    with pytest.raises(UserError, match="content hash mismatch"):
        load_checkpoint(tmp_path / "old_bad.safetensors")
    save_file(tensors, str(tmp_path / "downgraded.safetensors"), metadata={**old, "diffuse.format": "2"})
    with pytest.raises(UserError, match="content hash mismatch"):
        load_checkpoint(tmp_path / "downgraded.safetensors")


def test_weights_that_do_not_fit_are_refused_before_the_network_is_allocated(tmp_path, monkeypatch):
    from diffuse import nets
    from diffuse.pipeline.model import network_from_checkpoint

    ck = _ckpt()
    ck.config = {
        "model": {
            "arch": "unet",
            "resolution": 8,
            "ch": 16,
            "ch_mult": [1, 2],
            "num_res_blocks": 1,
            "attn_resolutions": [4],
            "groups": 8,
        },
        "schedule": {"kind": "linear", "T": 1000},
    }
    assert network_from_checkpoint(ck, where="c.safetensors").net.ch == 16
    built = []
    real = nets._construct
    monkeypatch.setattr(nets, "_construct", lambda *a: built.append(torch.empty(()).device.type) or real(*a))
    ck.config["model"]["ch"] = 32
    with pytest.raises(
        UserError,
        match=r"c.safetensors: the weights do not fit .* conv_in.bias is \(16,\) where the config asks for \(32,\)",
    ):
        network_from_checkpoint(ck, where="c.safetensors")
    assert built == ["meta"]


def _all_files(*roots):
    return [p for root in roots for p in root.rglob("*")]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_follow_the_umask(umask, tmp_path, monkeypatch, one_thread):
    """Checkpoints, PNGs, JSON, npz, YAML and metrics.jsonl of train and sample (through the CLI) get the mode a
    plain open() gives under the user's umask (0644 or 0600), their folders likewise (0755 or 0700)."""
    from typer.testing import CliRunner

    from diffuse.cli import app

    tiny = [
        "dataset.size=16",
        "dataset.resolution=8",
        "model.ch=16",
        "model.ch_mult=[1,2]",
        "model.attn_resolutions=[4]",
        "trainer.batch_size=4",
        "trainer.sample_n=4",
        "trainer.sample_steps=2",
        "trainer.steps=2",
        "trainer.log_every=1",
    ]
    monkeypatch.chdir(tmp_path)
    old = os.umask(umask)
    try:
        r = CliRunner().invoke(app, ["train", *tiny, f"hydra.run.dir={tmp_path / 'train'}"], catch_exceptions=False)
        assert r.exit_code == 0, (r.stdout, r.stderr)
        r = CliRunner().invoke(
            app,
            [
                "sample",
                f"ckpt={tmp_path / 'train'}",
                "n=2",
                "steps=2",
                "save_npz=true",
                f"hydra.run.dir={tmp_path / 'sample'}",
            ],
            catch_exceptions=False,
        )
        assert r.exit_code == 0, (r.stdout, r.stderr)
    finally:
        os.umask(old)
    found = _all_files(tmp_path / "train", tmp_path / "sample")
    assert {p.suffix for p in found if p.is_file()} >= {".safetensors", ".png", ".json", ".npz", ".yaml", ".jsonl"}
    for p in found:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode), oct(want))


def test_atomic_write_reads_the_umask_at_write_time(tmp_path):
    from diffuse.io import atomic_write

    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a.txt", lambda tmp: tmp.write_text("x"))
        save_checkpoint(tmp_path / "a.safetensors", _ckpt())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode) == 0o640


def test_complete_config_fills_what_old_and_converted_checkpoints_lack_from_the_objective_yaml():
    from omegaconf import OmegaConf

    from diffuse.checkpoint import complete_config

    conf = ROOT / "conf" / "objective"
    simple = OmegaConf.to_container(OmegaConf.load(conf / "simple.yaml"))
    edm = {**simple, **OmegaConf.to_container(OmegaConf.load(conf / "edm.yaml"))}
    edm.pop("defaults")
    # What diffuse convert records for a diffusers DDPM: the kind and the variance keys are not there.
    converted = {"model": {"arch": "unet"}, "objective": {"prediction": "eps", "weighting": "simple"}}
    done = complete_config(converted)
    assert done["objective"] == {**simple, "prediction": "eps", "weighting": "simple"}
    assert done["objective"]["kind"] == "diffusion" and done["objective"]["learn_sigma"] is False
    assert done["data"] == {"is_8bit": True} and done["model"] == converted["model"]
    assert converted["objective"] == {"prediction": "eps", "weighting": "simple"}  # the caller's dict is untouched
    # Each kind from its own file; a key that is there is kept whatever it holds (the readers' checks judge it).
    old_edm = complete_config({"objective": {"kind": "edm", "sigma_data": 0.25, "learn_sigma": "yes"}})
    assert old_edm["objective"] == {**edm, "sigma_data": 0.25, "learn_sigma": "yes"}
    assert complete_config({"objective": {"kind": "flow"}})["objective"] == {"kind": "flow"}  # unknown: refused later
    assert complete_config({"objective": [1], "data": 3}) == {"objective": [1], "data": 3}
    assert complete_config({"data": {"is_8bit": False}})["data"] == {"is_8bit": False}
