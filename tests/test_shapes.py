"""The synthetic data set of the bias experiment, its analytic read-back, and the experiment's plumbing."""

import math
import os
import subprocess
import sys

import pytest
import torch

from bypass_kernels.shapes import GROUPS, GroupShares, group_counts, make_dataset, read_attributes, wilson_interval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    counts = group_counts(groups)
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


def test_experiment_runs_end_to_end(tmp_path):
    """The whole pipeline on a toy budget (the real run is documented in the README)."""
    cmd = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "bias_experiment.py"),
        "--depths",
        "1",
        "2",
        "--steps",
        "6",
        "--batch",
        "8",
        "--train-size",
        "256",
        "--samples",
        "24",
        "--sample-steps",
        "3",
        "--quick",
        "--no-ship",
        "--runs",
        str(tmp_path / "runs"),
        "--results",
        str(tmp_path / "results"),
        "--checkpoint-every",
        "4",
        "--device",
        "cpu",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "results")) == [
        "bias_experiment.csv",
        "bias_experiment.md",
        "bias_experiment.png",
    ]
    lines = (tmp_path / "results" / "bias_experiment.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * 2  # header + 2 depths x (off, one bypass setting)
    # Resumable: a second run finds the finished models and trains nothing.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "training depth" not in again.stderr
