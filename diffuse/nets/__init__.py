"""Networks F(x, t, y), built from a config through an allow-list: a checkpoint's config is user input.

Every argument is checked (type, range) and the network is first built on the meta device, where it has shapes
but no storage: its parameter count, and the shapes a checkpoint's weights must have, are known before a byte
of it is allocated. A crafted ch = 10^6 is one line, not a 16 TB allocation.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch import nn

from diffuse.errors import UserError
from diffuse.nets.autoencoder import AutoencoderKL
from diffuse.nets.classifier import Classifier
from diffuse.nets.dit import DiT
from diffuse.nets.layers import DOWNSAMPLE_PADS, TIME_EMBEDDINGS
from diffuse.nets.taesd import ACTIVATIONS as TAESD_ACTIVATIONS
from diffuse.nets.taesd import UPSAMPLE_MODES, TinyAutoencoder
from diffuse.nets.unet import UNet
from diffuse.validate import check_flag, check_int_in, check_int_list, check_number_in, check_optional_int_in, refuse

# "classifier" is the noise-aware classifier of classifier guidance (diffuse train-classifier), "autoencoder" the
# image <-> latent map of latent diffusion (diffuse train-ae), "taesd" the tiny autoencoder (imported from diffusers'
# AutoencoderTiny): none of them is a denoiser.
NETWORKS: dict[str, type[nn.Module]] = {
    "unet": UNet,
    "dit": DiT,
    "classifier": Classifier,
    "autoencoder": AutoencoderKL,
    "taesd": TinyAutoencoder,
}
# The networks a latent model may encode with (pipeline/latent.py).
AUTOENCODERS = ("autoencoder", "taesd")

# Bounds on what a config may ask for. They are far beyond what this toolkit trains (DiT-XL/2 has 675M
# parameters, Stable Diffusion's U-Net 860M, Ho et al.'s largest 256x256 model 114M) and far below what
# would exhaust a machine before the first step.
MAX_PARAMETERS = 2_000_000_000  # 8 GB of float32 weights; 32 GB with the EMA copy and AdamW's two moments
MAX_RESOLUTION = 4096  # pixels per side
MAX_IO_CHANNELS = 256  # images have 1-4 channels, latents 4-16, mask-conditioned inputs 2C + 1
MAX_WIDTH = 16384  # channels of any layer: ch x ch_mult[i], hidden_size, freq_dim
MAX_LEVELS = 10  # a U-Net of 10 levels halves 4096 pixels down to 8
MAX_BLOCKS = 64  # residual blocks per level, transformer blocks
MAX_HEADS = 1024
MAX_CLASSES = 1_000_000  # ImageNet-21k has 21841

# In training the network's resolution is the dataset's: that is the key a user sets.
TRAINING_KEYS = {"resolution": "dataset.resolution"}


class _Check:
    """Messages for one config: `where` (a file, or nothing) and the name each argument has for the user."""

    def __init__(self, cfg: dict, where: str, keys: dict[str, str], data_known: bool = True):
        self.cfg, self.prefix, self.keys = cfg, f"{where}: " if where else "", keys
        self.data_known = data_known  # resolution and channels given (they come from the data in training)

    def key(self, arg: str) -> str:
        return self.keys.get(arg, f"model.{arg}")

    def fail(self, arg: str, allowed: str) -> UserError:
        return refuse(self.name(arg), self.cfg[arg], allowed)

    def name(self, arg: str) -> str:
        return f"{self.prefix}{self.key(arg)}"

    def integer(self, arg: str, lo: int, hi: int, why: str = "") -> int:
        return check_int_in(self.name(arg), self.cfg[arg], lo, hi, why)

    def optional_integer(self, arg: str, lo: int, hi: int, null_means: str) -> int | None:
        return check_optional_int_in(self.name(arg), self.cfg[arg], lo, hi, null_means)

    def number(self, arg: str, lo: float, hi: float, hi_open: bool, lo_open: bool = False) -> float:
        return check_number_in(self.name(arg), self.cfg[arg], lo, hi, hi_open=hi_open, lo_open=lo_open)

    def int_list(self, arg: str, lo: int, hi: int, max_len: int, nonempty: bool) -> list[int]:
        return check_int_list(self.name(arg), self.cfg[arg], lo, hi, max_len, nonempty=nonempty)

    def flag(self, arg: str) -> bool:
        return check_flag(self.name(arg), self.cfg[arg])


def _check_io(c: _Check) -> None:
    if c.data_known:
        c.integer("resolution", 1, MAX_RESOLUTION)
        c.integer("in_channels", 1, MAX_IO_CHANNELS)
        c.optional_integer("out_channels", 1, MAX_IO_CHANNELS, "as many as in_channels")
    c.optional_integer("num_classes", 0, MAX_CLASSES, "unconditional")


def _check_unet(c: _Check) -> None:
    _check_io(c)
    _check_levels(c)
    c.flag("aug_embedding")
    c.flag("scale_shift")
    if c.cfg["time_embedding"] not in TIME_EMBEDDINGS:
        raise c.fail("time_embedding", f"choose one of {', '.join(TIME_EMBEDDINGS)}")
    c.number("norm_eps", 0.0, 1.0, hi_open=True, lo_open=True)
    c.number("time_scale", 0.0, 1e6, hi_open=False, lo_open=True)


def _check_classifier(c: _Check) -> None:
    if c.data_known:
        c.integer("resolution", 1, MAX_RESOLUTION)
        c.integer("in_channels", 1, MAX_IO_CHANNELS)
    if c.cfg["num_classes"] is not None or c.data_known:  # null in a training config: the dataset's
        c.integer("num_classes", 2, MAX_CLASSES, "a classifier needs at least two classes")
    _check_levels(c)


def _widths(c: _Check, least: int, why: str = "") -> tuple[int, list[int]]:
    """ch (at least `least`) and ch_mult, the widest level within MAX_WIDTH channels."""
    ch = c.integer("ch", least, MAX_WIDTH, why)
    mult = c.int_list("ch_mult", 1, MAX_WIDTH, MAX_LEVELS, nonempty=True)
    if ch * max(mult) > MAX_WIDTH:
        raise c.fail(
            "ch_mult",
            f"with {c.key('ch')}={ch} its widest level would have {ch * max(mult):,} channels, more than {MAX_WIDTH:,}",
        )
    return ch, mult


def _check_levels(c: _Check) -> None:
    """The U-Net's down path and middle block (shared by the classifier, its encoder half)."""
    cfg = c.cfg
    # The sinusoidal time embedding has ch channels and divides by ch // 2 - 1: below 4 it is NaN.
    ch, mult = _widths(c, 4, "the time embedding has model.ch channels and needs at least 4")
    c.integer("num_res_blocks", 0, MAX_BLOCKS)
    attn = c.int_list("attn_resolutions", 1, MAX_RESOLUTION, 64, nonempty=False)
    c.number("dropout", 0.0, 1.0, hi_open=True)
    heads = c.integer("heads", 1, MAX_HEADS)
    c.integer("groups", 1, MAX_WIDTH)
    if cfg["downsample_pad"] not in DOWNSAMPLE_PADS:
        raise c.fail("downsample_pad", f"choose one of {', '.join(DOWNSAMPLE_PADS)}")
    if not c.data_known:
        return
    res, levels = cfg["resolution"], len(mult)
    # Each level but the last halves the feature map and the up path doubles it back: the skips only line up
    # when every halving is exact.
    if res % 2 ** (levels - 1):
        raise UserError(
            f"{c.prefix}{c.key('resolution')}={res} is not allowed with {c.key('ch_mult')}={mult}: its "
            f"{levels} levels halve the image {levels - 1} times, so the resolution must be a multiple of "
            f"{2 ** (levels - 1)}"
        )
    # Attention runs at the levels whose resolution is listed, and always in the middle block.
    widths = {ch * m for i, m in enumerate(mult) if res // 2**i in attn} | {ch * mult[-1]}
    bad = sorted(w for w in widths if w % heads)
    if bad:
        raise c.fail("heads", f"an attention layer of {bad[0]} channels does not split into {heads} heads")


def _check_dit(c: _Check) -> None:
    cfg = c.cfg
    _check_io(c)
    res = cfg["resolution"] if c.data_known else MAX_RESOLUTION
    patch = c.integer("patch_size", 1, res, f"at most {c.key('resolution')}={res}" if c.data_known else "")
    if c.data_known and res % patch:
        raise UserError(
            f"{c.prefix}{c.key('resolution')}={res} is not allowed with {c.key('patch_size')}={patch}: "
            "the image must split into whole patches"
        )
    heads = c.integer("heads", 1, MAX_HEADS)
    hidden = c.integer("hidden_size", 4, MAX_WIDTH)
    if hidden % 4 or hidden % heads:
        raise c.fail(
            "hidden_size", f"it must be a multiple of 4 (the 2-D position embedding) and of {c.key('heads')}={heads}"
        )
    c.integer("depth", 0, MAX_BLOCKS)
    ratio = c.number("mlp_ratio", 0.0, 64.0, hi_open=False, lo_open=True)
    if int(hidden * ratio) < 1:
        raise c.fail("mlp_ratio", f"with {c.key('hidden_size')}={hidden} the MLP would have no channels")
    c.integer("freq_dim", 4, MAX_WIDTH, "the time embedding divides by freq_dim // 2 - 1")


def _check_autoencoder(c: _Check) -> None:
    ch, mult = _widths(c, 1)
    c.integer("num_res_blocks", 1, MAX_BLOCKS)
    c.integer("latent_channels", 1, MAX_IO_CHANNELS)
    c.integer("groups", 1, MAX_WIDTH)
    c.number("dropout", 0.0, 1.0, hi_open=True)
    for key in ("mid_attention", "quant_conv", "post_quant_conv"):
        c.flag(key)
    _check_codec_images(c, "ch_mult", mult)


def _check_codec_images(c: _Check, levels_key: str, levels: list) -> None:
    """An autoencoder's image side, once the data is known: channels, and a resolution its 2^(levels - 1) divides."""
    if not c.data_known:
        return
    c.integer("in_channels", 1, MAX_IO_CHANNELS)
    c.optional_integer("out_channels", 1, MAX_IO_CHANNELS, "as many as in_channels")
    res = c.integer("resolution", 1, MAX_RESOLUTION)
    factor = 2 ** (len(levels) - 1)
    if res % factor:
        raise UserError(
            f"{c.prefix}{c.key('resolution')}={res} is not allowed with {c.key(levels_key)}={levels}: the "
            f"autoencoder downsamples by {factor}, so the resolution must be a multiple of {factor}"
        )


def _check_taesd(c: _Check) -> None:
    cfg = c.cfg
    c.integer("encoder_width", 1, MAX_WIDTH)
    c.integer("decoder_width", 1, MAX_WIDTH)
    enc = c.int_list("encoder_blocks", 0, MAX_BLOCKS, MAX_LEVELS, nonempty=True)
    dec = c.int_list("decoder_blocks", 0, MAX_BLOCKS, MAX_LEVELS, nonempty=True)
    c.integer("latent_channels", 1, MAX_IO_CHANNELS)
    if cfg["act"] not in TAESD_ACTIVATIONS:
        raise c.fail("act", f"choose one of {', '.join(TAESD_ACTIVATIONS)}")
    if cfg["upsample_mode"] not in UPSAMPLE_MODES:
        raise c.fail("upsample_mode", f"choose one of {', '.join(UPSAMPLE_MODES)}")
    up = c.integer("upsample_factor", 1, 2 ** (MAX_LEVELS - 1))
    # encode and decode must be inverse in shape, or a decoded latent is not an image of the encoded size
    if up ** (len(dec) - 1) != 2 ** (len(enc) - 1):
        raise c.fail(
            "upsample_factor",
            f"the decoder's {len(dec)} stages must upsample by the encoder's factor "
            f"2^{len(enc) - 1} = {2 ** (len(enc) - 1)} (it gives {up}^{len(dec) - 1})",
        )
    c.number("scaling_factor", 0.0, 1e6, hi_open=False, lo_open=True)
    c.number("shift_factor", -1e6, 1e6, hi_open=False)
    _check_codec_images(c, "encoder_blocks", enc)


_CHECKS: dict[str, Callable[[_Check], None]] = {
    "unet": _check_unet,
    "dit": _check_dit,
    "classifier": _check_classifier,
    "autoencoder": _check_autoencoder,
    "taesd": _check_taesd,
}
# What grows a network's parameter count, named when it is too large.
_SIZE_KEYS = {
    "unet": ("ch", "ch_mult", "num_res_blocks", "num_classes"),
    "dit": ("hidden_size", "depth", "mlp_ratio", "num_classes"),
    "classifier": ("ch", "ch_mult", "num_res_blocks", "num_classes"),
    "autoencoder": ("ch", "ch_mult", "num_res_blocks", "latent_channels"),
    "taesd": ("encoder_width", "decoder_width", "encoder_blocks", "decoder_blocks", "latent_channels"),
}


def _arguments(
    cfg: dict, where: str, keys: dict | None, data_known: bool = True
) -> tuple[type[nn.Module], dict, _Check]:
    """The class and complete, checked constructor arguments of a model config."""
    if not isinstance(cfg, dict):
        raise UserError(
            f"{where + ': ' if where else ''}the model config is {type(cfg).__name__}, not a mapping of model.* keys"
        )
    cfg = dict(cfg)
    arch = cfg.pop("arch", None)
    prefix = f"{where}: " if where else ""
    if "_target_" in cfg:
        raise UserError(
            f"{prefix}model._target_={cfg['_target_']!r} is refused: networks are chosen by model.arch from {', '.join(NETWORKS)}"
        )
    if arch not in NETWORKS:
        raise UserError(f"{prefix}model.arch={arch!r} is not allowed: choose one of {', '.join(sorted(NETWORKS))}")
    cls = NETWORKS[arch]
    params = inspect.signature(cls.__init__).parameters
    allowed = set(params) - {"self"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise UserError(
            f"{prefix}model.{unknown[0]} is not an argument of {arch}: allowed are {', '.join(sorted(allowed))}"
        )
    full = {name: cfg.get(name, params[name].default) for name in allowed}
    check = _Check(full, where, TRAINING_KEYS if keys is None else keys, data_known)
    _CHECKS[arch](check)
    for key in ("ch_mult", "attn_resolutions"):
        if key in cfg and cfg[key] is not None:
            cfg[key] = tuple(cfg[key])
    return cls, cfg, check


def complete_config(cfg: dict, *, where: str = "", keys: dict | None = None) -> dict:
    """A model config with every constructor argument filled in (its defaults where the config is silent), checked:
    what code that reads the config's keys directly (a checkpoint header's, user input) may then rely on."""
    cls, _, check = _arguments(cfg, where, keys)
    return {"arch": cfg["arch"], **check.cfg}


def check_model_config(cfg: dict) -> None:
    """A training run's model.* keys, checked before the dataset is loaded: all but what the data decides
    (resolution, channels), which build_network checks once they are known."""
    _arguments(cfg, "", None, data_known=False)


def _construct(cls: type[nn.Module], cfg: dict, prefix: str) -> nn.Module:
    try:
        return cls(**cfg)
    except (TypeError, ValueError) as e:
        raise UserError(f"{prefix}model config is not valid for {cls.__name__}: {e}") from None


def meta_network(cfg: dict, *, where: str = "", keys: dict | None = None) -> nn.Module:
    """The network `cfg` describes, built on the meta device (shapes, no storage: nothing is allocated), or one
    line for a config that is invalid or describes more than MAX_PARAMETERS."""
    cls, args, check = _arguments(cfg, where, keys)
    with torch.device("meta"):
        net = _construct(cls, args, check.prefix)
    n = sum(t.numel() for t in net.state_dict().values())
    if n > MAX_PARAMETERS:
        given = ", ".join(
            f"{check.key(k)}={check.cfg[k]!r}" for k in _SIZE_KEYS[cfg["arch"]] if check.cfg[k] is not None
        )
        raise UserError(
            f"{check.prefix}{given} describe a network of {n:,} parameters: more than the {MAX_PARAMETERS:,} allowed"
        )
    return net


def network_shapes(cfg: dict, *, where: str = "", keys: dict | None = None) -> dict[str, torch.Size]:
    """The state-dict shapes of the network `cfg` describes (see meta_network)."""
    return {name: t.shape for name, t in meta_network(cfg, where=where, keys=keys).state_dict().items()}


def check_weights(shapes: dict[str, torch.Size], weights: dict[str, torch.Tensor], where: str = "") -> None:
    """Weights (names and shapes) against a network's state-dict shapes, before the network is built."""
    prefix = f"{where}: " if where else ""
    missing = sorted(set(shapes) - set(weights))
    extra = sorted(set(weights) - set(shapes))
    wrong = sorted(k for k in set(shapes) & set(weights) if tuple(weights[k].shape) != tuple(shapes[k]))
    if not (missing or extra or wrong):
        return
    want = sum(math.prod(s) for s in shapes.values())
    have = sum(t.numel() for t in weights.values())
    if wrong:
        first = f"{wrong[0]} is {tuple(weights[wrong[0]].shape)} where the config asks for {tuple(shapes[wrong[0]])}"
    elif missing:
        first = f"no tensor for {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    else:
        first = f"{extra[0]} is not in the network" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
    raise UserError(
        f"{prefix}the weights do not fit its model config: the config describes {want:,} parameters, the file "
        f"holds {have:,}; {first}"
    )


def build_network(
    cfg: dict, *, where: str = "", keys: dict | None = None, weights: dict[str, torch.Tensor] | None = None
) -> nn.Module:
    """cfg: {'arch': name, **constructor arguments}. Unknown architectures and arguments, values out of range and
    networks beyond MAX_PARAMETERS are refused before anything is allocated, as are `weights` (a state dict to be
    loaded next) that do not fit. `where` (a file) prefixes the messages; `keys` renames arguments in them
    (default: the training names, resolution = dataset.resolution)."""
    shapes = network_shapes(cfg, where=where, keys=keys)
    if weights is not None:
        check_weights(shapes, weights, where)
    cls, args, check = _arguments(cfg, where, keys)
    return _construct(cls, args, check.prefix)


def drop_variance_outputs(cfg: dict, weights: dict[str, torch.Tensor], channels: int) -> dict[str, torch.Tensor]:
    """The weights of a learned-variance network (2C outputs: the mean's C, then the variances') with the
    variance outputs removed: the same network with C outputs and the same mean prediction."""
    out = dict(weights)
    if cfg.get("arch") == "unet":
        for key in ("conv_out.weight", "conv_out.bias"):
            out[key] = weights[key][:channels].clone()
        return out
    if cfg.get("arch") == "dit":
        # The final linear's rows are (patch row, patch column, channel) with the channel fastest (DiT.unpatchify).
        for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
            w = weights[key]
            per_pixel = w.reshape(-1, 2 * channels, *w.shape[1:])
            out[key] = per_pixel[:, :channels].reshape(-1, *w.shape[1:]).clone()
        return out
    raise UserError(f"model.arch={cfg.get('arch')!r}: no learned-variance outputs to remove")
