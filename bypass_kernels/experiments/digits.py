"""A biased set of real handwritten digits, offline, read back by a classifier that never saw them.

Source: scikit-learn's bundled ``load_digits`` (1,797 8×8 grey-level digits, no download). Two binary
attributes, as in the shapes set: the digit (0 or 1) and the ink colour (red or blue). The group shares
are the shapes set's (``shapes.GroupShares``), with digit 1 in the role of the circle: red 0 46.8%
(the majority), blue 0 13.2%, red 1 38.4%, blue 1 1.6% (the intersectional minority).

The split is fixed (``SPLIT_SEED``), whatever the training seed: half of the 0s and 1s are the diffusion
models' training pool; the other half and every other digit are held out. A small classifier
(scikit-learn ``MLPClassifier``, 10 digits plus a "junk" class of noise, blanks and two-digit overlays) is
trained on part of the held-out split and scored on the rest. It reads the digit from the image's
luminance; the colour is measured exactly (ink-weighted red against blue). A sample is valid when the
classifier calls it a 0 or a 1 with confidence ≥ ``MIN_CONFIDENCE`` and its colour is clearly red or blue.

The classifier's weights are exported to a plain dict (JSON), so reading images needs torch only;
scikit-learn is needed to build the data set and fit the classifier.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from bypass_kernels.experiments.shapes import GroupShares

GROUPS = ("red_0", "blue_0", "red_1", "blue_1")
DIGITS = (0, 1)  # digit attribute: DIGITS[0] plays the square (majority class), DIGITS[1] the circle
SIZE = 8
SPLIT_SEED = 0
MIN_CONFIDENCE = 0.7
JUNK = 10  # the classifier's extra class
RED = (1.0, 0.1, 0.1)
BLUE = (0.1, 0.1, 1.0)


def training_shares() -> dict[str, float]:
    """The shapes set's shares, digit 1 in the role of the circle."""
    return dict(zip(GROUPS, GroupShares().shares().values(), strict=True))


@dataclass(frozen=True)
class Split:
    """Grey-level digits in [0, 1] ([n, 8, 8]) and labels: the diffusion pool and the held-out part."""

    pool: torch.Tensor
    pool_labels: torch.Tensor
    held: torch.Tensor
    held_labels: torch.Tensor


def load_split() -> Split:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    in_pool = torch.zeros(len(labels), dtype=torch.bool)
    for d in DIGITS:
        index = (labels == d).nonzero().flatten()
        index = index[torch.randperm(len(index), generator=gen)]
        in_pool[index[: len(index) // 2]] = True
    return Split(images[in_pool], labels[in_pool], images[~in_pool], labels[~in_pool])


def colourize(grey: torch.Tensor, blue: torch.Tensor, shade: torch.Tensor) -> torch.Tensor:
    """[n, 8, 8] ink in [0, 1] → [n, 3, 8, 8] RGB in [-1, 1] (red or blue ink, brightness ``shade``)."""
    colour = torch.where(blue.view(-1, 1), torch.tensor(BLUE), torch.tensor(RED)) * shade.view(-1, 1)
    return (grey.unsqueeze(1) * colour.view(-1, 3, 1, 1)) * 2 - 1


def make_dataset(n: int, *, seed: int = 0, split: Split | None = None):
    """``n`` training images (3×8×8 in [-1, 1]) drawn from the diffusion pool, and their group indices.

    Each item is a pool digit of the group's class in the group's colour, at a random brightness.
    """
    split = split or load_split()
    gen = torch.Generator().manual_seed(seed)
    probs = torch.tensor(list(training_shares().values()))
    groups = torch.multinomial(probs, n, replacement=True, generator=gen)
    digit_one = groups >= 2
    source = torch.empty(n, dtype=torch.long)
    for k, d in enumerate(DIGITS):
        candidates = (split.pool_labels == d).nonzero().flatten()
        chosen = (digit_one == bool(k)).nonzero().flatten()
        source[chosen] = candidates[torch.randint(0, len(candidates), (len(chosen),), generator=gen)]
    shade = 0.75 + 0.25 * torch.rand(n, generator=gen)
    blue = (groups == 1) | (groups == 3)
    return colourize(split.pool[source], blue, shade), groups


# --------------------------------------------------------------------- classifier
def _junk(n: int, digits: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Images that are no single digit: noise, near-blanks, and overlays of two different digits."""
    third = n // 3
    noise = torch.rand(third, 8, 8, generator=gen) * torch.rand(third, 1, 1, generator=gen)
    blank = 0.15 * torch.rand(third, 8, 8, generator=gen)
    a = torch.randint(0, len(digits), (n - 2 * third,), generator=gen)
    b = torch.randint(0, len(digits), (n - 2 * third,), generator=gen)
    keep = labels[a] != labels[b]
    overlay = (0.5 * (digits[a] + digits[b]))[keep]
    return torch.cat([noise, blank, overlay])


def fit_classifier(split: Split | None = None, *, test_fraction: float = 0.3, seed: int = 0) -> tuple[dict, dict]:
    """Fit the read-out classifier on the held-out split; return (weights, report).

    The report has the held-out test accuracy over the ten digits, the confusion matrix (rows: true
    digit, columns: predicted class 0-9 or junk), and the fraction of real test 0s and 1s the read-out
    accepts as valid at ``MIN_CONFIDENCE``.
    """
    from sklearn.neural_network import MLPClassifier

    split = split or load_split()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(split.held_labels), generator=gen)
    n_test = int(len(order) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    x_train, y_train = split.held[train], split.held_labels[train]
    junk = _junk(len(x_train) // 4, x_train, y_train, gen)
    x = _normalize(torch.cat([x_train, junk])).flatten(1).numpy()
    y = torch.cat([y_train, torch.full((len(junk),), JUNK)]).numpy()
    clf = MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=2000, random_state=seed).fit(x, y)
    weights = {
        "classes": [int(c) for c in clf.classes_],
        "layers": [[w.T.tolist(), b.tolist()] for w, b in zip(clf.coefs_, clf.intercepts_, strict=True)],
        "min_confidence": MIN_CONFIDENCE,
    }
    x_test, y_test = split.held[test], split.held_labels[test]
    probs = _predict(weights, x_test)
    pred = probs.argmax(1)
    confusion = torch.zeros(10, len(weights["classes"]), dtype=torch.long)
    for t, p in zip(y_test.tolist(), pred.tolist(), strict=True):
        confusion[t, p] += 1
    binary = (y_test == DIGITS[0]) | (y_test == DIGITS[1])
    accepted = (pred[binary] == y_test[binary]) & (probs[binary].max(1).values >= MIN_CONFIDENCE)
    report = {
        "classifier": "sklearn MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3), 10 digits + junk class",
        "train_images": len(train),
        "test_images": n_test,
        "test_accuracy": float((pred == y_test).float().mean()),
        "test_accuracy_0_1": float((pred[binary] == y_test[binary]).float().mean()),
        "real_0_1_accepted_as_valid": float(accepted.float().mean()),
        "confusion_matrix": confusion.tolist(),
        "confusion_columns": [str(c) if c != JUNK else "junk" for c in weights["classes"]],
        "min_confidence": MIN_CONFIDENCE,
    }
    return weights, report


def _normalize(grey: torch.Tensor) -> torch.Tensor:
    """Brightest pixel to 1 (floored, so a near-blank stays dim): the digit's shape, not its brightness."""
    return grey / grey.flatten(1).max(1).values.clamp(min=0.25).view(-1, 1, 1)


def _predict(weights: dict, grey: torch.Tensor) -> torch.Tensor:
    """Class probabilities of [n, 8, 8] grey images in [0, 1] (the MLP's forward pass, in torch)."""
    h = _normalize(grey).flatten(1).double()
    layers = weights["layers"]
    for i, (w, b) in enumerate(layers):
        h = h @ torch.tensor(w, dtype=torch.float64).T + torch.tensor(b, dtype=torch.float64)
        if i < len(layers) - 1:
            h = h.relu()
    return h.softmax(1).float()


def save_classifier(weights: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(weights, f)


def load_classifier(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_attributes(images: torch.Tensor, classifier: dict) -> dict[str, torch.Tensor]:
    """Per image ([n, 3, 8, 8] in [-1, 1]): ``group`` (index into GROUPS, -1 if invalid), ``valid``,
    ``digit`` (the classifier's class, 10 = junk), ``confidence`` and ``blueness`` (−1 red … 1 blue).

    Colour is measured: the luminance-weighted mean of blue minus red over red plus blue (training
    images: ±0.82 exactly); clear when its magnitude is over 0.5 and there is some ink at all.
    """
    x = ((images.float().clamp(-1, 1) + 1) / 2).cpu()
    grey = x.max(dim=1).values  # luminance: the ink, whatever its colour
    probs = _predict(classifier, grey)
    confidence, index = probs.max(1)
    classes = torch.tensor(classifier["classes"])
    digit = classes[index]
    weight = grey.flatten(1)
    red = (x[:, 0].flatten(1) * weight).sum(1)
    blue = (x[:, 2].flatten(1) * weight).sum(1)
    blueness = (blue - red) / (blue + red).clamp(min=1e-6)
    ink = weight.sum(1)
    colour_clear = (blueness.abs() > 0.5) & (ink > 2.0)
    is_digit = (digit == DIGITS[0]) | (digit == DIGITS[1])
    valid = is_digit & (confidence >= classifier.get("min_confidence", MIN_CONFIDENCE)) & colour_clear
    group = (digit == DIGITS[1]).long() * 2 + (blueness > 0).long()
    group = torch.where(valid, group, torch.full_like(group, -1))
    return {"group": group, "valid": valid, "digit": digit, "confidence": confidence, "blueness": blueness}
