"""The synthetic shapes data set of the bias experiment and its analytic read-back."""

import math

import pytest
import torch

from bypass_kernels.experiments.metrics import group_counts, wilson_interval
from bypass_kernels.experiments.shapes import GROUPS, GroupShares, make_dataset, read_attributes


def test_attributes_read_back_exactly():
    images, groups = make_dataset(20000, seed=3)
    attrs = read_attributes(images)
    assert attrs["valid"].all()
    assert torch.equal(attrs["group"], groups)


def test_default_shares_are_shaped_like_the_papers_celeba_case():
    shares = GroupShares().shares()
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["blue_circle"] < 0.02  # the minority group: under 2%
    assert shares["red_circle"] + shares["blue_circle"] == pytest.approx(0.40)  # a class of about 40%
    _, groups = make_dataset(50000, seed=0)
    counts = group_counts(groups, GROUPS)
    for name in GROUPS:
        assert counts[name] / 50000 == pytest.approx(shares[name], abs=0.01)


def test_noise_and_blank_images_are_invalid():
    assert not read_attributes(torch.randn(500, 3, 16, 16, generator=torch.Generator().manual_seed(0)))["valid"].any()
    assert not read_attributes(-torch.ones(4, 3, 16, 16))["valid"].any()
    two = make_dataset(2, seed=1)[0]
    both = torch.maximum(two[0], two[1].roll(8, dims=2)).unsqueeze(0)  # two shapes in one image
    assert read_attributes(both)["group"].item() == -1


def test_wilson_interval():
    lo, hi = wilson_interval(16, 1000)
    assert lo < 0.016 < hi and hi - lo < 0.02
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(0, 100)
    assert lo == 0.0 and 0 < hi < 0.05
    assert math.isclose(sum(wilson_interval(50, 100)), 1.0)
