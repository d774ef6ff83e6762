"""Import an improved-diffusion / guided-diffusion U-Net (Nichol & Dhariwal 2021; Dhariwal & Nichol 2021, "ADM")
saved as safetensors, learned-sigma output channels included, as a diffuse checkpoint.

    diffuse convert --from improved-diffusion MODEL.safetensors --out FILE.safetensors --resolution 32
        --schedule cosine [--T 4000] [--heads 4 | --head-channels 64] [--attention-order legacy|new]
        [--rescale-timesteps | --no-rescale-timesteps] [--prediction eps|x0]

Their checkpoints are pickles (.pt), which are never opened here: convert one to safetensors where pickles are
trusted (torch.load, then safetensors.torch.save_file of the state dict), then run this on the result. The state
dict does not record the training flags, so what the weights cannot tell is given as options:

    --resolution         image_size (required)
    --schedule, --T      noise_schedule (linear | cosine, required) and diffusion_steps (default 1000)
    --heads              num_heads (default 4), or --head-channels = num_head_channels (every attention layer must
                         then have the same head count: ours has one per network)
    --attention-order    legacy (default: improved-diffusion, and guided-diffusion unless use_new_attention_order)
    --rescale-timesteps  the network saw t * 1000 / T: default on for improved-diffusion, off for guided-diffusion
    --prediction         eps (default), or x0 for predict_xstart

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
from diffuse.errors import UserError
from diffuse.interop.weights import (
    PICKLED,
    check_out,
    conf_values,
    float32,
    header_tensors,
    read_tensors,
    save_converted,
)
from diffuse.validate import check_choice, check_number

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
SCHEDULES = ("linear", "cosine")
ORDERS = ("legacy", "new")
PREDICTIONS = ("eps", "x0")
# ADM's own defaults for the flags it trains with: diffusion_steps, num_heads.
DIFFUSION_STEPS, NUM_HEADS = 1000, 4
# ADM's betas_for_alpha_bar caps the cosine schedule's betas at 0.999, which conf/schedule/cosine.yaml leaves open.
COSINE_MAX_BETA = 0.999


def flag(key: str) -> str:
    """The command-line option of an entry of OPTIONS."""
    return "--" + key.replace("_", "-")


def check_options(given: dict, fmt: str) -> dict:
    """The options of convert --from FORMAT (an absent or None entry: not given), checked, with ADM's defaults
    filled in: what the checkpoint records as its source's options."""
    g = {k: v for k, v in given.items() if v is not None}
    if "resolution" not in g:
        raise UserError("--resolution is required: the image_size the network was trained at (its weights do not say)")
    if "schedule" not in g:
        raise UserError("--schedule is required: give the noise_schedule it was trained with, linear or cosine")
    schedule = check_choice(flag("schedule"), g["schedule"], SCHEDULES)
    if "heads" in g and "head_channels" in g:
        raise UserError("--heads and --head-channels cannot both be given: num_heads or num_head_channels")
    from diffuse.pipeline.model import MAX_T

    def integer(key: str, lo: int, hi: int) -> int:
        return check_number(flag(key), g[key], minimum=lo, maximum=hi, integer=True)

    return {
        "resolution": integer("resolution", 1, nets.MAX_RESOLUTION),
        "schedule": schedule,
        "T": integer("T", 2, MAX_T) if "T" in g else DIFFUSION_STEPS,
        "heads": integer("heads", 1, nets.MAX_HEADS) if "heads" in g else (None if "head_channels" in g else NUM_HEADS),
        "head_channels": integer("head_channels", 1, nets.MAX_WIDTH) if "head_channels" in g else None,
        "attention_order": check_choice(flag("attention_order"), g.get("attention_order", "legacy"), ORDERS),
        "rescale_timesteps": g.get("rescale_timesteps", fmt == "improved-diffusion"),
        "prediction": check_choice(flag("prediction"), g.get("prediction", "eps"), PREDICTIONS),
    }


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


def _io_channels(sd: dict[str, torch.Tensor], where: str) -> tuple[int, int, int]:
    """(base channels, input channels, output channels) of an ADM state dict, or one line for another network."""
    for key in ("input_blocks.0.0.weight", "out.2.weight", "time_embed.0.weight"):
        if key not in sd:
            raise UserError(f"{where}: no tensor {key}: not an improved-diffusion / guided-diffusion U-Net state dict")
    if sd["input_blocks.0.0.weight"].dim() != 4:
        raise UserError(
            f"{where}: input_blocks.0.0.weight is {sd['input_blocks.0.0.weight'].dim() - 2}-D: "
            "only 2-D image networks convert"
        )
    ch, cin = sd["input_blocks.0.0.weight"].shape[:2]
    cout = sd["out.2.weight"].shape[0]
    if cout not in (cin, 2 * cin):
        raise UserError(
            f"{where}: {cout} output channels for {cin} input channels: "
            "neither the image (eps) nor image and variances (learn_sigma)"
        )
    return int(ch), int(cin), int(cout)


def _levels(blocks: list[dict], ch: int, where: str) -> tuple[list[int], int, set[int]]:
    """(channel multipliers, residual blocks per level, the levels that attend) read off the input blocks."""
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
            f"{where}: its levels have {[len(lv) for lv in levels]} residual blocks: "
            "our U-Net has the same number at every level"
        )
    if any(len(set(lv)) != 1 or lv[0] % ch for lv in levels):
        raise UserError(f"{where}: a level's residual blocks change width mid-level: not expressible")
    return [lv[0] // ch for lv in levels], nrb, attn_levels


def _heads(o: dict, widths: list[int]) -> int:
    """The one head count of every attention layer (of `widths` channels): --heads, or from --head-channels."""
    if o["head_channels"] is not None:
        heads = {w // o["head_channels"] for w in widths}
        if len(heads) != 1 or any(w % o["head_channels"] for w in widths):
            raise UserError(
                f"--head-channels={o['head_channels']}: the attention layers of {widths} channels would have "
                "different head counts, and our U-Net has one per network"
            )
        return heads.pop()
    if any(w % o["heads"] for w in widths):
        raise UserError(
            f"--heads={o['heads']}: an attention layer of {widths} channels does not split into {o['heads']} heads"
        )
    return o["heads"]


def infer_model(sd: dict[str, torch.Tensor], o: dict, where: str) -> dict:
    """Our U-Net's config for the ADM state dict `sd` and the options `o`."""
    ch, cin, cout = _io_channels(sd, where)
    blocks = _blocks(sd, "input_blocks")[1:]
    mult, nrb, attn_levels = _levels(blocks, ch, where)
    res = o["resolution"]
    if res % 2 ** (len(mult) - 1):
        raise UserError(
            f"--resolution={res} is not allowed: its {len(mult)} levels halve the image {len(mult) - 1} times"
        )
    first = next(b for b in blocks if "0.emb_layers.1.weight" in b)
    scale_shift = first["0.emb_layers.1.weight"].shape[0] == 2 * first["0.out_layers.3.weight"].shape[0]
    widths = sorted({ch * mult[lv] for lv in attn_levels} | {ch * mult[-1]})  # the middle block always attends
    return {
        "arch": "unet",
        "resolution": res,
        "in_channels": cin,
        "out_channels": cout,
        "ch": ch,
        "ch_mult": mult,
        "num_res_blocks": nrb,
        "attn_resolutions": sorted(res // 2**lv for lv in attn_levels),
        "dropout": 0.0,
        "num_classes": int(sd["label_emb.weight"].shape[0]) if "label_emb.weight" in sd else None,
        "heads": _heads(o, widths),
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
    return _conv1d_as_2d(w)


def _conv1d_as_2d(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(*w.shape, 1) if w.dim() == 3 else w


# Our residual block's layers -> ADM's.
RESBLOCK = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("temb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
)


class _Mapping:
    """Our U-Net's tensors taken from the ADM state dict `sd`, each of theirs at most once; `used` says which."""

    def __init__(self, sd: dict[str, torch.Tensor], heads: int, order: str, where: str):
        self.sd, self.heads, self.order, self.where = sd, heads, order, where
        self.ours: dict[str, torch.Tensor] = {}
        self.used: set[str] = set()

    def take(self, dst: str, src: str, fn=None) -> None:
        if src not in self.sd:
            raise UserError(f"{self.where}: no tensor {src}, which our U-Net of this shape needs")
        self.used.add(src)
        self.ours[dst] = fn(self.sd[src]) if fn else self.sd[src]

    def layer(self, dst: str, src: str, fn=None) -> None:
        """A layer's weight and bias (`fn` applied to both)."""
        self.take(f"{dst}.weight", f"{src}.weight", fn)
        self.take(f"{dst}.bias", f"{src}.bias", fn)

    def resblock(self, dst: str, src: str) -> None:
        for a, b in RESBLOCK:
            self.layer(f"{dst}.{a}", f"{src}.{b}")
        if f"{src}.skip_connection.weight" in self.sd:
            self.layer(f"{dst}.skip", f"{src}.skip_connection")

    def attention(self, dst: str, src: str) -> None:
        self.layer(f"{dst}.norm", f"{src}.norm")
        self.layer(f"{dst}.qkv", f"{src}.qkv", lambda w: _qkv(w, self.heads, self.order))
        self.take(f"{dst}.proj.weight", f"{src}.proj_out.weight", _conv1d_as_2d)
        self.take(f"{dst}.proj.bias", f"{src}.proj_out.bias")


def map_weights(sd: dict[str, torch.Tensor], model: dict, order: str, where: str) -> dict[str, torch.Tensor]:
    """Our U-Net's state dict from the ADM one; every tensor of theirs must be used and every one of ours filled."""
    m = _Mapping(sd, model["heads"], order, where)
    for a, b in (
        ("temb.0", "time_embed.0"),
        ("temb.2", "time_embed.2"),
        ("conv_in", "input_blocks.0.0"),
        ("norm_out", "out.0"),
        ("conv_out", "out.2"),
    ):
        m.layer(a, b)
    if model["num_classes"]:
        # Our class embedding has one more row, the null label of classifier-free guidance, which ADM did not
        # train: zeros, so that guidance=cfg on a converted model is visibly the label-free embedding.
        m.take("label_emb.weight", "label_emb.weight", lambda w: torch.cat([w, torch.zeros_like(w[:1])]))
    for i, b in enumerate(_blocks(sd, "input_blocks")[1:]):
        src = f"input_blocks.{i + 1}"
        if "0.op.weight" in b:
            m.layer(f"down.{i}.0.conv", f"{src}.0.op")
            continue
        m.resblock(f"down.{i}.0", f"{src}.0")
        if "1.qkv.weight" in b:
            m.attention(f"down.{i}.1", f"{src}.1")
    m.resblock("mid.0", "middle_block.0")
    m.attention("mid.1", "middle_block.1")
    m.resblock("mid.2", "middle_block.2")
    k = 0
    for i, b in enumerate(_blocks(sd, "output_blocks")):
        src = f"output_blocks.{i}"
        m.resblock(f"up.{k}.0", f"{src}.0")
        nxt = 1
        if "1.qkv.weight" in b:
            m.attention(f"up.{k}.1", f"{src}.1")
            nxt = 2
        k += 1
        if f"{nxt}.conv.weight" in b:  # the level's upsample, ours a block of its own
            m.layer(f"up.{k}.0.conv", f"{src}.{nxt}.conv")
            k += 1
    left = sorted(set(sd) - m.used)
    if left:
        more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
        raise UserError(
            f"{where}: {left[0]}{more} has no place in our U-Net: the network uses a setting it cannot express"
        )
    return m.ours


def _check_source(src: Path, fmt: str) -> None:
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


def _schedule(o: dict) -> dict:
    """The schedule it was trained with: ours of the same name (ADM's linear is Nichol & Dhariwal's 1000/T-scaled
    one, as ours), at its T."""
    if o["schedule"] == "cosine":
        return {**conf_values("schedule", "cosine"), "T": o["T"], "max_beta": COSINE_MAX_BETA}
    return {**conf_values("schedule", "linear"), "T": o["T"]}


def convert_adm(
    src: str | Path, out: str | Path, options: dict, fmt: str = "improved-diffusion", *, force: bool = False
) -> Path:
    """Write the diffuse checkpoint of the ADM U-Net in safetensors file `src` to `out`; returns `out`. `options`:
    the given entries of OPTIONS (see check_options)."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    check_out(out, src, force)
    o = check_options(options, fmt)
    _check_source(src, fmt)
    where = str(src)
    header = header_tensors(src)
    model = infer_model(header, o, where)
    shapes = nets.network_shapes(model, where=where, keys={})
    nets.check_weights(shapes, map_weights(header, model, o["attention_order"], where), where)
    weights = float32(map_weights(read_tensors(src), model, o["attention_order"], where))
    learn_sigma = model["out_channels"] == 2 * model["in_channels"]
    simple = conf_values("objective", "simple", ("weighting", "min_snr_gamma", "p_uncond", "vlb_weight"))
    objective = {"prediction": o["prediction"], **simple, "learn_sigma": learn_sigma}
    return save_converted(
        out, src, model, weights, source={"format": fmt, "options": o}, schedule=_schedule(o), objective=objective
    )
