"""Every config value is checked before work starts, in process through the real CLI (as test_bad_input.py): the
model, dataset and schedule keys a user types, and those of a checkpoint's metadata (user input too: crafted
files with a valid hash), each refused with one line naming the key as the user typed it (or the file and its
key), exit code 2, nothing left behind and nothing large allocated."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from diffuse import nets
from diffuse.checkpoint import load_checkpoint, save_checkpoint
from diffuse.cli import app
from tests.conftest import TINY_TRAIN
from tests.helpers import rewrite

TINY = TINY_TRAIN
ORACLE = ["model=oracle", "dataset=gmm", "steps=3"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_run):

    d = tmp_path_factory.mktemp("checks")
    shutil.copytree(tiny_run, d / "trained")
    ckpt = d / "trained" / "checkpoints" / "last.safetensors"

    def upd(part, **kw):
        return lambda c: c[part].update(kw)

    rewrite(ckpt, d / "nohash.safetensors", drop="diffuse.sha256")
    rewrite(ckpt, d / "old.safetensors", old_format=True)
    rewrite(ckpt, d / "ch1e6.safetensors", config=upd("model", ch=10**6))
    rewrite(ckpt, d / "huge.safetensors", config=upd("model", ch=4096, ch_mult=[1, 2, 4]))  # each key in bounds
    rewrite(ckpt, d / "wider.safetensors", config=upd("model", ch=32))
    rewrite(ckpt, d / "T1e9.safetensors", config=upd("schedule", T=10**9))
    rewrite(ckpt, d / "res.safetensors", config=upd("model", resolution=12, ch_mult=[1, 2, 2, 2]))
    rewrite(ckpt, d / "pred.safetensors", config=upd("objective", prediction="noise"))
    # A metadata edit after the file was written: the hash no longer fits.
    with safe_open(str(ckpt), "pt") as f:
        m, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(m["diffuse.config"])
    cfg["objective"]["prediction"] = "x0"
    save_file(tensors, str(d / "edited.safetensors"), metadata={**m, "diffuse.config": json.dumps(cfg)})
    (d / "empty_run").mkdir()
    # Damaged weights under a valid hash (saved as diffuse saves): NaN, infinite, not floating point.
    for name, part, damage in (
        ("nan", "ema", lambda t: torch.full_like(t, float("nan"))),
        ("inf", "model", lambda t: t.flatten().index_fill(0, torch.tensor([0]), float("inf")).view_as(t)),
        ("int", "ema", lambda t: t.to(torch.int64)),
    ):
        ck = load_checkpoint(ckpt)
        tensors = getattr(ck, part)
        first = next(iter(tensors))
        tensors[first] = damage(tensors[first])
        save_checkpoint(d / f"{name}.safetensors", ck)
    # Resume state a user or another program may have edited: a negative step, a generator state of another size.
    rewrite(ckpt, d / "step.safetensors", meta=lambda m: m.update({"diffuse.step": "-5"}))
    ck = load_checkpoint(ckpt)
    ck.rng["data"] = ck.rng["data"][:10].clone()
    save_checkpoint(d / "rng.safetensors", ck)
    return d, ckpt


def _invoke(args, cwd, monkeypatch):
    monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, args, catch_exceptions=False)


def _fmt(args, d, ckpt):
    return [a.format(d=d, ckpt=ckpt) for a in args]


# (command line, what the one line must contain, what it must not). Each costs three Hydra compositions, so the
# CLI table holds the cases and one of each kind; KEY_CASES below holds the rest of the keys.
CASES = [
    (["sample", "ckpt={d}/nan.safetensors", "n=2", "steps=2"], ["{d}/nan.safetensors", "tensor ema.", "NaN"], []),
    (
        ["sample", "ckpt={d}/inf.safetensors", "use_ema=false", "n=2", "steps=2"],
        ["{d}/inf.safetensors", "tensor model.", "infinite"],
        [],
    ),
    (["eval", "ckpt={d}/int.safetensors", "n=2", "steps=2"], ["tensor ema.", "is int64", "floating point"], []),
    (["train", "resume={d}/step.safetensors"], ["step.safetensors", "diffuse.step=-5 is not allowed"], []),
    (["train", "resume={d}/rng.safetensors"], ["rng.data is not a generator state", "uint8, 10 values"], []),
    (["train", "model.ch=0"], ["model.ch=0"], []),
    (["train", "model.num_classes=2.5"], ["model.num_classes=2.5", "integer"], ["does not fit"]),
    (["train", "model.num_classes=-1"], ["model.num_classes=-1", "integer"], ["does not fit"]),
    (
        ["train", "dataset.resolution=12", "model.ch_mult=[1,2,2,2]"],
        ["dataset.resolution=12", "model.ch_mult=[1, 2, 2, 2]", "multiple of 8"],
        [],
    ),
    (["train", "model=dit_s", "model.patch_size=3"], ["model.patch_size=3", "dataset.resolution=8"], []),
    (["train", "schedule.T=1"], ["schedule.T=1 "], ["steps="]),
    (["train", "dataset.size=1000000000"], ["dataset.size=1000000000"], []),
    (["train", "resume={d}/empty_run"], ["resume={d}/empty_run but", "holds no checkpoint"], ["resume=true"]),
    (["train", "resume={d}/nosuch.safetensors"], ["resume='{d}/nosuch.safetensors' does not exist"], ["ckpt="]),
    (["train", "resume={d}/nohash.safetensors"], ["nohash.safetensors carries no content hash", "verify=false"], []),
    (["train", "verify=maybe"], ["verify='maybe'"], []),
    (["sample", "ckpt={ckpt}", "n=1000000000000"], ["n=1000000000000"], []),
    (["eval", "--metric", "fid", *ORACLE, "n=1000000000000"], ["n=1000000000000"], []),
    # checkpoints: verified as a whole, and their config checked before anything is allocated
    (["sample", "ckpt={d}/nohash.safetensors"], ["nohash.safetensors carries no content hash", "verify=false"], []),
    (["sample", "ckpt={d}/edited.safetensors"], ["edited.safetensors", "content hash mismatch"], []),
    (["sample", "ckpt={d}/edited.safetensors", "verify=false"], ["edited.safetensors", "content hash mismatch"], []),
    (["sample", "ckpt={d}/ch1e6.safetensors"], ["ch1e6.safetensors: model.ch=1000000"], []),
    (["sample", "ckpt={d}/huge.safetensors"], ["huge.safetensors", "parameters", "more than"], []),
    (["sample", "ckpt={d}/wider.safetensors"], ["wider.safetensors", "weights do not fit", "parameters"], []),
    (["sample", "ckpt={d}/T1e9.safetensors"], ["T1e9.safetensors: schedule.T=1000000000"], []),
    (["sample", "ckpt={d}/res.safetensors"], ["res.safetensors: model.resolution=12", "model.ch_mult"], []),
    (["sample", "ckpt={d}/pred.safetensors"], ["pred.safetensors: objective.prediction='noise'"], []),
    (["eval", "--metric", "fid", "ckpt={d}/nohash.safetensors", "n=2"], ["carries no content hash"], []),
    (["tune-schedule", "ckpt={d}/ch1e6.safetensors"], ["model.ch=1000000"], []),
]


@pytest.mark.parametrize(
    "args,needles,absent", CASES, ids=[" ".join(c[0][:4])[:60] + f" [{i}]" for i, c in enumerate(CASES)]
)
def test_bad_value_is_one_line_naming_the_key(args, needles, absent, files, tmp_path, monkeypatch):
    d, ckpt = files
    raw, args = args, _fmt(args, d, ckpt)
    if args[0] == "train":  # the tiny U-Net's keys, unless another architecture is chosen
        tiny = [a for a in TINY if not a.startswith("model.")] if any(a.startswith("model=") for a in args) else TINY
        args = ["train", *tiny, *args[1:]]
    built = []
    real = nets._construct

    def spy(cls, cfg, prefix):  # every network built before the refusal must have been a meta (shape-only) one
        built.append(torch.empty(()).device.type)
        return real(cls, cfg, prefix)

    monkeypatch.setattr(nets, "_construct", spy)
    run = tmp_path / "run"
    r = _invoke([*args, f"hydra.run.dir={run}"], tmp_path, monkeypatch)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for needle in _fmt(needles, d, ckpt):
        assert needle in lines[0], lines[0]
    for word in _fmt(absent, d, ckpt):
        assert word not in lines[0], lines[0]
    assert "Traceback" not in r.stdout + r.stderr
    assert not run.exists() or not any(run.rglob("*")), sorted(run.rglob("*"))
    if any(a.startswith("ckpt={d}/") for a in raw):  # a crafted file: refused before a real network exists
        assert all(dev == "meta" for dev in built), built


def test_verify_false_loads_a_file_without_hash_and_says_so(files, tmp_path, monkeypatch):
    d, _ = files
    run = tmp_path / "run"
    r = _invoke(
        ["sample", f"ckpt={d / 'nohash.safetensors'}", "verify=false", "n=2", "steps=2", f"hydra.run.dir={run}"],
        tmp_path,
        monkeypatch,
    )
    assert r.exit_code == 0, (r.stdout, r.stderr)
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: ")]
    assert (
        len(warnings) == 1
        and "nohash.safetensors" in warnings[0]
        and "unverified" in warnings[0]
        and "verify=false" in warnings[0]
    )
    assert json.loads((run / "sample.json").read_text())["ckpt_verified"] == "none"
    # A verified file says nothing and records nothing of the kind.
    r = _invoke(
        ["sample", f"ckpt={files[1]}", "n=2", "steps=2", f"hydra.run.dir={tmp_path / 'ok'}"], tmp_path, monkeypatch
    )
    assert r.exit_code == 0 and "warning" not in r.stderr
    assert "ckpt_verified" not in json.loads((tmp_path / "ok" / "sample.json").read_text())


def test_resume_from_a_file_without_hash_needs_verify_false(files, tmp_path, monkeypatch):
    d, _ = files
    run = tmp_path / "run"
    r = _invoke(
        [
            "train",
            *TINY,
            "trainer.steps=2",
            f"resume={d / 'nohash.safetensors'}",
            "verify=false",
            f"hydra.run.dir={run}",
        ],
        tmp_path,
        monkeypatch,
    )
    assert r.exit_code == 0, (r.stdout, r.stderr)
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1 and "nohash.safetensors" in warnings[0] and "unverified" in warnings[0]
    assert "resumed from" in r.stdout and "at step 1" in r.stdout


def test_a_format_1_checkpoint_loads_with_one_warning(files, tmp_path, monkeypatch):
    d, _ = files
    run = tmp_path / "run"
    r = _invoke(
        ["sample", f"ckpt={d / 'old.safetensors'}", "n=2", "steps=2", f"hydra.run.dir={run}"], tmp_path, monkeypatch
    )
    assert r.exit_code == 0, (r.stdout, r.stderr)
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: ")]
    assert (
        len(warnings) == 1 and "old.safetensors" in warnings[0] and "older" in warnings[0] and "metadata" in warnings[0]
    )
    assert json.loads((run / "sample.json").read_text())["ckpt_verified"] == "tensors"


UNET = {
    "arch": "unet",
    "resolution": 8,
    "in_channels": 3,
    "ch": 16,
    "ch_mult": [1, 2],
    "attn_resolutions": [4],
    "num_res_blocks": 1,
    "heads": 1,
    "dropout": 0.0,
    "num_classes": None,
}
DIT = {"arch": "dit", "resolution": 8, "in_channels": 3, "patch_size": 2, "hidden_size": 32, "depth": 1, "heads": 2}
SHAPES = {"name": "shapes", "resolution": 8, "channels": 3, "num_classes": 4, "size": 8, "seed": 0, "flip": False}
GMM = {"name": "gmm", "path": None, "resolution": 4, "channels": 1, "size": 8, "seed": 0}

# The rest of the model, dataset and schedule keys, each through the function the commands call with it.
KEY_CASES = [
    ("model", {**UNET, "ch": -4}, "model.ch=-4"),
    ("model", {**UNET, "ch": 2}, "model.ch=2"),  # the time embedding would be NaN
    ("model", {**UNET, "ch": 10**6}, "model.ch=1000000"),
    ("model", {**UNET, "ch": 4096, "ch_mult": [1, 2, 4]}, "parameters"),
    ("model", {**UNET, "ch": "16"}, "model.ch='16'"),
    ("model", {**UNET, "ch_mult": []}, "model.ch_mult=[]"),
    ("model", {**UNET, "ch_mult": [1, 0]}, "model.ch_mult=[1, 0]"),
    ("model", {**UNET, "ch_mult": [1, 2048]}, "model.ch_mult=[1, 2048]"),
    ("model", {**UNET, "ch_mult": [1] * 11}, "model.ch_mult="),
    ("model", {**UNET, "num_res_blocks": -1}, "model.num_res_blocks=-1"),
    ("model", {**UNET, "attn_resolutions": 4}, "model.attn_resolutions=4"),
    ("model", {**UNET, "heads": 3}, "model.heads=3"),
    ("model", {**UNET, "heads": 0}, "model.heads=0"),
    ("model", {**UNET, "dropout": 1.0}, "model.dropout=1.0"),
    ("model", {**UNET, "dropout": float("nan")}, "model.dropout=nan"),
    ("model", {**UNET, "groups": 0}, "model.groups=0"),
    ("model", {**UNET, "downsample_pad": "left"}, "model.downsample_pad='left'"),
    ("model", {**UNET, "num_classes": True}, "model.num_classes=True"),
    ("model", {**UNET, "num_classes": 10**7}, "model.num_classes=10000000"),
    ("model", {**UNET, "resolution": 10**6}, "dataset.resolution=1000000"),
    ("model", {**UNET, "resolution": 7}, "dataset.resolution=7"),
    ("model", {**UNET, "in_channels": 0}, "model.in_channels=0"),
    ("model", {**UNET, "out_channels": 10**4}, "model.out_channels=10000"),
    ("model", {**UNET, "arch": "resnet"}, "model.arch='resnet'"),
    ("model", {**UNET, "_target_": "os.system"}, "model._target_"),
    ("model", {**UNET, "evil": 1}, "model.evil"),
    ("model", {**DIT, "patch_size": 0}, "model.patch_size=0"),
    ("model", {**DIT, "patch_size": 16}, "model.patch_size=16"),
    ("model", {**DIT, "hidden_size": 30}, "model.hidden_size=30"),
    ("model", {**DIT, "hidden_size": 36, "heads": 8}, "model.hidden_size=36"),
    ("model", {**DIT, "depth": -1}, "model.depth=-1"),
    ("model", {**DIT, "depth": 10**4}, "model.depth=10000"),
    ("model", {**DIT, "mlp_ratio": 0}, "model.mlp_ratio=0"),
    ("model", {**DIT, "freq_dim": 2}, "model.freq_dim=2"),
    ("model", {**DIT, "hidden_size": 16384, "depth": 64}, "parameters"),
    ("dataset", {**SHAPES, "resolution": 10**5}, "dataset.resolution=100000"),
    ("dataset", {**SHAPES, "resolution": 0}, "dataset.resolution=0"),
    ("dataset", {**SHAPES, "size": 10**9}, "dataset.size=1000000000"),
    ("dataset", {**SHAPES, "size": 50_000_000, "resolution": 128}, "GiB"),
    ("dataset", {**SHAPES, "num_classes": 9}, "dataset.num_classes=9"),
    ("dataset", {**SHAPES, "num_classes": "4"}, "dataset.num_classes='4'"),
    ("dataset", {**SHAPES, "channels": 1}, "dataset.channels=1"),
    ("dataset", {**SHAPES, "seed": 1.5}, "dataset.seed=1.5"),
    ("dataset", {**SHAPES, "flip": "maybe"}, "dataset.flip='maybe'"),
    ("dataset", {**GMM, "channels": 0}, "dataset.channels=0"),
    ("dataset", {**GMM, "channels": 10**4}, "dataset.channels=10000"),
    ("dataset", {**GMM, "resolution": 10**5}, "dataset.resolution=100000"),
    ("dataset", {**GMM, "resolution": 64, "size": 10**8}, "dataset.size=100000000"),
    ("dataset", {**GMM, "seed": "x"}, "dataset.seed='x'"),
    ("dataset", {"name": "cifar10", "channels": 1, "num_classes": 10}, "dataset.channels=1"),
    ("dataset", {"name": "mnist", "channels": 1, "num_classes": 7}, "dataset.num_classes=7"),
    ("dataset", {"name": "folder", "channels": 4, "path": "x"}, "dataset.channels=4"),
    ("schedule", {"kind": "linear", "T": 1}, "schedule.T=1 "),
    ("schedule", {"kind": "linear", "T": 0}, "schedule.T=0"),
    ("schedule", {"kind": "cosine", "T": 10**9}, "schedule.T=1000000000"),
    ("schedule", {"kind": "linear", "T": 100.0}, "schedule.T=100.0"),
    ("schedule", {"kind": "linear", "T": True}, "schedule.T=True"),
    ("schedule", [1, 2], "not a mapping"),
]


@pytest.mark.parametrize("group,cfg,needle", KEY_CASES, ids=[f"{g} {n.strip()}" for g, _, n in KEY_CASES])
def test_every_key_is_checked_before_anything_is_built(group, cfg, needle, monkeypatch):
    from diffuse.data import build_dataset
    from diffuse.errors import UserError
    from diffuse.pipeline.model import schedule_from_config

    built = []
    real = nets._construct
    monkeypatch.setattr(nets, "_construct", lambda *a: built.append(torch.empty(()).device.type) or real(*a))
    call = {"model": nets.build_network, "dataset": build_dataset, "schedule": schedule_from_config}[group]
    with pytest.raises(UserError) as e:
        call(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert all(dev == "meta" for dev in built), built


def test_the_limits_let_the_shipped_networks_through(compose_cfg):
    """Every model config in conf/ at its datasets' resolutions passes the checks (sized on the meta device)."""
    from diffuse.pipeline.config import to_dict

    for name, res in (("tiny", 16), ("small", 32), ("base", 32), ("ddpm_cifar10", 32), ("dit_s", 32), ("dit_b", 32)):
        cfg = {**to_dict(compose_cfg("train", [f"model={name}"]).model), "resolution": res, "in_channels": 3}
        nets.check_model_config({k: v for k, v in cfg.items() if k not in ("resolution", "in_channels")})
        shapes = nets.network_shapes(cfg)
        assert 1e6 < sum(s.numel() for s in shapes.values()) < nets.MAX_PARAMETERS
