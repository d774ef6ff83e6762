"""The exact denoiser of a Gaussian mixture: ground truth for samplers, guidance, inpainting and likelihood.

With x_t = a x_0 + s eps (a^2 = alpha_bar_t, s^2 = 1 - alpha_bar_t) and x_0 ~ sum_k pi_k N(mu_k, s_k^2 I):
    x_t | k ~ N(a mu_k, v_k I),  v_k = a^2 s_k^2 + s^2
    E[eps | x_t, k] = s (x_t - a mu_k) / v_k
    E[eps | x_t]    = sum_k r_k(x_t) E[eps | x_t, k],  r_k proportional to pi_k N(x_t; a mu_k, v_k I)
Conditioning on a label y = k fixes r to the one-hot of k; the label K (the "null" class) leaves the mixture.
Computed in float64 whatever the input dtype.
"""

from __future__ import annotations

from typing import Optional

import torch

from diffuse.data.gmm import GaussianMixture
from diffuse.diffusion.schedule import Schedule


class GMMDenoiser:
    def __init__(self, mixture: GaussianMixture, schedule: Schedule):
        self.mixture = mixture
        self.schedule = schedule
        self.num_classes = mixture.K

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
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
