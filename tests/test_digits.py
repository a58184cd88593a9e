"""The digits data set of the bias experiment, its classifier read-out, resumable training, generate --model digits."""

import json
import os

import pytest
import torch

pytest.importorskip("sklearn")

from bypass_kernels import cli
from bypass_kernels.experiments import datasets, digits
from bypass_kernels.experiments.metrics import group_counts
from bypass_kernels.experiments.training import Gate, TrainConfig, train_unet, unet_config


@pytest.fixture(scope="module")
def split():
    return digits.load_split()


@pytest.fixture(scope="module")
def classifier(split):
    return digits.fit_classifier(split)


def test_split_keeps_the_held_out_digits_apart(split):
    assert len(split.pool) + len(split.held) == 1797
    assert set(split.pool_labels.tolist()) == set(digits.DIGITS)
    for d in digits.DIGITS:  # half of each class in the pool, the rest held out
        n_pool, n_held = int((split.pool_labels == d).sum()), int((split.held_labels == d).sum())
        assert abs(n_pool - n_held) <= 1
    assert set(split.held_labels.tolist()) == set(range(10))


def test_group_shares_are_the_shapes_sets(split):
    shares = digits.training_shares()
    assert shares["blue_1"] == pytest.approx(0.016) and shares["red_0"] == pytest.approx(0.468)
    _, groups = digits.make_dataset(40000, seed=0, split=split)
    counts = group_counts(groups, digits.GROUPS)
    for name in digits.GROUPS:
        assert counts[name] / 40000 == pytest.approx(shares[name], abs=0.01)


def test_classifier_report(classifier):
    _, report = classifier
    confusion = torch.tensor(report["confusion_matrix"])
    assert confusion.shape == (10, 11) and int(confusion.sum()) == report["test_images"]
    assert report["test_accuracy"] > 0.9
    assert report["test_accuracy_0_1"] > 0.97
    assert report["real_0_1_accepted_as_valid"] > 0.9
    assert report["confusion_columns"][-1] == "junk"


def test_read_out_on_training_images_and_junk(split, classifier):
    weights, _ = classifier
    images, groups = digits.make_dataset(2000, seed=1, split=split)
    attrs = digits.read_attributes(images, weights)
    blue = (groups == 1) | (groups == 3)
    assert torch.equal(attrs["blueness"] > 0, blue)  # colour is measured exactly
    assert torch.allclose(attrs["blueness"].abs(), torch.tensor(0.9 / 1.1), atol=1e-4)
    assert attrs["valid"].float().mean() > 0.9  # digits the classifier never saw
    ok = attrs["valid"]
    assert (attrs["group"][ok] == groups[ok]).float().mean() > 0.99
    noise = torch.rand(500, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert digits.read_attributes(noise, weights)["valid"].float().mean() < 0.05
    assert not digits.read_attributes(-torch.ones(4, 3, 8, 8), weights)["valid"].any()


def test_training_resumes_from_its_last_check(tmp_path):
    images = torch.rand(64, 3, 8, 8) * 2 - 1
    calls = []

    def quality(samples):
        calls.append(len(samples))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second gate check
        return {"quality": 0.0}

    kwargs = dict(
        folder=str(tmp_path / "m"),
        seed=0,
        device="cpu",
        gate=Gate(level=0.9, every=2, samples=4, sample_steps=2, min_steps=0, max_steps=6),
        train=TrainConfig(batch=4),
    )
    config = unet_config(1, size=8)
    with pytest.raises(KeyboardInterrupt):
        train_unet(config, images, quality=quality, **kwargs)
    assert torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=False)["step"] == 2
    final = train_unet(config, images, quality=quality, **kwargs)
    with open(os.path.join(final, "training.json"), encoding="utf-8") as f:
        record = json.load(f)
    assert [h["step"] for h in record["history"]] == [2, 4, 6]  # steps 2 from the first run, 4 and 6 after
    assert record["stop_reason"] == "max_steps" and record["steps"] == 6
    assert train_unet(config, images, quality=quality, **kwargs) == final  # finished: nothing to do


def test_generate_digits_from_the_shipped_model(tmp_path, capsys):
    if not os.path.isfile(os.path.join(datasets.shipped_folder("digits"), "config.json")):
        pytest.skip("no shipped digits model yet")
    assert cli.main(["generate", "--model", "digits", "--n", "32", "--steps", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in (*digits.GROUPS, "invalid"):
        assert name in out
    assert (tmp_path / "grid.png").stat().st_size > 0
