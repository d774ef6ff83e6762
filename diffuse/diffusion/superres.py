"""Super-resolution for cascaded diffusion (Ho et al. 2021, "Cascaded Diffusion Models for High Fidelity Image
Generation", sections 3 and 4.2): a model of the high-resolution image given a low-resolution one.

The low-resolution image is a linear measurement of the high-resolution one, the f x f block average
    x_low = D x_0,        D D^T = I / f^2,   P = f^2 D^T D  the projection onto block-constant images.
The model sees it after Gaussian conditioning augmentation at a level l in [0, 1]:
    z = b x_low + c e,    b^2 = g(l) = cos^2(pi l / 2),  c^2 = 1 - g(l)
(l = 0 is the image itself, l = 1 pure noise). The network reads the bilinear upsampling of z as extra input
channels and l, embedded like the timestep (LowResConditioned). Training draws l ~ U[0, aug_max] per example; sampling
fixes it. The non-truncated variant noises the previous stage's finished output at l; the truncated one stops the
previous stage's reverse process at the timestep whose alpha_bar is g(l) and hands on its x_t, which has the same law
when that stage is exact (x_t = b x_low + c e is what the forward process makes).

For x_0 from a Gaussian mixture, sum_k pi_k N(mu_k, s_k^2 I), the conditional given z is again a mixture. With
u = 1 / f^2, per component
    w_k  proportional to  pi_k N(z; b D mu_k, (b^2 s_k^2 u + c^2) I)
    m_k  = mu_k + b s_k^2 / (b^2 s_k^2 u + c^2) D^T (z - b D mu_k)
    covariance  s_k^2 c^2 / (b^2 s_k^2 u + c^2)  on P,   s_k^2  off P
(the Gaussian conditioning formulas with D D^T = u I). Its exact denoiser at x_t = a x_0 + s eps is the mixture
oracle's, taken on each of the two subspaces with its own variance (LowResOracle). A low-resolution mixture image
is itself a mixture of means D mu_k and stds s_k / f, so a cascade of oracles starts from that mixture's oracle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffuse.data.gmm import GaussianMixture
from diffuse.diffusion.schedule import Schedule

# The augmentation level's scale where the network embeds it: the sinusoidal embedding is laid out for timesteps
# in [0, 1000), so l in [0, 1] is stretched over the same range as t.
AUG_TIMESCALE = 1000.0


def downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """D x: the mean of each factor x factor block."""
    return F.avg_pool2d(x, factor) if factor > 1 else x


def spread(y: torch.Tensor, factor: int) -> torch.Tensor:
    """f^2 D^T y: each low-resolution pixel repeated over its block."""
    return y.repeat_interleave(factor, -1).repeat_interleave(factor, -2) if factor > 1 else y


def upsample(z: torch.Tensor, factor: int) -> torch.Tensor:
    """The bilinear upsampling the network reads (half-pixel centres, as images are resized)."""
    if factor == 1:
        return z
    return F.interpolate(z, scale_factor=factor, mode="bilinear", align_corners=False)


def aug_alpha_bar(level: torch.Tensor) -> torch.Tensor:
    """g(l) = cos^2(pi l / 2), float64; exactly 1 at l = 0 and 0 at l = 1."""
    level = torch.as_tensor(level, dtype=torch.float64)
    return torch.where(level >= 1, 0.0, torch.cos(0.5 * math.pi * level.clamp(0, 1)) ** 2)


def aug_level_of(alpha_bar: torch.Tensor) -> torch.Tensor:
    """The level l whose g(l) is alpha_bar (the inverse of aug_alpha_bar)."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64).clamp(0, 1)
    return torch.arccos(alpha_bar.sqrt()) * (2 / math.pi)


def augment(x_low: torch.Tensor, level: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z = sqrt(g(l)) x_low + sqrt(1 - g(l)) e, one level per example (or one for all)."""
    g = aug_alpha_bar(level).to(device=x_low.device).reshape(-1, *([1] * (x_low.dim() - 1)))
    return (g.sqrt() * x_low.to(torch.float64) + (1 - g).sqrt() * noise.to(torch.float64)).to(x_low.dtype)


class LowResConditioned:
    """A super-resolution network (in_channels = 2C, aug_embedding on) seen as F(x_t, t, y): the bilinear upsampling
    of the augmented low-resolution image z is concatenated to x_t and the level l goes to the augmentation
    embedding. Without z it cannot be called: such a model always samples given a low-resolution image."""

    def __init__(self, net, factor: int, lowres: torch.Tensor | None = None, level: torch.Tensor | None = None):
        self.net, self.factor = net, factor
        self.lowres, self.level = lowres, level

    def with_lowres(self, z: torch.Tensor, level) -> LowResConditioned:
        return LowResConditioned(self.net, self.factor, z, torch.as_tensor(level, dtype=torch.float64).reshape(-1))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        if self.lowres is None:
            raise RuntimeError(
                "a super-resolution network is called with its low-resolution image: with_lowres() first"
            )
        ctx = upsample(self.lowres.to(device=x.device, dtype=x.dtype), self.factor)
        level = self.level.to(x.device).expand(ctx.shape[0]) if self.level.numel() == 1 else self.level.to(x.device)
        if ctx.shape[0] != x.shape[0]:  # a guided batch stacks copies of the images: their context repeats alike
            reps = x.shape[0] // ctx.shape[0]
            ctx, level = ctx.repeat(reps, 1, 1, 1), level.repeat(reps)
        return self.net(torch.cat([x, ctx], dim=1), t, y, aug=(level * AUG_TIMESCALE).to(torch.float32))


def condition_lowres(denoiser, z: torch.Tensor, level):
    """A super-resolution model's denoiser told its low-resolution image z (augmented at `level`): the oracle's
    with_lowres, or a copy of a network's denoiser with its LowResConditioned network told z (whatever reads the
    network's output as eps, a prediction type or a preconditioning, stays as it was)."""
    import copy

    if isinstance(denoiser, LowResOracle):
        return denoiser.with_lowres(z, level)
    net = getattr(denoiser, "net", None)
    if not isinstance(net, LowResConditioned):
        raise TypeError(
            "condition_lowres needs a super-resolution denoiser (LowResOracle, or a network over LowResConditioned)"
        )
    told = copy.copy(denoiser)
    told.net = net.with_lowres(z, level)
    return told


def lowres_mixture(mixture: GaussianMixture, factor: int) -> GaussianMixture:
    """The law of D x_0: means D mu_k, stds s_k / f (the mean of f^2 independent pixels), the same weights."""
    return GaussianMixture(downsample(mixture.means, factor), mixture.stds / factor, mixture.weights.clone())


@dataclass
class LowResPosterior:
    """x_0 given z, per image b: sum_k weights[b, k] N(means[b, k], var_p[b, k] on P + var_q[k] off P), float64."""

    weights: torch.Tensor  # (B, K)
    means: torch.Tensor  # (B, K, C, H, W)
    var_p: torch.Tensor  # (B, K): on the block-constant subspace P
    var_q: torch.Tensor  # (K,): off it, the prior's s_k^2
    factor: int

    @property
    def dims(self) -> tuple[int, int]:
        """(dim P, dim of its complement)."""
        d = math.prod(self.means.shape[2:])
        p = d // self.factor**2
        return p, d - p


def lowres_posterior(mixture: GaussianMixture, z: torch.Tensor, level, factor: int) -> LowResPosterior:
    """The exact conditional of x_0 given its augmented low-resolution image z (B x C x h x w) at `level` (one per
    image, or one for all): the module docstring's w_k, m_k and variances."""
    zf = z.to(torch.float64)
    dev = zf.device
    g = aug_alpha_bar(level).to(dev).reshape(-1, 1)  # (B or 1, 1)
    b, c2 = g.sqrt(), 1 - g
    u = 1.0 / factor**2
    mu = mixture.means.to(dev)
    sk2 = mixture.stds.to(dev) ** 2  # (K,)
    d_mu = downsample(mu, factor).flatten(1)  # (K, d)
    den = b**2 * sk2 * u + c2  # (B, K)
    resid = zf.flatten(1)[:, None, :] - b[:, :, None] * d_mu[None]  # (B, K, d)
    d = d_mu.shape[1]
    log_w = torch.log(mixture.weights.to(dev)) - 0.5 * (resid**2).sum(2) / den - 0.5 * d * torch.log(2 * math.pi * den)
    gain = b * sk2 * u / den  # D^T carries the 1 / f^2
    shift = spread(resid.reshape(-1, *z.shape[1:]), factor).reshape(zf.shape[0], mixture.K, *mu.shape[1:])
    means = mu[None] + gain[:, :, None, None, None] * shift
    var_p = (sk2 * c2 / den).expand(zf.shape[0], -1)
    return LowResPosterior(torch.softmax(log_w, 1), means, var_p, sk2, factor)


class LowResOracle:
    """The exact denoiser of a mixture's high-resolution images given an augmented low-resolution one: the ground
    truth of a super-resolution model. E[eps | x_t, z] = sum_k r_k s V_k^{-1} (x_t - a m_k), V_k = a^2 Sigma_k + s^2 I
    (two variances, on P and off it) and r_k proportional to w_k N(x_t; a m_k, V_k). A label y = k < K fixes the
    component, as the mixture oracle does; K (the null label) leaves the mixture."""

    def __init__(
        self, mixture: GaussianMixture, schedule: Schedule, factor: int, posterior: LowResPosterior | None = None
    ):
        self.mixture, self.schedule, self.factor = mixture, schedule, factor
        self.num_classes = mixture.K
        self.posterior = posterior

    def with_lowres(self, z: torch.Tensor, level) -> LowResOracle:
        return LowResOracle(
            self.mixture, self.schedule, self.factor, lowres_posterior(self.mixture, z, level, self.factor)
        )

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        post = self.posterior
        if post is None:
            raise RuntimeError(
                "the super-resolution oracle is called with its low-resolution image: with_lowres() first"
            )
        f, K = self.factor, self.mixture.K
        ab = self.schedule.alpha_bar_at(t.to(x_t.device)).to(torch.float64).reshape(-1, 1)
        a, s2 = ab.sqrt(), 1 - ab  # (B, 1)
        xf = x_t.to(torch.float64)
        diff = xf[:, None] - a[:, :, None, None, None] * post.means.to(xf.device)  # (B, K, C, H, W)
        flat = diff.reshape(-1, *diff.shape[2:])
        on_p = spread(downsample(flat, f), f).reshape(diff.shape)  # P diff
        off_p = diff - on_p
        v_p = a**2 * post.var_p.to(xf.device) + s2  # (B, K)
        v_q = a**2 * post.var_q.to(xf.device) + s2
        dim_p, dim_q = post.dims
        sq_p, sq_q = (on_p**2).flatten(2).sum(2), (off_p**2).flatten(2).sum(2)
        log_r = (
            torch.log(post.weights.to(xf.device))
            - 0.5 * (sq_p / v_p + sq_q / v_q)
            - 0.5 * (dim_p * torch.log(v_p) + dim_q * torch.log(v_q))
        )
        if y is not None:
            y = y.to(xf.device).long()
            onehot = F.one_hot(y.clamp(max=K - 1), K).bool()
            log_r = torch.where((y < K).unsqueeze(1), torch.where(onehot, 0.0, float("-inf")), log_r)
        r = torch.softmax(log_r, 1)[:, :, None, None, None]
        eps = s2.sqrt()[:, :, None, None] * (
            r * (on_p / v_p[:, :, None, None, None] + off_p / v_q[:, :, None, None, None])
        ).sum(1)
        return eps.to(x_t.dtype)


def lowres_fit(post: LowResPosterior, index: int, samples: torch.Tensor) -> list[dict]:
    """Samples of one image's conditional (row `index` of `post`) against it, with soft assignments as
    metrics.mixture.posterior_fit: r_k(x) under the exact posterior has E[r_k] = w_k, E[r_k x] = w_k m_k, and
    E[r_k |P(x - m_k)|^2] = w_k dim(P) var_p, E[r_k |(1 - P)(x - m_k)|^2] = w_k dim(P^perp) var_q, so per component
        weight      mean of r_k (weight_se its standard error)
        mean_err    RMS over pixels of (r-weighted mean - m_k), in units of the posterior's mean std
        std_p, std_q   the r-weighted spread on P and off it, divided by the exact one
    (std_p is nan where the exact spread on P is 0: the low-resolution image was given without noise)."""
    f = post.factor
    x = samples.to(torch.float64).cpu()
    n = x.shape[0]
    w, m = post.weights[index].cpu(), post.means[index].cpu()
    vp, vq = post.var_p[index].cpu(), post.var_q.cpu()
    dim_p, dim_q = post.dims
    diff = x[:, None] - m[None]  # (n, K, C, H, W)
    flat = diff.reshape(-1, *diff.shape[2:])
    on_p = spread(downsample(flat, f), f).reshape(diff.shape)
    sq_p, sq_q = (on_p**2).flatten(2).sum(2), ((diff - on_p) ** 2).flatten(2).sum(2)
    # With a noise-free z the posterior is degenerate on P (every component puts x there exactly): only the
    # complement and the weights then tell the components apart.
    exact_p = vp <= 1e-12
    vp_safe = torch.where(exact_p, 1.0, vp)
    term_p = torch.where(exact_p, 0.0, sq_p / vp_safe + dim_p * torch.log(vp_safe))
    log_r = torch.log(w) - 0.5 * (term_p + sq_q / vq + dim_q * torch.log(vq))
    r = torch.softmax(log_r, 1)
    rows = []
    for k in range(len(w)):
        rk = r[:, k]
        total = float(rk.sum())
        row = {
            "component": k,
            "exact_weight": float(w[k]),
            "weight": total / n,
            "weight_se": float(rk.std()) / math.sqrt(n),
            "mean_err": float("nan"),
            "std_p": float("nan"),
            "std_q": float("nan"),
        }
        if total > 0 and float((rk**2).sum()) > 0 and total**2 / float((rk**2).sum()) >= 2:
            rw = rk[:, None, None, None] / total
            mean = (rw * x).sum(0)
            avg_var = (dim_p * float(vp[k]) + dim_q * float(vq[k])) / (dim_p + dim_q)
            row["mean_err"] = float(((mean - m[k]) ** 2).mean().sqrt()) / math.sqrt(avg_var)
            dev = x - mean
            dp = spread(downsample(dev, f), f)
            row["std_q"] = math.sqrt(float((rw * (dev - dp) ** 2).sum()) / (dim_q * float(vq[k])))
            if not exact_p[k]:
                row["std_p"] = math.sqrt(float((rw * dp**2).sum()) / (dim_p * float(vp[k])))
        rows.append(row)
    return rows
