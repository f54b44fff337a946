"""Ledoit-Wolf shrunk covariance in a few lines of torch (the estimator of scikit-learn's
``LedoitWolf``, without importing scikit-learn or scipy on the hot path)."""

from __future__ import annotations

import torch


def ledoit_wolf(x: torch.Tensor, assume_centered: bool = False) -> torch.Tensor:
    """Shrunk covariance ``(1 - s) * S + s * mu * I`` of samples ``x`` ``(N, D)``, with the empirical
    covariance ``S`` (divided by N), ``mu = trace(S) / D`` and Ledoit and Wolf's shrinkage ``s``:
    the same estimate as ``sklearn.covariance.LedoitWolf(assume_centered=...).fit(x).covariance_``
    (float64 in, float64 out)."""
    x = x.double()
    if x.ndim == 1:
        x = x.reshape(1, -1)
    n, p = x.shape
    if not assume_centered:
        x = x - x.mean(0)
    emp = x.T @ x / n
    if p == 1:
        return emp
    x2 = x * x
    trace = x2.sum(0) / n
    mu = trace.sum() / p
    beta_ = (x2.T @ x2).sum()
    delta_ = (emp * emp).sum()  # sum of squared coefficients of X.T @ X, over n**2
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - 2 * mu * trace.sum() + p * mu ** 2) / p
    beta = torch.minimum(beta, delta)
    s = 0.0 if float(beta) == 0 else float(beta / delta)
    out = (1 - s) * emp
    out.diagonal().add_(s * mu)
    return out
