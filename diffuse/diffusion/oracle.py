"""The exact denoiser of a Gaussian mixture: ground truth for samplers, guidance, inpainting and likelihood.

With x_t = a x_0 + s eps (a^2 = alpha_bar_t, s^2 = 1 - alpha_bar_t) and x_0 ~ sum_k pi_k N(mu_k, s_k^2 I):
    x_t | k ~ N(a mu_k, v_k I),  v_k = a^2 s_k^2 + s^2
    E[eps | x_t, k] = s (x_t - a mu_k) / v_k
    E[eps | x_t]    = sum_k r_k(x_t) E[eps | x_t, k],  r_k proportional to pi_k N(x_t; a mu_k, v_k I)
Conditioning on a label y = k fixes r to the one-hot of k; the label K (the "null" class) leaves the mixture.
Computed in float64 whatever the input dtype.

The responsibilities are also the exact classifier of the noised images, p(k | x_t) = r_k(x_t) (`GMMClassifier`):
classifier guidance at scale 1 with it turns the unconditional denoiser into the conditional one exactly.
"""

from __future__ import annotations

import torch

from diffuse.data.gmm import GaussianMixture
from diffuse.diffusion.schedule import Schedule


class GMMDenoiser:
    def __init__(self, mixture: GaussianMixture, schedule: Schedule):
        self.mixture = mixture
        self.schedule = schedule
        self.num_classes = mixture.K

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        m = self.mixture
        ab = self.schedule.alpha_bar_at(t.to(x_t.device)).to(torch.float64).reshape(-1, 1)
        a, s2 = ab.sqrt(), 1 - ab
        xf = x_t.to(torch.float64).flatten(1)
        mu = m.means.to(xf.device).flatten(1)
        v = a**2 * m.stds.to(xf.device) ** 2 + s2  # (B, K)
        log_r = m.component_log_probs(xf, s2, a)
        if y is not None:
            y = y.to(xf.device).long()
            onehot = torch.nn.functional.one_hot(y.clamp(max=m.K - 1), m.K).bool()
            cond = (y < m.K).unsqueeze(1)
            log_r = torch.where(cond, torch.where(onehot, 0.0, float("-inf")), log_r)
        r = torch.softmax(log_r, dim=1)  # (B, K)
        # sum_k r_k s (x - a mu_k) / v_k, written without a (B, K, D) tensor.
        w = r / v
        eps = s2.sqrt() * (w.sum(1, keepdim=True) * xf - a * (w @ mu))
        return eps.reshape(x_t.shape).to(x_t.dtype)


class GMMClassifier:
    """The exact noise-aware classifier of a mixture: log p(k | x_t) = log r_k(x_t), and its gradient in closed form,

    grad_x log p(y | x_t) = g_y - sum_k r_k g_k,   g_k = grad_x log N(x_t; a mu_k, v_k I) = -(x_t - a mu_k) / v_k
    """

    def __init__(self, mixture: GaussianMixture, schedule: Schedule):
        self.mixture = mixture
        self.schedule = schedule
        self.num_classes = mixture.K

    def _terms(self, x_t: torch.Tensor, t: torch.Tensor):
        m = self.mixture
        ab = self.schedule.alpha_bar_at(t.to(x_t.device)).to(torch.float64).reshape(-1, 1)
        a, s2 = ab.sqrt(), 1 - ab
        xf = x_t.to(torch.float64).flatten(1)
        v = a**2 * m.stds.to(xf.device) ** 2 + s2  # (B, K)
        return xf, a, v, torch.log_softmax(m.component_log_probs(xf, s2, a), dim=1)

    def log_probs(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B, K) float64: log p(k | x_t)."""
        return self._terms(x_t, t)[3]

    def grad(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """grad_x log p(y | x_t), in x_t's shape and dtype."""
        xf, a, v, log_r = self._terms(x_t, t)
        mu = self.mixture.means.to(xf.device).flatten(1)
        w = log_r.exp() / v  # r_k / v_k
        mean_g = -(w.sum(1, keepdim=True) * xf - a * (w @ mu))  # sum_k r_k g_k, without a (B, K, D) tensor
        y = y.to(xf.device).long()
        g_y = -(xf - a * mu[y]) / v.gather(1, y.view(-1, 1))
        return (g_y - mean_g).reshape(x_t.shape).to(x_t.dtype)
