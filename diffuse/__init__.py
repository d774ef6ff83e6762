"""diffuse: train, sample, inpaint and evaluate denoising diffusion models."""

__version__ = "0.1.0"
