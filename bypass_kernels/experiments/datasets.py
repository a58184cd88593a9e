"""The bias experiment's two data sets behind one interface, and the shipped models that go with them."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bypass_kernels.experiments import digits, shapes

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
SHIPPED = {"shapes": "shapes16", "digits": "digits8"}
NAMES = tuple(SHIPPED)


@dataclass(frozen=True)
class DataSpec:
    name: str
    groups: tuple[str, ...]
    shares: dict[str, float]
    shape: tuple[int, int, int]
    make: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]  # (n, seed) -> images in [-1, 1], groups
    read: Callable[[torch.Tensor], dict]  # images -> group, valid, ...
    description: str


def shipped_folder(name: str) -> str:
    return os.path.join(DATA, SHIPPED[name])


def shapes_spec() -> DataSpec:
    return DataSpec(
        name="shapes",
        groups=shapes.GROUPS,
        shares=shapes.GroupShares().shares(),
        shape=(3, shapes.SIZE, shapes.SIZE),
        make=lambda n, seed: shapes.make_dataset(n, seed=seed),
        read=shapes.read_attributes,
        description="bypass_kernels.experiments.shapes.make_dataset (default GroupShares)",
    )


def digits_spec(classifier: dict) -> DataSpec:
    return DataSpec(
        name="digits",
        groups=digits.GROUPS,
        shares=digits.training_shares(),
        shape=(3, digits.SIZE, digits.SIZE),
        make=lambda n, seed: digits.make_dataset(n, seed=seed),
        read=lambda images: digits.read_attributes(images, classifier),
        description="bypass_kernels.experiments.digits.make_dataset (sklearn load_digits, fixed split)",
    )


def load(name: str, workdir: str | None = None) -> tuple[DataSpec, dict | None]:
    """The data set ``name``; for digits, the read-out classifier is fitted once and kept in ``workdir``.

    Returns the spec and, for digits, the classifier's report (accuracy, confusion matrix).
    """
    if name == "shapes":
        return shapes_spec(), None
    if name != "digits":
        raise ValueError(f"dataset: {name!r} is not one of {NAMES}")
    path = os.path.join(workdir, "classifier.json") if workdir else None
    if path and os.path.isfile(path):
        with open(os.path.join(workdir, "classifier_report.json"), encoding="utf-8") as f:
            report = json.load(f)
        return digits_spec(digits.load_classifier(path)), report
    weights, report = digits.fit_classifier()
    if path:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "classifier_report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        digits.save_classifier(weights, path)
    return digits_spec(weights), report


def reader_for(folder: str, config: dict) -> tuple[tuple[str, ...], Callable] | None:
    """The read-out that fits a model folder: digits if it carries its classifier, shapes for 3×16×16."""
    classifier = os.path.join(folder, "classifier.json")
    if os.path.isfile(classifier):
        weights = digits.load_classifier(classifier)
        return digits.GROUPS, lambda images: digits.read_attributes(images, weights)
    if (config.get("in_channels"), config.get("sample_size")) == (3, shapes.SIZE):
        return shapes.GROUPS, shapes.read_attributes
    return None
