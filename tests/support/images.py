"""Sparse raw images for tests: random data in some of their 64 KiB clusters (as qcow2 keeps
data), holes elsewhere."""

from __future__ import annotations

import os
import random
from pathlib import Path

CLUSTER = 64 * 1024


def sparse_raw(path: Path, size: int, seed: int, fraction: float = 0.1) -> int:
    """A sparse raw image with random data in about `fraction` of its 64 KiB clusters;
    returns the bytes allocated to it (its data)."""
    rng = random.Random(seed)
    clusters = rng.sample(range(size // CLUSTER), int(size // CLUSTER * fraction))
    with open(path, "wb") as f:
        f.truncate(size)
        for c in sorted(clusters):
            f.seek(c * CLUSTER)
            f.write(rng.randbytes(CLUSTER))
    data = os.stat(path).st_blocks * 512
    assert abs(data - len(clusters) * CLUSTER) <= CLUSTER, "the source is sparse"
    return data
