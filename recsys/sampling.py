"""Deterministic row selection by hashing a row's position, independent of batch and file sizes."""

from __future__ import annotations

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & _MASK64


def row_fraction_mask(first_row: int, rows: int, fraction: float, salt: int) -> np.ndarray:
    """True for the rows `first_row .. first_row + rows - 1` that fall in `fraction`, given `salt`.

    The same row position and salt always give the same answer, so a rerun selects the same rows.
    """
    if fraction >= 1.0:
        return np.ones(rows, dtype=bool)
    if fraction <= 0.0:
        return np.zeros(rows, dtype=bool)
    positions = np.arange(first_row, first_row + rows, dtype=np.uint64)
    hashed = _splitmix64(positions ^ np.uint64(salt & 0xFFFFFFFFFFFFFFFF))
    return (hashed >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction
