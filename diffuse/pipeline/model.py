"""A checkpoint, or the exact mixture oracle, as a denoiser with what it takes to sample it (`Model`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from diffuse.checkpoint import (
    Checkpoint,
    check_verify,
    check_weights,
    complete_config,
    load_checkpoint,
    resolve_ckpt_path,
)
from diffuse.diffusion.prediction import EDMDenoiser, NetworkDenoiser
from diffuse.diffusion.schedule import Schedule, make_schedule
from diffuse.errors import UserError
from diffuse.pipeline.runtime import Runtime, inference_network
from diffuse.validate import check_flag

SCHEDULE_KEYS = {
    "T",
    "beta_start",
    "beta_end",
    "cosine_s",
    "sigmoid_start",
    "sigmoid_end",
    "sigmoid_tau",
    "max_beta",
    "scale_with_T",
}
# The longest schedule a config may ask for. Published discrete schedules have T <= 4000 (Nichol & Dhariwal's
# longest); continuous-time samplers use fractional t, not a larger T. Every table is float64 and there are
# about ten, so 10^5 is 8 MB; a crafted T = 10^9 would be 80 GB.
MAX_T = 100_000


@dataclass(frozen=True)
class Model:
    """What every command samples from: `denoiser(x_t, t, y) -> eps` under `schedule`, for images of `shape`."""

    denoiser: Callable
    schedule: Schedule
    shape: tuple[int, int, int]  # C, H, W
    num_classes: int | None  # class-conditional: labels 0..K-1, and K the null label of guidance
    clip_x0: bool  # the samplers' default clipping of x0 to [-1, 1]: on for 8-bit image data
    source: dict  # {"model": "oracle"}, or {"ckpt": path, "step": n}: recorded beside what it makes
    tuned: dict = dataclasses.field(
        default_factory=dict
    )  # noise-level schedules tuned for it, "sampler/steps" -> levels
    sampling: dict = dataclasses.field(
        default_factory=dict
    )  # how it was made to be sampled: {"sampler", "steps"} (a distilled student)
    # A learn_sigma network's variance channels, (x_t, t, y) -> v_raw (diffusion.bound): ancestral sampling and the
    # bound use them; None for fixed variances.
    learned_variance: Callable | None = None
    lowres: dict = dataclasses.field(
        default_factory=dict
    )  # a super-resolution model's checked condition (pipeline.cascade)
    autoencoder: Any = (
        None  # a latent model's LatentCodec (pipeline/latent.py): shape is the latents', decode() makes images
    )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The shape of the images it makes: shape itself, or a latent model's decoded latents."""
        return self.autoencoder.image_shape(self.shape[-1]) if self.autoencoder is not None else self.shape

    @property
    def decode(self) -> Callable | None:
        return self.autoencoder.decode if self.autoencoder is not None else None

    @property
    def is_oracle(self) -> bool:
        return self.source.get("model") == "oracle"

    def with_denoiser(self, denoiser: Callable) -> Model:
        return dataclasses.replace(self, denoiser=denoiser)


@dataclass(frozen=True)
class TrainedNetwork:
    """A diffuse checkpoint's network (EMA weights unless asked otherwise) and what it was trained with."""

    net: nn.Module
    schedule: Schedule
    prediction: str
    config: dict

    @property
    def is_8bit(self) -> bool:
        return self.config["data"]["is_8bit"]

    @property
    def mask_conditioned(self) -> bool:
        return self.config["objective"]["mask_training"]

    @property
    def learn_sigma(self) -> bool:
        return self.config["objective"]["learn_sigma"]

    @property
    def image_channels(self) -> int:
        """The channels of the images it makes: a learn_sigma network outputs twice as many (its variances)."""
        return self.net.out_channels // 2 if self.learn_sigma else self.net.out_channels


def schedule_from_config(cfg: dict | None, where: str = "") -> Schedule:
    """A Schedule from a `schedule` config (or a checkpoint's copy of one, `where` naming the file): unknown keys,
    non-numbers and a T beyond MAX_T are refused before any table is computed."""
    prefix = f"{where}: " if where else ""
    if cfg is not None and not isinstance(cfg, dict):
        raise UserError(f"{prefix}the schedule config is {type(cfg).__name__}, not a mapping of schedule.* keys")
    cfg = dict(cfg or {})
    kind = cfg.pop("kind", None)
    unknown = sorted(set(cfg) - SCHEDULE_KEYS)
    if unknown:
        raise UserError(
            f"{prefix}schedule.{unknown[0]} is not a schedule option: "
            f"allowed are kind, {', '.join(sorted(SCHEDULE_KEYS))}"
        )
    for key, val in cfg.items():
        if key == "scale_with_T":
            check_flag(f"{prefix}schedule.scale_with_T", val)
        elif key == "T":
            if isinstance(val, bool) or not isinstance(val, int) or not 2 <= val <= MAX_T:
                raise UserError(
                    f"{prefix}schedule.T={val!r} is not allowed: it must be an integer from 2 to {MAX_T:,} "
                    "(the number of noise levels)"
                )
        elif isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
            raise UserError(f"{prefix}schedule.{key}={val!r} is not allowed: it must be a finite number")
    try:
        return make_schedule(kind, **cfg)
    except UserError as e:
        if not prefix:
            raise
        raise UserError(f"{prefix}{e}") from None


def network_from_checkpoint(
    ckpt: Checkpoint, use_ema: bool = True, where: str = "the checkpoint", superres: bool = False
) -> TrainedNetwork:
    """The network, schedule and prediction type a checkpoint (`where`: its file, for the messages) describes.
    Its config is user input: it is checked, the schedule bounded, and the network's shapes (on the meta device)
    compared with the weights in the file before the network is allocated. A super-resolution model (condition=lowres)
    is refused unless `superres`: it samples only given a low-resolution image."""
    from diffuse.nets import build_network

    check_is_diffusion(ckpt.config, where)
    conf = complete_config(ckpt.config)
    prediction = check_objective(conf, where)
    schedule = schedule_from_config(conf["schedule"], where=where)
    if conf.get("condition") is not None and not superres:
        from diffuse.pipeline.condition import superres_refusal

        raise superres_refusal(conf, where)
    weights = ckpt.ema if (use_ema and ckpt.ema) else ckpt.model
    check_weights(weights, where, "ema." if weights is ckpt.ema else "model.")
    net = build_network(conf["model"], where=where, keys={}, weights=weights)
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{where}: the weights do not fit its model config: {first}") from None
    tn = TrainedNetwork(net, schedule, prediction, conf)
    if tn.learn_sigma and (
        net.out_channels % 2 or (tn.mask_conditioned and net.out_channels != 2 * ((net.in_channels - 1) // 2))
    ):
        raise UserError(
            f"{where}: objective.learn_sigma=true but the network has {net.out_channels} output channels, "
            "not twice its image channels"
        )
    return tn


def check_is_diffusion(conf: Any, where: str) -> None:
    """A checkpoint's config is a diffusion model's: a model and a schedule, no classifier or autoencoder, and its
    objective and data mappings."""
    if not isinstance(conf, dict) or "model" not in conf:
        raise UserError(f"{where}: its config lacks model/schedule: not a diffuse training checkpoint")
    if isinstance(conf["model"], dict) and conf["model"].get("arch") == "classifier":
        raise UserError(
            f"{where} is a classifier (diffuse train-classifier), not a diffusion model: use it as "
            "guidance.classifier= or metrics.features_ckpt= with metrics.features=classifier"
        )
    # before the schedule check: a converted autoencoder has no schedule, and what it is says more than what it lacks
    if isinstance(conf["model"], dict) and conf["model"].get("arch") in ("autoencoder", "taesd"):
        raise UserError(
            f"{where} is an autoencoder (diffuse train-ae or convert), not a diffusion model: diffuse in its "
            "latent space with diffuse train autoencoder=FILE"
        )
    if "schedule" not in conf:
        raise UserError(f"{where}: its config lacks model/schedule: not a diffuse training checkpoint")
    for part in ("objective", "data"):
        if not isinstance(conf.get(part) or {}, dict):
            raise UserError(f"{where}: its config's {part} is {type(conf[part]).__name__}, not a mapping")


def check_objective(conf: dict, where: str) -> str:
    """A checkpoint's objective (what it predicts, its kind and switches) and data.is_8bit checked: its prediction.
    `conf` is complete (checkpoint.complete_config: what an older checkpoint lacks, it trained with the default)."""
    from diffuse.diffusion.prediction import PREDICTIONS

    objective = conf["objective"]
    prediction = objective["prediction"]
    if prediction not in PREDICTIONS:
        raise UserError(
            f"{where}: objective.prediction={prediction!r} is not allowed: choose one of {', '.join(PREDICTIONS)}"
        )
    kind = objective["kind"]
    if kind not in ("diffusion", "consistency", "edm"):
        raise UserError(f"{where}: objective.kind={kind!r} is not allowed: choose one of diffusion, consistency, edm")
    sigma_data = objective.get("sigma_data")  # only edm and consistency have one
    if kind != "diffusion" and (
        isinstance(sigma_data, bool)
        or not isinstance(sigma_data, (int, float))
        or not math.isfinite(sigma_data)
        or sigma_data <= 0
    ):
        raise UserError(f"{where}: objective.sigma_data={sigma_data!r} is not allowed: it must be a number > 0")
    for key in ("mask_training", "learn_sigma"):
        if objective[key] not in (True, False):
            raise UserError(f"{where}: objective.{key}={objective[key]!r} is not allowed: true or false")
    if objective["learn_sigma"] and kind != "diffusion":
        raise UserError(
            f"{where}: objective.learn_sigma=true with objective.kind={kind}: "
            "learned variances are for diffusion models"
        )
    if conf["data"]["is_8bit"] not in (True, False):
        raise UserError(f"{where}: data.is_8bit={conf['data']['is_8bit']!r} is not allowed: true or false")
    return prediction


def load_model(
    *,
    ckpt: Any,
    model: dict | None,
    dataset: dict | None,
    schedule: dict | None,
    use_ema: bool,
    runtime: Runtime,
    verify: Any = True,
    superres: bool = False,
    autoencoder: Any = None,
) -> Model:
    """`ckpt=` (a file or training run dir), or `model=oracle` with its mixture (`dataset`) and `schedule`.
    verify=false lets a checkpoint that carries no hash load, said in a warning and in Model.source. `superres`: a
    super-resolution checkpoint is wanted (cascade, upsample), and loads with its LowResConditioned network. A latent
    model loads the autoencoder its checkpoint records (`autoencoder`: another path to that same file)."""
    verify = check_verify(verify)
    if ckpt in (None, ""):
        if not model:
            raise UserError(
                "ckpt= is required: a .safetensors checkpoint or a training run dir "
                "(or model=oracle for the exact mixture)"
            )
        if model.get("arch") != "oracle":
            raise UserError(
                f"model={model.get('arch')!r} without ckpt=: only model=oracle samples without a checkpoint"
            )
        return oracle_model(dataset, schedule)
    if model:
        raise UserError(
            f"ckpt= and model={model.get('arch')!r} cannot both be given: a checkpoint carries its own model"
        )
    if schedule:
        raise UserError(
            "schedule= cannot be changed when sampling a checkpoint: it is the one the model was trained with"
        )
    return checkpoint_model(ckpt, use_ema, runtime, verify, superres, autoencoder)


def checkpoint_model(
    ckpt: Any, use_ema: bool, runtime: Runtime, verify: Any, superres: bool, autoencoder: Any
) -> Model:
    """load_model's checkpoint: its network wrapped for inference (and for its low-resolution or mask input)."""
    path = resolve_ckpt_path(ckpt)
    loaded = load_checkpoint(path, verify=verify)
    tn = network_from_checkpoint(loaded, use_ema=use_ema, where=str(path), superres=superres)
    runner = inference_network(tn.net, runtime)
    lowres = {}
    if tn.config.get("condition") is not None:
        from diffuse.diffusion.superres import LowResConditioned
        from diffuse.pipeline.condition import check_condition

        lowres = check_condition(tn.config["condition"], tn.net.resolution, where=str(path)) or {}
        if lowres:
            runner = LowResConditioned(runner, lowres["factor"])
    if tn.mask_conditioned:
        from diffuse.diffusion.inpainting import MaskConditioned

        # A mask-conditioned network: told that nothing is known it samples; inpaint gives it the known pixels.
        runner = MaskConditioned(runner)
    den = denoiser_of(runner, tn, runtime.autocast)
    source = {"ckpt": str(path), "step": loaded.step}
    if loaded.verified != "all":  # what made the outputs says that its checkpoint was not (wholly) verified
        source["ckpt_verified"] = loaded.verified
    sampling = tn.config.get("sampling") if isinstance(tn.config.get("sampling"), dict) else {}
    learned = den.variance_output if tn.learn_sigma else None
    return Model(
        den,
        tn.schedule,
        (tn.image_channels, tn.net.resolution, tn.net.resolution),
        tn.net.num_classes,
        tn.is_8bit,
        source,
        loaded.tuned,
        sampling,
        learned,
        lowres=lowres,
        autoencoder=latent_codec(tn.config, autoencoder, runtime, str(path), source),
    )


def latent_codec(config: dict, override: Any, runtime: Runtime, where: str, source: dict):
    """The LatentCodec a latent checkpoint's config records, its path added to `source` (None for a pixel model, for
    which `override` is refused: it has no latent space)."""
    rec = config.get("autoencoder")
    if rec is None:
        if override not in (None, ""):
            raise UserError(f"autoencoder={override} is not allowed: {where} is a pixel-space model, not a latent one")
        return None
    scale = rec.get("scale_factor") if isinstance(rec, dict) else None
    if (
        not isinstance(rec, dict)
        or not isinstance(rec.get("path"), str)
        or not isinstance(rec.get("hash"), str)
        or isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise UserError(
            f"{where}: its config's autoencoder record is malformed (path, hash and a scale_factor > 0 are needed)"
        )
    from diffuse.pipeline.latent import load_autoencoder

    codec = load_autoencoder(
        override if override not in (None, "") else rec["path"],
        expected=rec["hash"],
        scale_factor=float(scale),
        device=runtime.device,
        autocast=runtime.autocast,
    )
    source["autoencoder"] = codec.path
    return codec


def denoiser_of(net, tn: TrainedNetwork, autocast=None):
    """The denoiser of a trained network: a consistency model's (its f read as eps), an EDM-preconditioned one's
    (D read as eps) or a diffusion model's, as its checkpoint's objective.kind says."""
    o = tn.config["objective"]
    if o["kind"] == "consistency":
        from diffuse.diffusion.consistency import ConsistencyDenoiser

        return ConsistencyDenoiser(net, tn.prediction, tn.schedule, float(o["sigma_data"]), autocast_dtype=autocast)
    if o["kind"] == "edm":
        return EDMDenoiser(net, tn.schedule, float(o["sigma_data"]), autocast_dtype=autocast)
    return NetworkDenoiser(net, tn.prediction, tn.schedule, autocast_dtype=autocast, learn_sigma=tn.learn_sigma)


def oracle_model(dataset: dict | None, schedule: dict | None) -> Model:
    """The exact denoiser of the Gaussian mixture `dataset` (dataset=gmm) under `schedule`."""
    from diffuse.data import build_mixture
    from diffuse.diffusion.oracle import GMMDenoiser

    if not dataset or dataset.get("name") != "gmm":
        raise UserError(f"model=oracle needs dataset=gmm (got dataset={(dataset or {}).get('name')!r})")
    sched = schedule_from_config(schedule)
    mixture = build_mixture(dataset)
    return Model(GMMDenoiser(mixture, sched), sched, tuple(mixture.shape), mixture.K, False, {"model": "oracle"})
