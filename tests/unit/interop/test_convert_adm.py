"""diffuse convert --from improved-diffusion / guided-diffusion: a reference network with ADM's state-dict names,
written here from Nichol & Dhariwal's description (their code is not installable), random weights, saved as
safetensors, converted, and held to the reference's output within 1e-5: both layouts of attention, scale-shift
norms or not, class-conditional, learned variances, rescaled timesteps."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from diffuse.checkpoint import load_checkpoint
from diffuse.cli import app
from diffuse.pipeline.model import network_from_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def gn(c):
    return nn.GroupNorm(32 if c % 32 == 0 else math.gcd(32, c), c, eps=1e-5)


def adm_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Res(nn.Module):
    def __init__(self, c, out, emb, scale_shift):
        super().__init__()
        self.ss = scale_shift
        self.in_layers = nn.Sequential(gn(c), nn.SiLU(), nn.Conv2d(c, out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, 2 * out if scale_shift else out))
        self.out_layers = nn.Sequential(gn(out), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out, out, 3, padding=1))
        self.skip_connection = nn.Identity() if c == out else nn.Conv2d(c, out, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        e = self.emb_layers(emb)[..., None, None]
        if self.ss:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class Attn(nn.Module):
    def __init__(self, c, heads, legacy):
        super().__init__()
        self.heads, self.legacy = heads, legacy
        self.norm = gn(c)
        self.qkv = nn.Conv1d(c, 3 * c, 1)
        self.proj_out = nn.Conv1d(c, c, 1)

    def forward(self, x):
        b, c, *sp = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        d, L = c // self.heads, x.shape[-1]
        if self.legacy:
            q, k, v = qkv.reshape(b * self.heads, 3 * d, L).split(d, dim=1)
        else:
            q, k, v = (z.reshape(b * self.heads, d, L) for z in qkv.chunk(3, dim=1))
        scale = 1 / math.sqrt(math.sqrt(d))
        w = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, L)
        return (x + self.proj_out(a)).reshape(b, c, *sp)


class Down(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.op = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Up(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Seq(nn.ModuleList):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, Res) else layer(x)
        return x


class ADM(nn.Module):
    def __init__(
        self,
        cin=3,
        ch=32,
        cout=6,
        nrb=1,
        attn_ds=(2,),
        mult=(1, 2),
        heads=2,
        classes=None,
        ss=True,
        legacy=True,
        time_scale=1.0,
    ):
        super().__init__()
        emb, self.ch, self.time_scale = 4 * ch, ch, time_scale
        self.time_embed = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        if classes:
            self.label_emb = nn.Embedding(classes, emb)
        self.input_blocks = nn.ModuleList([Seq([nn.Conv2d(cin, ch, 3, padding=1)])])
        chans, cur, ds = [ch], ch, 1
        for level, m in enumerate(mult):
            for _ in range(nrb):
                layers = [Res(cur, m * ch, emb, ss)]
                cur = m * ch
                if ds in attn_ds:
                    layers.append(Attn(cur, heads(cur) if callable(heads) else heads, legacy))
                self.input_blocks.append(Seq(layers))
                chans.append(cur)
            if level != len(mult) - 1:
                self.input_blocks.append(Seq([Down(cur)]))
                chans.append(cur)
                ds *= 2
        h = heads(cur) if callable(heads) else heads
        self.middle_block = Seq([Res(cur, cur, emb, ss), Attn(cur, h, legacy), Res(cur, cur, emb, ss)])
        self.output_blocks = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(nrb + 1):
                layers = [Res(cur + chans.pop(), m * ch, emb, ss)]
                cur = m * ch
                if ds in attn_ds:
                    layers.append(Attn(cur, heads(cur) if callable(heads) else heads, legacy))
                if level and i == nrb:
                    layers.append(Up(cur))
                    ds //= 2
                self.output_blocks.append(Seq(layers))
        self.out = nn.Sequential(gn(cur), nn.SiLU(), nn.Conv2d(cur, cout, 3, padding=1))

    def forward(self, x, t, y=None):
        emb = self.time_embed(adm_embedding(t * self.time_scale, self.ch))
        if y is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for m in self.input_blocks:
            h = m(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for m in self.output_blocks:
            h = m(torch.cat([h, hs.pop()], 1), emb)
        return self.out(h)


def randomised(net, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    return net.eval()


def convert(tmp_path, net, monkeypatch, *opts, fmt="improved-diffusion"):
    src = tmp_path / "adm.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(src))
    out = tmp_path / "ours.safetensors"
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["convert", "--from", fmt, str(src), "--out", str(out), *opts], catch_exceptions=False)
    return r, out


CASES = {
    # improved-diffusion's CIFAR-10 flags in small: learned sigma, scale-shift, legacy heads, T = 4000 rescaled
    "improved": (
        dict(classes=None, ss=True, legacy=True, heads=2, time_scale=1000 / 4000, mult=(1, 2), attn_ds=(2,)),
        ["--resolution", "8", "--schedule", "cosine", "--T", "4000", "--heads", "2"],
        "improved-diffusion",
    ),
    # guided-diffusion's: class-conditional, new attention order, num_head_channels, no rescale
    "guided": (
        dict(classes=5, ss=True, legacy=False, heads=lambda c: c // 16, cout=3, mult=(1, 2, 2), attn_ds=(2, 4)),
        ["--resolution", "8", "--schedule", "linear", "--head-channels", "16", "--attention-order", "new"],
        "guided-diffusion",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_converted_network_matches_the_reference(case, tmp_path, monkeypatch):
    kw, opts, fmt = CASES[case]
    if case == "guided":  # one head count for the whole network, as ours has: every attention layer 32 channels wide
        kw = {**kw, "mult": (1, 1, 1)}
    ref = randomised(ADM(**kw))
    r, out = convert(tmp_path, ref, monkeypatch, *opts, fmt=fmt)
    assert r.exit_code == 0, r.stdout + r.stderr
    ck = load_checkpoint(out)
    tn = network_from_checkpoint(ck)
    assert tn.learn_sigma == (case == "improved")
    x = torch.randn(3, 3, 8, 8)
    t = torch.tensor([0, 1234, 3999]) if case == "improved" else torch.tensor([0, 500, 999])
    y = torch.tensor([0, 4, 2]) if kw["classes"] else None
    with torch.no_grad():
        torch.testing.assert_close(tn.net(x, t, y), ref(x, t, y), rtol=0, atol=1e-5)
    assert ck.config["schedule"]["T"] == (4000 if case == "improved" else 1000)


def test_converted_learned_sigma_model_samples_ancestrally(tmp_path, monkeypatch):
    kw, opts, fmt = CASES["improved"]
    r, out = convert(tmp_path, randomised(ADM(**kw)), monkeypatch, *opts)
    assert r.exit_code == 0, r.stdout + r.stderr
    r = CliRunner().invoke(
        app,
        ["sample", f"ckpt={out}", "n=2", "steps=4", "sampler=ddpm", f"hydra.run.dir={tmp_path / 's'}"],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.stdout + r.stderr
    assert (tmp_path / "s" / "grid.png").is_file()


@pytest.mark.parametrize(
    "mutate,opts,needle",
    [
        (None, ["--schedule", "cosine"], "--resolution is required"),
        (None, ["--resolution", "8"], "--schedule is required"),
        (None, ["--resolution", "8", "--schedule", "cosine", "--heads", "3"], "does not split into 3 heads"),
        (None, ["--resolution", "8", "--schedule", "cosine", "--num-heads", "2"], "No such option: --num-heads"),
        (
            None,
            ["--resolution", "8", "--schedule", "cosine", "num_heads=2"],
            "unexpected extra argument(s) (num_heads=2) (its options are --NAME VALUE",
        ),
        ("extra", ["--resolution", "8", "--schedule", "cosine", "--heads", "2"], "has no place in our U-Net"),
    ],
)
def test_refusals_are_one_line(mutate, opts, needle, tmp_path, monkeypatch):
    ref = randomised(ADM(**CASES["improved"][0]))
    sd = ref.state_dict()
    if mutate == "extra":  # e.g. a setting ours lacks leaves a tensor nowhere to go
        sd["input_blocks.1.0.extra.weight"] = torch.zeros(2)
    src = tmp_path / "adm.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(src))
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(
        app,
        ["convert", "--from", "improved-diffusion", str(src), "--out", str(tmp_path / "o.safetensors"), *opts],
        catch_exceptions=False,
    )
    assert r.exit_code == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_pickles_are_refused_unopened(tmp_path, monkeypatch):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not opened")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(
        app,
        [
            "convert",
            "--from",
            "improved-diffusion",
            str(bad),
            "--out",
            str(tmp_path / "o.safetensors"),
            "--resolution",
            "8",
            "--schedule",
            "cosine",
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 2 and "pickle" in r.stderr


@pytest.mark.parametrize(
    "opts,needle",
    [
        (["--resolution", "0", "--schedule", "cosine"], "--resolution=0 is not allowed: it must be >= 1"),
        (["--resolution", "8", "--schedule", "sigmoid"], "--schedule='sigmoid' is not allowed: choose one of linear"),
        (["--resolution", "8", "--schedule", "cosine", "--T", "1"], "--T=1 is not allowed: it must be >= 2"),
        (["--resolution", "8", "--schedule", "cosine", "--heads", "0"], "--heads=0 is not allowed: it must be >= 1"),
        (
            ["--resolution", "8", "--schedule", "cosine", "--heads", "2", "--head-channels", "16"],
            "--heads and --head-channels cannot both be given",
        ),
        (
            ["--resolution", "8", "--schedule", "cosine", "--attention-order", "old"],
            "--attention-order='old' is not allowed: choose one of legacy, new",
        ),
        (
            ["--resolution", "8", "--schedule", "cosine", "--prediction", "v"],
            "--prediction='v' is not allowed: choose one of eps, x0",
        ),
        (["--resolution", "eight", "--schedule", "cosine"], "Invalid value for '--resolution'"),
        (["--resolution", "8", "--schedule", "cosine", "--T"], "Option '--T' requires an argument"),
    ],
)
def test_options_are_refused_in_one_line_before_the_weights_are_read(opts, needle, tmp_path, monkeypatch):
    import safetensors

    def forbidden(*a, **k):
        raise AssertionError("the weights were read before the options were checked")

    monkeypatch.setattr(safetensors, "safe_open", forbidden)
    src = tmp_path / "adm.safetensors"
    src.write_bytes(b"not read")
    r = CliRunner().invoke(
        app, ["convert", "--from", "improved-diffusion", str(src), "--out", str(tmp_path / "o.safetensors"), *opts]
    )
    assert r.exit_code == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: ") and "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adm.safetensors"]


@pytest.mark.parametrize("fmt,rescale", [("improved-diffusion", True), ("guided-diffusion", False)])
def test_options_default_to_the_formats_own_flags(fmt, rescale):
    from diffuse.interop.adm import check_options

    given = {"resolution": 8, "schedule": "cosine", "T": None, "heads": None, "prediction": None}
    assert check_options(given, fmt) == {
        "resolution": 8,
        "schedule": "cosine",
        "T": 1000,
        "heads": 4,
        "head_channels": None,
        "attention_order": "legacy",
        "rescale_timesteps": rescale,
        "prediction": "eps",
    }
    o = check_options({**given, "head_channels": 16, "rescale_timesteps": not rescale}, fmt)
    assert (o["heads"], o["head_channels"], o["rescale_timesteps"]) == (None, 16, not rescale)


def test_the_recorded_schedule_and_objective_are_the_configs_of_their_names(tmp_path, monkeypatch, compose_cfg):
    """What the weights do not record is what training with schedule=NAME objective=simple uses (their T aside;
    ADM's cosine caps its betas at 0.999), and the options are recorded as given or defaulted."""
    from diffuse.pipeline.config import to_dict

    kw, opts, _ = CASES["improved"]
    r, out = convert(tmp_path, randomised(ADM(**kw)), monkeypatch, *opts, "--no-rescale-timesteps")
    assert r.exit_code == 0, r.stdout + r.stderr
    config = load_checkpoint(out).config
    assert config["schedule"] == {
        **to_dict(compose_cfg("train", ["schedule=cosine"]).schedule),
        "T": 4000,
        "max_beta": 0.999,
    }
    simple = to_dict(compose_cfg("train", ["objective=simple"]).objective)
    keys = ("prediction", "weighting", "min_snr_gamma", "p_uncond", "vlb_weight")
    assert config["objective"] == {**{k: simple[k] for k in keys}, "learn_sigma": True}
    assert config["source"]["options"]["rescale_timesteps"] is False and config["model"]["time_scale"] == 1.0
