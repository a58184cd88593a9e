"""Reading the benchmark CSVs (standard library only, so the verdict runs with any Python)."""

from __future__ import annotations

import csv
import math
import os


def read(path: str) -> list[dict]:
    """The CSV's rows as dicts; [] when the file is missing or empty."""
    if not path or not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def latest(rows: list[dict], key_fields) -> list[dict]:
    """Keep the newest row per key (the CSVs are append-only logs), in first-seen order."""
    best = {}
    for row in rows:
        key = tuple(row.get(k, "") for k in key_fields)
        if key not in best or row.get("date", "") >= best[key].get("date", ""):
            best[key] = row
    return list(best.values())


def number(value) -> float | None:
    """A CSV cell as a float; None for an empty, missing or non-numeric cell."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x
