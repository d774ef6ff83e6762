"""The commands that run a Hydra job, as one table: each one's name, its config (conf/NAME.yaml), its task module
(diffuse/tasks/: run, check, OUTPUTS), its --help text and its options, each handed to Hydra as one override. cli.py
registers every row, in this order; convert and export run no Hydra job: their rows name no config, and cli.py
gives them their own functions."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    """A Typer option whose value becomes the override KEY='VALUE' (repeat: KEY=['A','B'])."""

    key: str
    flag: str
    help: str
    required: bool = True
    repeat: bool = False
    metavar: str | None = None

    def override(self, value) -> str | None:
        if value in (None, [], ()):
            return None
        if self.repeat:
            return f"{self.key}=[{','.join(hydra_str(v) for v in value)}]"
        return f"{self.key}={hydra_str(value)}"


@dataclass(frozen=True)
class Command:
    name: str  # as typed: diffuse NAME
    config: str | None  # conf/CONFIG.yaml, Hydra's config name; None: a command of cli.py's own, not a Hydra job
    task: str | None  # the module under diffuse.tasks that runs the job
    help: str
    options: tuple[Option, ...] = ()


def hydra_str(v: str) -> str:
    """A value quoted for a Hydra override: any path or name passes through unparsed."""
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


COMMANDS = (
    Command(
        "train",
        "train",
        "train",
        """Train a diffusion model.

        Examples:

          diffuse train experiment=quickstart

          diffuse train model=small objective=min_snr trainer.steps=20000 runtime.device=cuda:1

          diffuse train resume=true hydra.run.dir=outputs/train/2026-01-01_12-00-00

        Writes checkpoints/last.safetensors, metrics.jsonl and sample grids into its run dir.
        """,
    ),
    Command(
        "train-classifier",
        "train_classifier",
        "train_classifier",
        """Train a noise-aware classifier p(y | x_t, t), for classifier guidance and as a feature extractor.

        Examples:

          diffuse train-classifier dataset=fashion_mnist dataset.resolution=32 dataset.fit=pad trainer.steps=3000

          diffuse sample ckpt=RUN guidance=classifier guidance.classifier=CLASSIFIER_RUN guidance.scale=2 label=3

          diffuse eval --metric fid ckpt=RUN metrics.features=classifier metrics.features_ckpt=CLASSIFIER_RUN

        Writes checkpoints/last.safetensors, metrics.jsonl (loss, accuracy) and accuracy.json (held-out accuracy at
        accuracy_t) into its run dir; resume=true hydra.run.dir=RUN continues it.
        """,
    ),
    Command(
        "train-ae",
        "train_ae",
        "train_ae",
        """Train a KL autoencoder, whose latent space `diffuse train autoencoder=RUN` diffuses in (latent diffusion).

        Examples:

          diffuse train-ae dataset=shapes dataset.resolution=32 trainer.steps=1500

          diffuse train-ae dataset=folder dataset.path=imgs/ dataset.resolution=256 autoencoder=kl_f8 runtime.device=cuda

          diffuse train autoencoder=outputs/train_ae/RUN dataset=shapes dataset.resolution=32 model=dit_s

        Writes checkpoints/last.safetensors, metrics.jsonl (loss, recon), ae.json (held-out reconstruction PSNR) and
        reconstructions.png into its run dir; resume=true hydra.run.dir=RUN continues it.
        """,
    ),
    Command(
        "sample",
        "sample",
        "sample",
        """Draw samples from a trained model (or the exact mixture oracle).

        Examples:

          diffuse sample ckpt=outputs/train/RUN n=64 steps=50 sampler=ddim seed=0

          diffuse sample model=oracle sampler=dpm_solver steps=10 n=256 save_npz=true

          diffuse sample -m ckpt=RUN sampler=ddim,ddpm steps=20,50

        Writes grid.png, images/NNNNNN.png and (save_npz=true) samples.npz into its run dir.
        """,
    ),
    Command(
        "inpaint",
        "inpaint",
        "inpaint",
        """Fill the masked region of images with a trained model (or the exact mixture oracle).

        repaint drives the ddpm or ddim step; replace and conditioned work with any sampler.

        Examples:

          diffuse inpaint --image photo.png --mask mask.png ckpt=outputs/train/RUN n=4

          diffuse inpaint --image imgs/ --mask mask.png model=oracle inpaint=replace sampler=dpm_solver

          diffuse inpaint --image photo.png --mask mask.png ckpt=RUN_TRAINED_WITH_MASKS inpaint=conditioned

        Writes NAME_NN.png results and NAME_strip.png (original | masked | results) into its run dir.
        """,
        (
            Option("image", "--image", "an image file, or a folder of images"),
            Option(
                "mask", "--mask", "a mask (white = generate, black = keep), or a folder of masks with matching names"
            ),
        ),
    ),
    Command(
        "edit",
        "edit",
        "edit",
        """Edit images with a trained model (or the exact mixture oracle): SDEdit, or DDIM inversion and regeneration.

        sdedit noises each image to t0 = edit.strength * T and runs any sampler from there; invert finds its DDIM
        latent at t0 and regenerates it with label= or guidance.scale= (deterministic samplers).

        Examples:

          diffuse edit --image photo.png ckpt=outputs/train/RUN edit.strength=0.5 n=4

          diffuse edit --image imgs/ ckpt=RUN edit=invert label=2 guidance.scale=3

          diffuse edit --image photo.png --mask region.png ckpt=RUN sampler=ddpm steps=200

        Writes NAME_NN.png edits, grid.png (input | edits, one row per image) and edit.json (with the NFE) into its
        run dir; samples.npz with save_npz=true.
        """,
        (
            Option("image", "--image", "an image file, or a folder of images"),
            Option(
                "mask",
                "--mask",
                "optional: the region to edit (white = edit, black = keep), or a folder of masks with matching names",
                required=False,
            ),
        ),
    ),
    Command(
        "upsample",
        "upsample",
        "upsample",
        """Super-resolve images with a model trained with condition=lowres (a cascade's super-resolution stage).

        Examples:

          diffuse upsample ckpt=outputs/train/SR_RUN --image small.png n=4

          diffuse upsample ckpt=SR_RUN --image imgs/ condition.aug_level=0.2 sampler=dpm_solver steps=20

        Writes NAME_NN.png results, grid.png (each input enlarged, then its results) and upsample.json into its run dir.
        """,
        (Option("image", "--image", "an image file, or a folder of images, at the model's low resolution"),),
    ),
    Command(
        "convert",
        None,
        None,
        """Import pretrained weights as a diffuse checkpoint.

        diffuse convert --from diffusers PATH_OR_DIR --out FILE.safetensors

        Maps a diffusers UNet2DModel of Ho et al.'s DDPM architecture (e.g. google/ddpm-cifar10-32: config.json and
        diffusion_pytorch_model.safetensors; pickled .bin files are refused) onto diffuse's U-Net, with its linear
        schedule and eps prediction, so that `diffuse sample ckpt=FILE.safetensors` draws from it. An AutoencoderKL
        folder (the Stable Diffusion VAE family, or a pipeline folder holding only vae/) or an AutoencoderTiny one
        (TAESD) becomes an autoencoder checkpoint for `diffuse train autoencoder=FILE.safetensors`.

        diffuse convert --from improved-diffusion MODEL.safetensors --out FILE.safetensors --resolution 32
        --schedule cosine [--T 4000] [--heads 4 | --head-channels 64] [--attention-order legacy|new]
        [--rescale-timesteps | --no-rescale-timesteps] [--prediction eps|x0]

        Maps Nichol & Dhariwal's U-Net (improved-diffusion, or guided-diffusion's with --from guided-diffusion), learned
        variances included, from a safetensors state dict (their .pt pickles are refused: save the state dict with
        safetensors first); the flags the weights cannot tell are the options marked ADM.
        """,
    ),
    Command(
        "export",
        None,
        None,
        """Export a checkpoint for another toolkit.

        diffuse export --to diffusers --ckpt FILE|RUN_DIR --out DIR [--no-ema]

        Writes a diffusers pipeline folder (model_index.json, unet/ as a UNet2DModel in safetensors, scheduler/ with
        the model's betas and prediction type) that DDPMPipeline.from_pretrained(DIR) loads. A network diffusers
        cannot express (DiT, EDM or consistency parameterisation, conditioning inputs, latent models) is refused;
        learned variances export as variance_type="learned_range".
        """,
    ),
    Command(
        "distill",
        "distill",
        "distill",
        """Distil a teacher into a few-step student: progressive distillation, consistency distillation or tuning.

        Examples:

          diffuse distill teacher=outputs/train/RUN method=progressive distill.start_steps=64 distill.target_steps=4

          diffuse distill teacher=oracle model=tiny method=consistency trainer.steps=4000

        Writes checkpoints (each progressive round's student as checkpoints/student_Nsteps.safetensors) that record
        their method, teacher and steps: diffuse sample ckpt=RUN (progressive: DDIM at the student's steps;
        consistency, ect: sampler=consistency steps=1|2|4).
        """,
    ),
    Command(
        "tune-schedule",
        "tune_schedule",
        "tune_schedule",
        """Choose the N noise levels of a solver for one model: closest to a high-NFE reference from the same x_T.

        Examples:

          diffuse tune-schedule ckpt=outputs/train/RUN sampler=dpm_solver_3m steps=10

          diffuse tune-schedule model=oracle sampler=unipc steps=8 n=512

        Writes schedule.json and levels.png into its run dir and the schedule into the checkpoint's metadata; then
        diffuse sample ckpt=RUN sampler=SAME steps=N sampler.schedule=tuned uses it (model=oracle:
        sampler.schedule=RUN_DIR/schedule.json).
        """,
    ),
    Command(
        "eval",
        "eval",
        "evaluate",
        """Score samples with FID, KID and the Inception Score against reference data, or a model's likelihood.

        Examples:

          diffuse eval --metric fid --metric kid ckpt=outputs/train/RUN ref=cifar10 n=50000

          diffuse eval -m --metric fid ckpt=RUN ref=cifar10 sampler=ddim,dpm_solver steps=10,20,50

          diffuse eval --metric bpd ckpt=RUN dataset=cifar10 likelihood.n=1000   (test split, bits/dim: bound and ODE)

        Writes metrics.json into its run dir; a sweep also writes summary.csv, summary.md and plots in its sweep dir.
        """,
        (
            Option(
                "metric",
                "--metric",
                "fid, kid, is, fd, pr, dc, bpd or nll; repeat for several (default: fid)",
                required=False,
                repeat=True,
                metavar="NAME",
            ),
            Option(
                "save_ref",
                "--save-ref",
                "write the reference statistics to this .safetensors file",
                required=False,
                metavar="PATH",
            ),
        ),
    ),
)

BY_NAME = {c.name: c for c in COMMANDS}
