"""Training losses (Ho et al. 2020 section 3.4; Hang et al. 2023; Ho et al. eq. 5 for the bound's weights; Karras et
al. 2022 for EDM's, at the end of the file).

Every weighting is expressed as a weight on the squared error of the network's own prediction target, per
sample, so one line computes the loss whatever the prediction type:

    simple   w = 1                                             L_simple of Ho et al. eq. 14 (for eps)
    min_snr  w = min(SNR_t, gamma) / SNR_t       (eps)         Min-SNR-gamma: the x0-space error weighted by
             w = min(SNR_t, gamma)               (x0)          min(SNR, gamma), converted to each target
             w = min(SNR_t, gamma) / (SNR_t + 1) (v)
    vlb      the KL term L_{t-1} of the variational bound in nats per dimension, times T (uniform t):
             beta_t^2 / (2 var_t alpha_t (1 - alpha_bar_t)) on the eps error, var_t = beta-tilde_t
             (clipped at t=0 to beta-tilde_1, as the decoder term is not a KL); 0 at t < 0, clean data

The errors convert as |x0 err|^2 = |eps err|^2 / SNR and |v err|^2 = |eps err|^2 (SNR + 1) / SNR.
"""

from __future__ import annotations

import torch

from diffuse.diffusion.bound import LN2, vlb_term
from diffuse.diffusion.consistency import t_of_sigma
from diffuse.diffusion.prediction import PREDICTIONS, edm_denoise, target, to_eps
from diffuse.diffusion.schedule import Schedule, coefficients, q_sample
from diffuse.errors import UserError

WEIGHTINGS = ("simple", "min_snr", "vlb")


def eps_space_factor(prediction: str, snr: torch.Tensor) -> torch.Tensor:
    """|target err|^2 = factor * |eps err|^2."""
    if prediction == "eps":
        return torch.ones_like(snr)
    if prediction == "x0":
        return 1.0 / snr
    return (snr + 1.0) / snr


def loss_weight(
    schedule: Schedule, t: torch.Tensor, prediction: str, weighting: str, gamma: float = 5.0
) -> torch.Tensor:
    """Per-sample weight (float64, on t's device) on the mean squared error of the prediction target."""
    if prediction not in PREDICTIONS:
        raise UserError(f"objective.prediction={prediction!r} is not allowed: choose one of {', '.join(PREDICTIONS)}")
    ab = schedule.alpha_bar_at(t)
    snr = ab / (1 - ab)
    if weighting == "simple":
        return torch.ones_like(snr)
    if weighting == "min_snr":
        # Each target's weight written out rather than divided through eps_space_factor: at t < 0 (clean data,
        # SNR = inf) these are their limits 0, gamma, 0 instead of inf / inf.
        x0_weight = snr.clamp(max=gamma)
        if prediction == "eps":
            return x0_weight / snr
        if prediction == "x0":
            return x0_weight
        return x0_weight / (snr + 1)
    if weighting == "vlb":
        # The bound has no term below t = 0; the clamp keeps t = -1 from indexing the tables' last entry,
        # torch.where (not a check) keeps the training step free of host-device syncs.
        idx = t.long().clamp(min=0)
        beta = schedule.table("betas", t.device)[idx]
        var = schedule.table("posterior_variance", t.device)
        var = torch.where(idx == 0, var[1].expand_as(beta), var[idx])
        eps_weight = beta**2 / (2 * var * (1 - beta) * (1 - ab)) * schedule.T
        return torch.where(t < 0, 0.0, eps_weight / eps_space_factor(prediction, snr))
    raise UserError(f"objective.weighting={weighting!r} is not allowed: choose one of {', '.join(WEIGHTINGS)}")


def diffusion_loss(
    net,
    x0: torch.Tensor,
    schedule: Schedule,
    *,
    prediction: str = "eps",
    weighting: str = "simple",
    min_snr_gamma: float = 5.0,
    y=None,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    learn_sigma: bool = False,
    vlb_weight: float = 0.001,
    discretized: bool = True,
) -> torch.Tensor:
    """Per-sample loss: draw t ~ U{0..T-1} and eps ~ N(0, I), noise x0, regress the network on its target.

    learn_sigma: the network outputs [target; v_raw] (2C channels) and the loss is Nichol & Dhariwal's L_hybrid,
    the weighted target error plus vlb_weight T L_t, L_t the bound's term in bits per dimension at the learned
    variance with the mean's gradient stopped (diffusion.bound.vlb_term; discretized: 8-bit data's decoder)."""
    b = x0.shape[0]
    gen_device = generator.device if generator is not None else x0.device
    if t is None:
        t = torch.randint(0, schedule.T, (b,), generator=generator, device=gen_device).to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
    x_t = q_sample(schedule, x0, t, noise)
    a, s = coefficients(schedule, t, x0)
    out = net(x_t, t, y)
    if learn_sigma:
        c = x0.shape[1]
        out, v_raw = out[:, :c], out[:, c:]
    err = (out.float() - target(prediction, x0, noise, a, s).float()).pow(2).flatten(1).mean(1)
    loss = err * loss_weight(schedule, t, prediction, weighting, min_snr_gamma).to(err.dtype)
    if learn_sigma:
        eps = to_eps(prediction, out.detach().to(x_t.dtype), x_t, a, s)
        vlb = vlb_term(x0, x_t, t, eps, v_raw, schedule, discretized=discretized) / LN2
        loss = loss + (vlb_weight * schedule.T) * vlb.to(loss.dtype)
    return loss


# -- EDM (Karras et al. 2022, section 5, eq. 8 and Table 1) ----------------------------------------------------


def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 on |D - x_0|^2: 1 / c_out^2, so that the weight on F's own
    error is 1 at every noise level (what makes F's target unit-variance matter)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_sigmas(
    n: int,
    generator: torch.Generator | None,
    *,
    p_mean: float,
    p_std: float,
    sigma_min: float,
    sigma_max: float,
    device=None,
) -> torch.Tensor:
    """n training noise levels, ln sigma ~ N(P_mean, P_std^2) (float64, on the generator's device), clamped to the
    schedule's [sigma_min, sigma_max]: outside it the process has no timestep for F's time input, and the samplers
    never ask there."""
    z = torch.randn((n,), generator=generator, device=device, dtype=torch.float64)
    return (p_mean + p_std * z).exp().clamp(sigma_min, sigma_max)


def edm_loss(
    net,
    x0: torch.Tensor,
    schedule: Schedule,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    *,
    sigma_data: float = 0.5,
    y=None,
) -> torch.Tensor:
    """Per-sample lambda(sigma) |D(x_0 + sigma eps; sigma) - x_0|^2 (mean over pixels), Karras et al. eq. 8, at
    the given levels sigma (B,) and noise eps; F's time input is the fractional timestep of each sigma."""
    t = t_of_sigma(schedule, sigma)
    s = sigma.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
    d = edm_denoise(net, x0 + s * noise, s, t, y, sigma_data=sigma_data)
    err = (d.float() - x0.float()).pow(2).flatten(1).mean(1)
    return err * edm_weight(sigma, sigma_data).to(err.dtype)
