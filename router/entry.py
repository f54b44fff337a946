"""What a zoo's ``registry.json`` says about its router: the kind, and the OOD quantile above
which an input goes to zero-shot CLIP. Plain values, so code that only reads or rewrites a zoo's
files imports none of the routers' torch code."""

from __future__ import annotations

from clipzoo.errors import ConfigError

RANPAC = "ranpac"            # class-Gaussian routing in a random-feature space (clipzoo.router.ranpac), the default
LEARNED = "learned"          # a trained sparse gate (clipzoo.router.learned)
NEAREST = "nearest-stats"    # each task's Gaussian, no file (clipzoo.router.gate.NearestStatsRouter)
KINDS = (RANPAC, LEARNED, NEAREST)
FILED = (RANPAC, LEARNED)    # kinds kept in versioned files

DEFAULT_QUANTILE = 0.99


def check_quantile(q: float) -> float:
    """``q`` if it is a valid fallback quantile, else ConfigError."""
    if not 0.0 < q < 1.0:
        raise ConfigError(f"OOD quantile must be in (0, 1), got {q}")
    return q
