"""Metrics of a set of generated samples against the training mix, and intervals.

Within one model: Wilson intervals for proportions, bootstrap intervals for the distance to the training
mix and for diversity. Across training seeds: a Student-t interval over the per-seed values, which
carries both the seed-to-seed spread and each seed's sampling error.
"""

from __future__ import annotations

import math

import torch


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def group_counts(groups: torch.Tensor, names: tuple[str, ...]) -> dict[str, int]:
    """Samples per group (``groups`` indexes ``names``; -1 is invalid)."""
    out = {name: int((groups == i).sum()) for i, name in enumerate(names)}
    out["invalid"] = int((groups < 0).sum())
    return out


def bootstrap(values_fn, n: int, reps: int = 200, seed: int = 0) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(seed)
    stats = torch.tensor([values_fn(torch.randint(0, n, (n,), generator=gen)) for _ in range(reps)])
    return float(stats.nanquantile(0.025)), float(stats.nanquantile(0.975))


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided Student-t interval of ``values`` (nan-free); (mean, mean, mean) for one value."""
    values = [v for v in values if not math.isnan(v)]
    n = len(values)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    mean = sum(values) / n
    if n == 1:
        return (mean, mean, mean)
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return (mean, mean - half, mean + half)


def sample_metrics(
    images: torch.Tensor,
    attrs: dict[str, torch.Tensor],
    groups: tuple[str, ...],
    train_shares: dict[str, float],
    train_images: torch.Tensor,
    max_pairs: int = 400,
) -> dict:
    """One model, one setting: quality, group shares, distance to the training mix, diversity, variance.

    - ``valid``: fraction of all samples the read-out accepts (quality); ``confidence``: the read-out's
      mean confidence over all samples, where it has one.
    - ``<group>``: share of the valid samples; ``tv_distance``: total variation to the training mix.
    - ``diversity``: mean pairwise L2 distance between valid samples (pixels in [-1, 1]).
    - ``variance``: total pixel variance (trace of the covariance) of the valid samples, and
      ``variance_ratio`` against the training images': the bias–variance read-out.
    - ``nn_train``: mean L2 distance from a valid sample to its nearest training image (small: copying).
    """
    group, valid = attrs["group"], attrs["valid"]
    n, n_valid = len(group), int(valid.sum())
    row = {"n": n, "valid": n_valid / n}
    row["valid_lo"], row["valid_hi"] = wilson_interval(n_valid, n)
    row["confidence"] = float(attrs["confidence"].mean()) if "confidence" in attrs else math.nan
    target = torch.tensor([train_shares[g] for g in groups])
    for i, name in enumerate(groups):
        k = int((group == i).sum())
        row[name] = k / n_valid if n_valid else math.nan  # no valid sample: no share
        row[f"{name}_lo"], row[f"{name}_hi"] = wilson_interval(k, n_valid)
        row[f"{name}_train"] = train_shares[name]

    def tv(index):
        g = group[index]
        g = g[g >= 0]
        if len(g) == 0:
            return math.nan  # no valid sample: no distribution to compare
        counts = torch.bincount(g, minlength=len(groups)).float()
        return float(0.5 * (counts / counts.sum() - target).abs().sum())

    row["tv_distance"] = tv(torch.arange(n))
    row["tv_lo"], row["tv_hi"] = bootstrap(tv, n)
    good = images[valid].float().flatten(1)
    sub = good[:max_pairs]
    dist = torch.cdist(sub, sub)
    m = len(sub)

    def diversity(index):
        d = dist[index][:, index]
        return float(d.sum() / max(1, m * (m - 1)))

    row["diversity"] = diversity(torch.arange(m)) if m > 1 else math.nan
    row["diversity_lo"], row["diversity_hi"] = bootstrap(diversity, m) if m > 1 else (math.nan, math.nan)
    reference = train_images.float().flatten(1)
    row["variance"] = float(good.var(0).sum()) if len(good) > 1 else math.nan
    row["variance_train"] = float(reference.var(0).sum())
    row["variance_ratio"] = row["variance"] / row["variance_train"]
    row["nn_train"] = float(torch.cdist(good, reference).min(1).values.mean()) if len(good) else math.nan
    return row
