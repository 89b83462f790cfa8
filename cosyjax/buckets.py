"""Padded lengths ("buckets"): each compiled program serves every length up to its bucket.

Every stage pads its variable lengths up to a bucket from a geometric table, so a handful of
compiled programs covers all requests within the limits (``CosyVoice3Model.warmup`` compiles
them all).  ``geometric_bucket(n, minimum, per_octave, multiple)`` is the smallest
``minimum * 2**(k / per_octave)``, rounded up to a multiple of ``multiple``, that holds ``n``.

The tables (``bucket_table``), with the padding they cost (worst case: a length just past a bucket;
mean: over uniformly drawn lengths up to 5000; the 16-multiple rounding makes the worst case a little
above the 41 % of two buckets per octave):

==========================  =========================  ==========  =======================
what                        buckets                    per octave  padding worst / mean
==========================  =========================  ==========  =======================
flow tokens (prompt + new)  32, 48, 64, 96, 128, ...   2           49 % / 20 %
HiFT mel frames (offline)   64, 96, 128, 192, ...      2           49 % / 20 %
LLM prefill tokens          16, 32, 64, ...            1           100 % / 40 % (cheap: one pass)
LLM KV cache slots          one size from the limits   -           -
==========================  =========================  ==========  =======================

Streaming pushes pad to whole DiT chunks (flow) and powers of two (HiFT stream chunks); see
``cosyjax.flow.stream`` and ``cosyjax.hift.stream``.
"""

from __future__ import annotations

import math


def geometric_bucket(n: int, minimum: int, per_octave: int = 2, multiple: int = 16) -> int:
    """Smallest table entry >= n (see the module docstring); ``minimum`` for n <= minimum."""
    n = int(n)
    if n <= minimum:
        return int(minimum)
    k = math.ceil(per_octave * math.log2(n / minimum) - 1e-9)
    while True:
        size = int(math.ceil(minimum * 2 ** (k / per_octave) / multiple) * multiple)
        if size >= n:
            return size
        k += 1


def bucket_table(limit: int, minimum: int, per_octave: int = 2, multiple: int = 16) -> list[int]:
    """Every bucket up to and including the one that holds ``limit``."""
    out, n = [], 1
    while True:
        b = geometric_bucket(n, minimum, per_octave, multiple)
        if not out or b != out[-1]:
            out.append(b)
        if b >= limit:
            return out
        n = b + 1


__all__ = ["bucket_table", "geometric_bucket"]
