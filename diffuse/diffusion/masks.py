"""Random masks for mask-conditioned training (objective.mask_training): which pixels the model must generate.

A mask is an (N, 1, H, W) float tensor, 1 = generate, 0 = known (the CLI's white = generate). Kinds:

    boxes    the union of 1 to 3 axis-aligned rectangles, each side a uniform fraction in [0.2, 0.5] of the image's
    strokes  a free-form brush stroke (in the spirit of Yu et al. 2019's free-form masks): a random walk of
             4 segments drawn with a round brush of radius 5-12% of the image side (at least one pixel)
    half     one half of the image: left, right, top or bottom
    none     nothing known (all ones): the model also learns to generate from scratch, which `diffuse sample`
             relies on

Each mask's kind is drawn with the configured probabilities. A call consumes the same number of draws from
the generator whatever the kinds' probabilities (the parameters of every kind are drawn for every mask; only
the chosen kind is rendered), so the random stream of a run, and its exact resume, depend only on (n, H, W).
"""

from __future__ import annotations

import math

import torch

from diffuse.errors import UserError

MASK_KINDS = ("boxes", "strokes", "half", "none")
MAX_BOXES = 3
BOX_SIDE = (0.2, 0.5)
STROKE_SEGMENTS = 4
STROKE_LENGTH = (0.15, 0.4)  # of the image side, per segment
STROKE_RADIUS = (0.05, 0.12)  # of the image side


def check_mask_kinds(kinds) -> torch.Tensor:
    """objective.mask_kinds ({kind: probability}) -> probabilities in MASK_KINDS order (float64, sum 1)."""
    if not isinstance(kinds, dict) or not kinds:
        raise UserError(
            f"objective.mask_kinds={kinds!r} is not allowed: give probabilities of {', '.join(MASK_KINDS)}, e.g. {{boxes: 0.5, half: 0.5}}"
        )
    probs = []
    for kind in kinds:
        if kind not in MASK_KINDS:
            raise UserError(f"objective.mask_kinds.{kind} is not a mask kind: choose among {', '.join(MASK_KINDS)}")
    for kind in MASK_KINDS:
        p = kinds.get(kind, 0.0)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p < 0:
            raise UserError(f"objective.mask_kinds.{kind}={p!r} is not allowed: it must be a number >= 0")
        probs.append(float(p))
    total = sum(probs)
    if total <= 0:
        raise UserError(f"objective.mask_kinds={kinds!r} is not allowed: at least one probability must be > 0")
    return torch.tensor(probs, dtype=torch.float64) / total


def draw_masks(n: int, h: int, w: int, probs: torch.Tensor, generator: torch.Generator, device=None) -> torch.Tensor:
    """n masks (n x 1 x h x w float on `device`, default the generator's), each of a kind drawn with `probs`
    (MASK_KINDS order). The draws come from `generator`; only the chosen masks are rendered, on `device`."""
    device = generator.device if device is None else torch.device(device)
    u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)
    cum = probs.to(u.device).cumsum(0)
    last = int(torch.nonzero(probs > 0)[-1])  # float rounding must not pick a kind of probability 0
    kind = torch.searchsorted(cum, u, right=True).clamp(max=last).to(device)
    drawn = [
        (_box_params(n, h, w, generator), _render_boxes),
        (_stroke_params(n, h, w, generator), _render_strokes),
        (_half_params(n, generator), _render_halves),
    ]
    out = torch.ones(n, 1, h, w, device=device)  # "none": everything to generate
    for k, (params, render) in enumerate(drawn):
        idx = torch.nonzero(kind == k).flatten()
        if len(idx):
            out[idx] = render([p.to(device)[idx] for p in params], h, w)
    return out


def box_masks(n: int, h: int, w: int, generator: torch.Generator) -> torch.Tensor:
    """The union of 1..MAX_BOXES rectangles per mask."""
    return _render_boxes(_box_params(n, h, w, generator), h, w)


def stroke_masks(n: int, h: int, w: int, generator: torch.Generator) -> torch.Tensor:
    """One free-form stroke per mask: the pixels whose centre lies within the brush radius of a random polyline."""
    return _render_strokes(_stroke_params(n, h, w, generator), h, w)


def half_masks(n: int, h: int, w: int, generator: torch.Generator) -> torch.Tensor:
    """Left, right, top or bottom half to generate (the larger part when the side is odd)."""
    return _render_halves(_half_params(n, generator), h, w)


def _box_params(n, h, w, g):
    count = torch.randint(1, MAX_BOXES + 1, (n,), generator=g, device=g.device)
    lo, hi = BOX_SIDE
    frac = lo + (hi - lo) * torch.rand(n, MAX_BOXES, 2, generator=g, device=g.device)
    pos = torch.rand(n, MAX_BOXES, 2, generator=g, device=g.device)
    size = torch.tensor([h, w], device=g.device)
    side = (frac * size).round().clamp(min=1).long()  # (n, boxes, 2) in pixels
    start = (pos * (size - side + 1)).floor().long()
    return [count, start, side]


def _render_boxes(params, h, w):
    count, start, side = params
    dev = count.device
    rows = torch.arange(h, device=dev).view(1, 1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, 1, w)
    end = start + side
    inside = (
        (rows >= start[..., 0, None, None])
        & (rows < end[..., 0, None, None])
        & (cols >= start[..., 1, None, None])
        & (cols < end[..., 1, None, None])
    )
    used = torch.arange(MAX_BOXES, device=dev).view(1, -1, 1, 1) < count.view(-1, 1, 1, 1)
    return (inside & used).any(1, keepdim=True).float()


def _stroke_params(n, h, w, g):
    side = float(min(h, w))
    start = torch.rand(n, 2, generator=g, device=g.device) * torch.tensor([h, w], device=g.device)
    angle0 = 2 * math.pi * torch.rand(n, 1, generator=g, device=g.device)
    turns = (torch.rand(n, STROKE_SEGMENTS, generator=g, device=g.device) - 0.5) * math.pi  # up to 90 degrees
    turns[:, 0] = 0
    angles = angle0 + turns.cumsum(1)
    lo, hi = STROKE_LENGTH
    length = side * (lo + (hi - lo) * torch.rand(n, STROKE_SEGMENTS, generator=g, device=g.device))
    lo, hi = STROKE_RADIUS
    radius = (side * (lo + (hi - lo) * torch.rand(n, generator=g, device=g.device))).clamp(min=1.0)
    steps = torch.stack([torch.sin(angles), torch.cos(angles)], -1) * length[..., None]
    limit = torch.tensor([h, w], device=g.device, dtype=start.dtype)
    verts = [start]
    for i in range(STROKE_SEGMENTS):  # the walk stays inside the image: each vertex is clamped to it
        verts.append(torch.minimum(torch.maximum(verts[-1] + steps[:, i], torch.zeros_like(limit)), limit))
    return [torch.stack(verts, 1), radius]


def _render_strokes(params, h, w):
    verts, radius = params
    n, dev = verts.shape[0], verts.device
    centres = torch.stack(
        torch.meshgrid(torch.arange(h, device=dev) + 0.5, torch.arange(w, device=dev) + 0.5, indexing="ij"), -1
    )
    centres = centres.reshape(1, -1, 2)  # (1, hw, 2) as (row, col)
    dist = torch.full((n, h * w), float("inf"), device=dev)
    for i in range(verts.shape[1] - 1):
        a, ab = verts[:, i, None], (verts[:, i + 1] - verts[:, i])[:, None]
        ap = centres - a
        s = ((ap * ab).sum(-1) / (ab * ab).sum(-1).clamp(min=1e-12)).clamp(0, 1)
        dist = torch.minimum(dist, (ap - s[..., None] * ab).norm(dim=-1))
    return (dist <= radius[:, None]).float().view(n, 1, h, w)


def _half_params(n, g):
    return [torch.randint(0, 4, (n,), generator=g, device=g.device)]


def _render_halves(params, h, w):
    (which,) = params
    dev = which.device
    rows = torch.arange(h, device=dev).view(1, h, 1).expand(1, h, w)
    cols = torch.arange(w, device=dev).view(1, 1, w).expand(1, h, w)
    halves = torch.stack(
        [cols < (w + 1) // 2, cols >= w // 2, rows < (h + 1) // 2, rows >= h // 2]
    ).float()  # (4, 1, h, w)
    return halves[which]
