"""Seeds and generator keys as pure hashes of names: the same value in every process, rank and run.

A direction (or any other random stream) is named by fields such as (run seed, "gaussian", step,
parameter name, full shape); :func:`key_of` turns them into the key of the counter-based generator
of :mod:`subzero_ds.kernels`, whose value at element i is a function of (key, i) alone. So a
direction never depends on the world size, the rank, the ZeRO partitioning or the device.
"""

from __future__ import annotations

import hashlib

from . import kernels


def stable_seed(*fields: object) -> int:
    """A 63-bit seed that is a pure hash of ``fields`` (same value in every process and run)."""
    digest = hashlib.blake2b(repr(fields).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def key_of(*fields: object) -> tuple[int, int]:
    """The generator key of the direction (or random stream) named by ``fields``."""
    return kernels.direction_key(stable_seed(*fields))


def query_fields(query: int) -> tuple:
    """What a query index adds to a direction's key: nothing for the first (q = 1 draws as before)."""
    return ("query", query) if query else ()
