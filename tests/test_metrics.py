"""Metric functions against hand-computed matrices, and their properties (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from clipzoo.tasks.metrics import (MATRIX_KEYS, METRIC_KEYS, SOURCES, avg_inc, avg_mtil, backward_transfer,
                                   forgetting, last_accuracy, mean_std, seen_accuracy_per_step, summary, transfer)

# R[i][j]: accuracy on task j after step i
R3 = [[0.9, 0.1, 0.2],
      [0.6, 0.8, 0.3],
      [0.5, 0.7, 0.9]]
# task 0 improves after its own step (0.5 -> 0.8) before dropping: forgetting uses the best, BWT the diagonal
R3_PEAK = [[0.5, 0.0, 0.0],
           [0.8, 0.6, 0.0],
           [0.4, 0.6, 0.7]]


def test_hand_computed_matrix():
    assert seen_accuracy_per_step(R3) == pytest.approx([0.9, 0.7, 0.7])
    assert avg_inc(R3) == pytest.approx((0.9 + 0.7 + 0.7) / 3)
    assert avg_mtil(R3) == pytest.approx((0.9 + 0.1 + 0.2 + 0.6 + 0.8 + 0.3 + 0.5 + 0.7 + 0.9) / 9)
    assert last_accuracy(R3) == pytest.approx(0.7)
    assert forgetting(R3) == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
    assert backward_transfer(R3) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert transfer(R3) == pytest.approx((0.1 + (0.2 + 0.3) / 2) / 2)


def test_the_two_averages_differ_where_the_papers_do():
    """avg_inc reads only the seen tasks; avg_mtil (ZSCL's Avg) all T x T cells, the upper triangle too."""
    assert avg_inc(R3_PEAK) == pytest.approx((0.5 + 0.7 + (0.4 + 0.6 + 0.7) / 3) / 3)
    assert avg_mtil(R3_PEAK) == pytest.approx(3.6 / 9)
    high_transfer = np.array(R3_PEAK)
    high_transfer[np.triu_indices(3, 1)] = 1.0  # perfect zero-shot on unseen tasks: only avg_mtil moves
    assert avg_inc(high_transfer) == pytest.approx(avg_inc(R3_PEAK))
    assert avg_mtil(high_transfer) == pytest.approx((3.6 + 3.0) / 9)


def test_one_list_of_keys_with_a_source_each():
    assert METRIC_KEYS[:len(MATRIX_KEYS)] == MATRIX_KEYS and len(set(METRIC_KEYS)) == len(METRIC_KEYS)
    assert tuple(summary(R3)) == MATRIX_KEYS and set(SOURCES) == set(MATRIX_KEYS)
    assert "avg" not in METRIC_KEYS


def test_forgetting_uses_the_best_earlier_accuracy():
    assert forgetting(R3_PEAK) == pytest.approx(((0.8 - 0.4) + 0.0) / 2)
    assert backward_transfer(R3_PEAK) == pytest.approx(((0.4 - 0.5) + 0.0) / 2)


def test_signs_forgetting_positive_bwt_negative():
    drop = [[1.0, 0.0], [0.2, 1.0]]
    assert forgetting(drop) == pytest.approx(0.8) and backward_transfer(drop) == pytest.approx(-0.8)
    gain = [[0.2, 0.0], [0.6, 1.0]]  # learning task 1 helped task 0: positive BWT, negative forgetting
    assert forgetting(gain) == pytest.approx(-0.4) and backward_transfer(gain) == pytest.approx(0.4)


def test_single_task_and_bad_shapes():
    assert summary([[0.7]]) == {"avg_mtil": 0.7, "avg_inc": 0.7, "last": 0.7, "forgetting": 0.0, "bwt": 0.0,
                                "transfer": 0.0}
    for bad in ([], [[0.1, 0.2]], [[0.1], [0.2]]):
        with pytest.raises(ValueError, match="square"):
            summary(bad)


def test_mean_std():
    assert mean_std([0.2, 0.4, None]) == {"mean": pytest.approx(0.3), "std": pytest.approx(0.1), "n": 2}
    assert mean_std([None]) == {"mean": None, "std": None, "n": 0}


def square(min_t: int = 1):
    return st.integers(min_t, 7).flatmap(
        lambda t: arrays(np.float64, (t, t), elements=st.floats(0, 1, allow_nan=False)))


@settings(max_examples=200, deadline=None)
@given(square())
def test_forgetting_dominates_negative_bwt_and_avg_mtil_mixes_the_triangles(R):
    m = summary(R)
    assert m["forgetting"] >= -m["bwt"] - 1e-6  # the best earlier accuracy is at least the diagonal one
    T = len(R)
    lower = R[np.tril_indices(T)].sum()  # avg_mtil = (lower-triangle sum + upper-triangle sum) / T^2
    assert m["avg_mtil"] == pytest.approx((lower + R[np.triu_indices(T, 1)].sum()) / T ** 2, abs=1e-6)
    assert m["avg_inc"] == pytest.approx(np.mean([R[i, :i + 1].mean() for i in range(T)]), abs=1e-6)


@settings(max_examples=200, deadline=None)
@given(square(2))
def test_no_change_after_learning_means_no_forgetting(R):
    frozen = R.copy()
    for i in range(len(R)):
        frozen[i, :i] = np.diag(R)[:i]  # each task keeps the accuracy it had right after being learned
    assert forgetting(frozen) == pytest.approx(0.0, abs=1e-12)
    assert backward_transfer(frozen) == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(square(2))
def test_monotone_decay_makes_forgetting_equal_minus_bwt(R):
    decaying = np.tril(R)
    for j in range(len(R)):  # accuracy on task j only falls after it is learned
        decaying[j:, j] = np.minimum.accumulate(decaying[j:, j])
    assert forgetting(decaying) == pytest.approx(-backward_transfer(decaying))


@settings(max_examples=100, deadline=None)
@given(square(2), st.floats(0, 1))
def test_triangles_are_independent(R, v):
    """Transfer reads only the upper triangle; the other metrics only the lower one (with the diagonal)."""
    upper, lower = R.copy(), R.copy()
    upper[np.triu_indices(len(R), 1)] = v
    lower[np.tril_indices(len(R))] = v
    for f in (avg_inc, forgetting, backward_transfer):
        assert f(upper) == pytest.approx(f(R))
    assert last_accuracy(upper) == pytest.approx(last_accuracy(R))  # the last row has no upper entries
    assert transfer(lower) == pytest.approx(transfer(R))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 7), st.floats(0, 1))
def test_constant_matrix(t, c):
    m = summary(np.full((t, t), c))
    assert m["avg_inc"] == pytest.approx(c, abs=1e-6) and m["last"] == pytest.approx(c, abs=1e-6)
    assert m["avg_mtil"] == pytest.approx(c, abs=1e-6)
    assert m["forgetting"] == 0 and m["bwt"] == 0
    assert m["transfer"] == pytest.approx(c if t > 1 else 0.0, abs=1e-6)
