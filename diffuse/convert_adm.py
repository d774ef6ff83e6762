"""Import an improved-diffusion / guided-diffusion U-Net (Nichol & Dhariwal 2021; Dhariwal & Nichol 2021, "ADM")
saved as safetensors, learned-sigma output channels included, as a diffuse checkpoint.

    diffuse convert --from improved-diffusion MODEL.safetensors out=FILE.safetensors resolution=32 schedule=cosine
        [T=4000] [heads=4 | head_channels=64] [attention_order=legacy|new] [rescale_timesteps=true|false]
        [prediction=eps|x0]

Their checkpoints are pickles (.pt), which are never opened here: convert one to safetensors where pickles are
trusted (torch.load, then safetensors.torch.save_file of the state dict), then run this on the result. The state
dict does not record the training flags, so what the weights cannot tell is given as key=value:

    resolution          image_size (required)
    schedule, T         noise_schedule (linear | cosine, required) and diffusion_steps (default 1000)
    heads               num_heads (default 4), or head_channels = num_head_channels (every attention layer must
                        then have the same head count: ours has one per network)
    attention_order     legacy (default: improved-diffusion, and guided-diffusion unless use_new_attention_order)
    rescale_timesteps   the network saw t * 1000 / T: default true for improved-diffusion, false for guided-diffusion
    prediction          eps (default), or x0 for predict_xstart

The rest is read off the tensors: base channels, channel multipliers, residual blocks per level, where attention
is, scale-shift norms (use_scale_shift_norm), the class count (class_cond) and learned variances (out_channels
2C: objective.learn_sigma). The mapping onto our U-Net is exact with its ADM settings: GroupNorm eps 1e-5,
their [cos, sin] time embedding, nearest-neighbour upsampling and stride-2 conv downsampling. Anything else
(resblock_updown, conv_resample=False, 1-D or 3-D networks) leaves tensors unmapped and is refused in one line.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from diffuse import nets
from diffuse.checkpoint import Checkpoint, save_checkpoint
from diffuse.errors import UserError

FORMATS = ("improved-diffusion", "guided-diffusion")
OPTIONS = (
    "resolution",
    "schedule",
    "T",
    "heads",
    "head_channels",
    "attention_order",
    "rescale_timesteps",
    "prediction",
)
ORDERS = ("legacy", "new")


def parse_options(tokens: list[str], fmt: str) -> dict:
    """key=value tokens -> the checked options (defaults filled in)."""
    opts: dict = {}
    for tok in tokens:
        key, eq, val = tok.partition("=")
        if not eq or key not in OPTIONS:
            raise UserError(
                f"{tok!r} is not an argument of convert --from {fmt}: give {', '.join(k + '=' for k in OPTIONS)}"
            )
        if key in opts:
            raise UserError(f"{key}= is given twice")
        opts[key] = val

    def integer(key: str, lo: int, hi: int) -> int:
        try:
            v = int(opts[key])
        except ValueError:
            v = None
        if v is None or not lo <= v <= hi:
            raise UserError(f"{key}={opts[key]!r} is not allowed: an integer from {lo} to {hi:,}")
        return v

    def flag(key: str, default: bool) -> bool:
        if key not in opts:
            return default
        if opts[key].lower() not in ("true", "false"):
            raise UserError(f"{key}={opts[key]!r} is not allowed: true or false")
        return opts[key].lower() == "true"

    if "resolution" not in opts:
        raise UserError("resolution= is required: the image_size the network was trained at (its weights do not say)")
    if opts.get("schedule") not in ("linear", "cosine"):
        raise UserError(
            f"schedule={opts.get('schedule')!r} is not allowed: give the noise_schedule it was trained with, "
            "linear or cosine"
        )
    if "heads" in opts and "head_channels" in opts:
        raise UserError("heads= and head_channels= cannot both be given: num_heads or num_head_channels")
    from diffuse.pipeline.model import MAX_T

    out = {
        "resolution": integer("resolution", 1, nets.MAX_RESOLUTION),
        "schedule": opts["schedule"],
        "T": integer("T", 2, MAX_T) if "T" in opts else 1000,
        "heads": integer("heads", 1, nets.MAX_HEADS) if "heads" in opts else (None if "head_channels" in opts else 4),
        "head_channels": integer("head_channels", 1, nets.MAX_WIDTH) if "head_channels" in opts else None,
        "attention_order": opts.get("attention_order", "legacy"),
        "rescale_timesteps": flag("rescale_timesteps", fmt == "improved-diffusion"),
        "prediction": opts.get("prediction", "eps"),
    }
    if out["attention_order"] not in ORDERS:
        raise UserError(f"attention_order={out['attention_order']!r} is not allowed: choose one of {', '.join(ORDERS)}")
    if out["prediction"] not in ("eps", "x0"):
        raise UserError(f"prediction={out['prediction']!r} is not allowed: eps, or x0 (predict_xstart)")
    return out


def _blocks(sd: dict, part: str) -> list[dict[str, torch.Tensor]]:
    """The numbered blocks of input_blocks / output_blocks: [{key within the block: tensor}, ...]."""
    found: dict[int, dict] = {}
    pat = re.compile(rf"^{part}\.(\d+)\.(.+)$")
    for k, v in sd.items():
        m = pat.match(k)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = v
    if sorted(found) != list(range(len(found))):
        raise UserError(
            f"the weights' {part} are not numbered 0..{len(found) - 1}: not an improved/guided-diffusion U-Net"
        )
    return [found[i] for i in range(len(found))]


def infer_model(sd: dict[str, torch.Tensor], o: dict, where: str) -> dict:
    """Our U-Net's config for the ADM state dict `sd` and the options `o`."""
    for key in ("input_blocks.0.0.weight", "out.2.weight", "time_embed.0.weight"):
        if key not in sd:
            raise UserError(f"{where}: no tensor {key}: not an improved-diffusion / guided-diffusion U-Net state dict")
    if sd["input_blocks.0.0.weight"].dim() != 4:
        raise UserError(
            f"{where}: input_blocks.0.0.weight is {sd['input_blocks.0.0.weight'].dim() - 2}-D: only 2-D image networks convert"
        )
    ch, cin = sd["input_blocks.0.0.weight"].shape[:2]
    cout = sd["out.2.weight"].shape[0]
    if cout not in (cin, 2 * cin):
        raise UserError(
            f"{where}: {cout} output channels for {cin} input channels: neither the image (eps) nor image and variances (learn_sigma)"
        )
    blocks = _blocks(sd, "input_blocks")[1:]
    levels: list[list[int]] = [[]]  # per level, the output channels of its residual blocks
    attn_levels = set()
    for b in blocks:
        if "0.op.weight" in b:
            levels.append([])
        elif "0.out_layers.3.weight" in b:
            levels[-1].append(int(b["0.out_layers.3.weight"].shape[0]))
            if "1.qkv.weight" in b:
                attn_levels.add(len(levels) - 1)
        else:
            raise UserError(
                f"{where}: an input block holds {sorted(b)[0]}: neither a residual block nor a conv downsample "
                "(resblock_updown and conv_resample=False have no counterpart in our U-Net)"
            )
    nrb = len(levels[0])
    if nrb == 0 or any(len(lv) != nrb for lv in levels):
        raise UserError(
            f"{where}: its levels have {[len(lv) for lv in levels]} residual blocks: our U-Net has the same number at every level"
        )
    if any(len(set(lv)) != 1 or lv[0] % ch for lv in levels):
        raise UserError(f"{where}: a level's residual blocks change width mid-level: not expressible")
    mult = [lv[0] // ch for lv in levels]
    res = o["resolution"]
    if res % 2 ** (len(mult) - 1):
        raise UserError(
            f"resolution={res} is not allowed: its {len(mult)} levels halve the image {len(mult) - 1} times"
        )
    first = next(b for b in blocks if "0.emb_layers.1.weight" in b)
    scale_shift = first["0.emb_layers.1.weight"].shape[0] == 2 * first["0.out_layers.3.weight"].shape[0]
    widths = sorted({ch * mult[lv] for lv in attn_levels} | {ch * mult[-1]})  # the middle block always attends
    if o["head_channels"] is not None:
        heads = {w // o["head_channels"] for w in widths}
        if len(heads) != 1 or any(w % o["head_channels"] for w in widths):
            raise UserError(
                f"head_channels={o['head_channels']}: the attention layers of {widths} channels would have "
                "different head counts, and our U-Net has one per network"
            )
        heads = heads.pop()
    else:
        heads = o["heads"]
    if any(w % heads for w in widths):
        raise UserError(f"heads={heads}: an attention layer of {widths} channels does not split into {heads} heads")
    num_classes = int(sd["label_emb.weight"].shape[0]) if "label_emb.weight" in sd else None
    return {
        "arch": "unet",
        "resolution": res,
        "in_channels": int(cin),
        "out_channels": int(cout),
        "ch": int(ch),
        "ch_mult": mult,
        "num_res_blocks": nrb,
        "attn_resolutions": sorted(res // 2**lv for lv in attn_levels),
        "dropout": 0.0,
        "num_classes": num_classes,
        "heads": heads,
        "groups": 32,
        "downsample_pad": "both",
        "norm_eps": 1e-5,
        "scale_shift": bool(scale_shift),
        "time_embedding": "adm",
        "time_scale": 1000.0 / o["T"] if o["rescale_timesteps"] else 1.0,
    }


def _qkv(w: torch.Tensor, heads: int, order: str) -> torch.Tensor:
    """A qkv conv1d's weight or bias to our [q; k; v] layout (rows: q, k, v, each head-major). The legacy order
    has them head by head, [q_h; k_h; v_h] for each head h."""
    if order == "legacy":
        c3 = w.shape[0]
        w = w.reshape(heads, 3, c3 // (3 * heads), *w.shape[1:]).transpose(0, 1).reshape(c3, *w.shape[1:])
    return w.reshape(*w.shape, 1) if w.dim() == 3 else w


def map_weights(sd: dict[str, torch.Tensor], model: dict, order: str, where: str) -> dict[str, torch.Tensor]:
    """Our U-Net's state dict from the ADM one; every tensor of theirs must be used and every one of ours filled."""
    ours: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    heads = model["heads"]

    def take(dst: str, src: str, fn=None):
        if src not in sd:
            raise UserError(f"{where}: no tensor {src}, which our U-Net of this shape needs")
        used.add(src)
        ours[dst] = fn(sd[src]) if fn else sd[src]

    def conv1d_as_2d(w):
        return w.reshape(*w.shape, 1) if w.dim() == 3 else w

    def resblock(dst: str, src: str):
        for a, b in (
            ("norm1", "in_layers.0"),
            ("conv1", "in_layers.2"),
            ("temb_proj", "emb_layers.1"),
            ("norm2", "out_layers.0"),
            ("conv2", "out_layers.3"),
        ):
            take(f"{dst}.{a}.weight", f"{src}.{b}.weight")
            take(f"{dst}.{a}.bias", f"{src}.{b}.bias")
        if f"{src}.skip_connection.weight" in sd:
            take(f"{dst}.skip.weight", f"{src}.skip_connection.weight")
            take(f"{dst}.skip.bias", f"{src}.skip_connection.bias")

    def attention(dst: str, src: str):
        take(f"{dst}.norm.weight", f"{src}.norm.weight")
        take(f"{dst}.norm.bias", f"{src}.norm.bias")
        take(f"{dst}.qkv.weight", f"{src}.qkv.weight", lambda w: _qkv(w, heads, order))
        take(f"{dst}.qkv.bias", f"{src}.qkv.bias", lambda w: _qkv(w, heads, order))
        take(f"{dst}.proj.weight", f"{src}.proj_out.weight", conv1d_as_2d)
        take(f"{dst}.proj.bias", f"{src}.proj_out.bias")

    for a, b in (
        ("temb.0", "time_embed.0"),
        ("temb.2", "time_embed.2"),
        ("conv_in", "input_blocks.0.0"),
        ("norm_out", "out.0"),
        ("conv_out", "out.2"),
    ):
        take(f"{a}.weight", f"{b}.weight")
        take(f"{a}.bias", f"{b}.bias")
    if model["num_classes"]:
        # Our class embedding has one more row, the null label of classifier-free guidance, which ADM did not
        # train: zeros, so that guidance=cfg on a converted model is visibly the label-free embedding.
        take("label_emb.weight", "label_emb.weight", lambda w: torch.cat([w, torch.zeros_like(w[:1])]))
    for i, b in enumerate(_blocks(sd, "input_blocks")[1:]):
        src = f"input_blocks.{i + 1}"
        if "0.op.weight" in b:
            take(f"down.{i}.0.conv.weight", f"{src}.0.op.weight")
            take(f"down.{i}.0.conv.bias", f"{src}.0.op.bias")
            continue
        resblock(f"down.{i}.0", f"{src}.0")
        if "1.qkv.weight" in b:
            attention(f"down.{i}.1", f"{src}.1")
    resblock("mid.0", "middle_block.0")
    attention("mid.1", "middle_block.1")
    resblock("mid.2", "middle_block.2")
    k = 0
    for i, b in enumerate(_blocks(sd, "output_blocks")):
        src = f"output_blocks.{i}"
        resblock(f"up.{k}.0", f"{src}.0")
        nxt = 1
        if "1.qkv.weight" in b:
            attention(f"up.{k}.1", f"{src}.1")
            nxt = 2
        k += 1
        if f"{nxt}.conv.weight" in b:  # the level's upsample, ours a block of its own
            take(f"up.{k}.0.conv.weight", f"{src}.{nxt}.conv.weight")
            take(f"up.{k}.0.conv.bias", f"{src}.{nxt}.conv.bias")
            k += 1
    left = sorted(set(sd) - used)
    if left:
        more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
        raise UserError(
            f"{where}: {left[0]}{more} has no place in our U-Net: the network uses a setting it cannot express"
        )
    return ours


def convert_adm(src: str | Path, out: str | Path, tokens: list[str], fmt: str = "improved-diffusion") -> Path:
    """Write the diffuse checkpoint of the ADM U-Net in safetensors file `src` to `out`; returns `out`."""
    from diffuse.convert import PICKLED, check_out, header_tensors, read_tensors

    src, out = Path(src).expanduser(), Path(out).expanduser()
    check_out(out)
    o = parse_options(tokens, fmt)
    if src.suffix.lower() in PICKLED:
        raise UserError(
            f"{src} is a pickle ({src.suffix}): pickles are never opened; save its state dict with "
            "safetensors.torch.save_file where you trust the file, and convert that"
        )
    if src.is_dir():
        diffusers = any((src / p).is_file() for p in ("config.json", "unet/config.json", "model_index.json"))
        hint = " (a diffusers folder converts with --from diffusers)" if diffusers else ""
        raise UserError(f"{src} is a folder: --from {fmt} takes the network's .safetensors file{hint}")
    if not src.is_file():
        raise UserError(f"{src} does not exist (or is not a file): give the network's .safetensors file")
    where = str(src)
    header = header_tensors(src)
    model = infer_model(header, o, where)
    shapes = nets.network_shapes(model, where=where, keys={})
    nets.check_weights(shapes, map_weights(header, model, o["attention_order"], where), where)
    sd = read_tensors(src)
    weights = {
        k: v.to(torch.float32).contiguous() for k, v in map_weights(sd, model, o["attention_order"], where).items()
    }
    schedule = (
        {"kind": "cosine", "T": o["T"], "cosine_s": 0.008, "max_beta": 0.999}
        if o["schedule"] == "cosine"
        else {"kind": "linear", "T": o["T"], "beta_start": 1e-4, "beta_end": 0.02, "scale_with_T": True}
    )
    learn_sigma = model["out_channels"] == 2 * model["in_channels"]
    objective = {
        "prediction": o["prediction"],
        "weighting": "simple",
        "min_snr_gamma": 5.0,
        "p_uncond": 0.1,
        "learn_sigma": learn_sigma,
        "vlb_weight": 0.001,
    }
    config = {
        "model": model,
        "schedule": schedule,
        "objective": objective,
        "data": {"is_8bit": True, "num_classes": model["num_classes"]},
        "source": {"format": fmt, "path": str(src.resolve()), "options": o},
    }
    return save_checkpoint(out, Checkpoint(config=config, step=0, model=weights))
