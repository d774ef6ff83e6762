"""Likelihood of data under a diffusion model, per example: the variational bound and the probability-flow ODE.

    vlb.vlb_nll / vlb_bpd   the discrete-time variational bound of Ho et al. 2020, eq. 5:
                                L = L_T + sum_{t>1} L_{t-1} + L_0
                            with the discretized Gaussian decoder of their section 3.3 for 8-bit data (bpd) or a
                            Gaussian decoder density for continuous data (nll). All T terms are summed exactly;
                            each is one denoiser call at a fresh x_t ~ q(x_t | x_0).
    ode.ode_nll / ode_bpd   the probability-flow ODE of Song et al. 2021 (section 4.3 and appendix D.2): the
                            instantaneous change of variables along the deterministic path from the data to the
                            prior, with the Hutchinson trace estimator; 8-bit data is dequantized uniformly.
    scoring.score           a held-out set scored by either or both, sharded over ranks, for diffuse eval.
    units                   the 8-bit grid, dequantization, the discretized decoder and the nats -> bits constants.

*_nll are nats per dimension of continuous data in the model's [-1, 1] units; *_bpd are bits per dimension of
8-bit data (x in [-1, 1] on the grid 2k/255 - 1, as images.from_uint8 makes it). Every function takes the one
denoiser interface `denoiser(x_t, t, y) -> eps` and a Schedule, and returns a (N,) float64 tensor on the CPU.
Randomness comes from `generator` (a torch.Generator, or a PerSample one: then example i's draws depend only on
(seed, i), whatever the batch); `progress(done, total)` is called after each chunk of timesteps or ODE step.

Timesteps follow schedule.py: index t = 0..T-1 is the paper's t+1, so the KL terms are at t = 1..T-1, the decoder
L_0 is the denoiser at t = 0, and the prior term L_T is at t = T-1.
"""
