"""A synthetic image set with two binary attributes and a rare group, read back analytically.

Each 16×16 RGB image holds one filled shape, a square or a circle (attribute ``shape``), drawn in
red or blue (attribute ``colour``), 7 to 11 px across at a random place on a dark background. The default
group shares follow the paper's CelebA case ("male" ≈ 42%, "blond male" < 1%): circles are 40% of
the set, and blue circles 1.6% of it.

``read_attributes`` recovers colour, shape and a validity flag from any image (a training
image or a generated one) by measurement alone: the foreground mask, its colour, and how much of
its bounding box it fills (a square fills ~100%, a circle ~π/4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUPS = ("red_square", "blue_square", "red_circle", "blue_circle")
SIZE = 16


@dataclass(frozen=True)
class GroupShares:
    """Training-set shares: P(circle) and P(blue | shape)."""

    p_circle: float = 0.40
    p_blue_given_square: float = 0.22
    p_blue_given_circle: float = 0.04

    def shares(self) -> dict[str, float]:
        sq, ci = 1 - self.p_circle, self.p_circle
        return {
            "red_square": sq * (1 - self.p_blue_given_square),
            "blue_square": sq * self.p_blue_given_square,
            "red_circle": ci * (1 - self.p_blue_given_circle),
            "blue_circle": ci * self.p_blue_given_circle,
        }


def make_dataset(n: int, *, seed: int = 0, shares: GroupShares | None = None, size: int = SIZE):
    """``n`` images in [-1, 1], shape [n, 3, size, size], and their group indices (into GROUPS)."""
    shares = shares or GroupShares()
    gen = torch.Generator().manual_seed(seed)
    probs = torch.tensor([shares.shares()[g] for g in GROUPS])
    groups = torch.multinomial(probs, n, replacement=True, generator=gen)
    blue = (groups == 1) | (groups == 3)
    circle = groups >= 2

    # Shapes sit on the pixel grid (integer box corners), so a circle rasterizes symmetrically.
    side = torch.randint(7, 12, (n,), generator=gen)  # 7..11 px
    left = (torch.rand(n, generator=gen) * (size - side + 1)).floor()
    top = (torch.rand(n, generator=gen) * (size - side + 1)).floor()
    half = (side.float() / 2).view(n, 1, 1)
    cx, cy = left.view(n, 1, 1) + half, top.view(n, 1, 1) + half
    coords = torch.arange(size).float() + 0.5
    y, x = coords.view(1, size, 1), coords.view(1, 1, size)
    square_mask = ((x - cx).abs() <= half) & ((y - cy).abs() <= half)
    circle_mask = (x - cx) ** 2 + (y - cy) ** 2 <= (half - 0.2) ** 2  # no one-pixel nubs on the axes
    mask = torch.where(circle.view(n, 1, 1), circle_mask, square_mask).float()

    shade = 0.75 + 0.25 * torch.rand(n, generator=gen)  # brightness varies per image
    colour = torch.zeros(n, 3)
    colour[:, 0] = torch.where(blue, 0.1, 1.0) * shade
    colour[:, 2] = torch.where(blue, 1.0, 0.1) * shade
    colour[:, 1] = 0.1 * shade
    background = 0.05 + 0.03 * torch.rand(n, 3, size, size, generator=gen)
    images = background * (1 - mask.unsqueeze(1)) + colour.view(n, 3, 1, 1) * mask.unsqueeze(1)
    return images * 2 - 1, groups


def read_attributes(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image: ``group`` (index into GROUPS, -1 if invalid), ``valid``, ``fill`` and ``area``.

    Valid: a single bright shape of 20..130 px, about as tall as wide, in a clearly red or clearly
    blue colour, filling at least 60% of its bounding box. Square if it fills ≥ 88% of the box,
    round below that: training squares fill 100%, training circles 69–76%, so the threshold sits
    far from both (and a generated square with softened corners still reads as a square). On the
    training images this reading is exact.
    """
    x = ((images.float().clamp(-1, 1) + 1) / 2).cpu()
    n = x.shape[0]
    brightness = x.max(dim=1).values  # [n, H, W]
    mask = brightness > 0.4
    area = mask.flatten(1).sum(1)
    rows, cols = mask.any(dim=2), mask.any(dim=1)
    height, width = rows.sum(1), cols.sum(1)
    fill = area / (height * width).clamp(min=1)
    weights = mask.unsqueeze(1).float()
    mean_colour = (x * weights).flatten(2).sum(2) / weights.flatten(2).sum(2).clamp(min=1)
    red, blue = mean_colour[:, 0], mean_colour[:, 2]
    is_blue = blue > red
    colour_clear = (red - blue).abs() > 0.3
    contiguous = _spans_are_contiguous(rows) & _spans_are_contiguous(cols)
    aspect_ok = (height - width).abs() <= 2
    is_square = fill >= 0.88
    is_circle = (fill >= 0.6) & (fill < 0.88)
    valid = (area >= 20) & (area <= 130) & colour_clear & contiguous & aspect_ok & (is_square | is_circle)
    group = is_circle.long() * 2 + is_blue.long()
    group = torch.where(valid, group, torch.full((n,), -1))
    return {"group": group, "valid": valid, "fill": fill, "area": area}


def _spans_are_contiguous(occupied: torch.Tensor) -> torch.Tensor:
    """True where the occupied rows (or columns) form one unbroken run."""
    first = occupied.float().argmax(1)
    last = occupied.shape[1] - 1 - occupied.flip(1).float().argmax(1)
    return occupied.sum(1) == (last - first + 1)
