"""diffdask.metrics against scikit-learn and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import sklearn.metrics as skm

import diffdask as dd
from diffdask import metrics


@pytest.fixture
def labels():
    rng = np.random.default_rng(11)
    truth = rng.random(500) < 0.3
    scores = truth * 0.8 + rng.normal(size=500)
    scores[:40] = np.round(scores[:40])  # ties
    return truth, scores, scores > 0.4


def test_confusion_matrix_and_rates_match_sklearn(labels):
    truth, _, pred = labels
    np.testing.assert_array_equal(metrics.confusion_matrix(truth, pred), skm.confusion_matrix(truth, pred))
    prf = metrics.precision_recall_f1(truth, pred)
    assert prf["precision"] == pytest.approx(skm.precision_score(truth, pred))
    assert prf["recall"] == pytest.approx(skm.recall_score(truth, pred))
    assert prf["f1"] == pytest.approx(skm.f1_score(truth, pred))


def test_roc_matches_sklearn(labels):
    truth, scores, _ = labels
    assert metrics.roc_auc(truth, scores) == pytest.approx(skm.roc_auc_score(truth, scores), abs=1e-12)
    fpr, tpr, thr = metrics.roc_curve(truth, scores)
    sk_fpr, sk_tpr, _ = skm.roc_curve(truth, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.roc_auc(truth, scores))
    assert thr[0] == np.inf and np.all(np.diff(thr) < 0)


def test_hand_computed_values():
    truth = np.array([1, 1, 1, 0, 0], dtype=bool)
    pred = np.array([1, 1, 0, 1, 0], dtype=bool)
    r = metrics.classification_report(truth, pred, scores=[0.9, 0.8, 0.3, 0.5, 0.3])
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (2, 1, 1, 1)
    assert r["tpr"] == pytest.approx(2 / 3) and r["fpr"] == pytest.approx(1 / 2)
    assert r["precision"] == pytest.approx(2 / 3) and r["f1"] == pytest.approx(2 / 3)
    # Pairs (pos, neg) ranked right: 0.9 and 0.8 beat both; 0.3 loses to 0.5, ties 0.3 (½).
    assert r["roc_auc"] == pytest.approx((2 + 2 + 0.5) / 6)
    assert np.isnan(metrics.precision_recall_f1([False, False], [False, False])["precision"])


def test_bad_inputs():
    with pytest.raises(dd.ParameterError, match="both classes"):
        metrics.roc_auc([True, True], [0.1, 0.2])
    with pytest.raises(dd.ParameterError, match="frames"):
        metrics.confusion_matrix([True, False], [True])
    with pytest.raises(dd.ParameterError, match="boolean"):
        metrics.confusion_matrix([0, 2], [True, False])
    with pytest.raises(dd.ParameterError, match="finite"):
        metrics.roc_auc([True, False], [np.nan, 0.0])


def test_intersection_over_union_against_python_sets():
    rng = np.random.default_rng(3)
    a, b, c = (rng.random(300) < p for p in (0.2, 0.3, 0.25))
    sets = [set(np.flatnonzero(m)) for m in (a, b, c)]
    assert metrics.intersection_over_union(a, b) == pytest.approx(len(sets[0] & sets[1]) / len(sets[0] | sets[1]))
    assert metrics.intersection_over_union(a, b, c) == pytest.approx(
        len(sets[0] & sets[1] & sets[2]) / len(sets[0] | sets[1] | sets[2]))
    assert metrics.intersection_over_union(a, a) == 1.0
    assert metrics.intersection_over_union(a, ~a) == 0.0
    assert np.isnan(metrics.intersection_over_union(np.zeros(4, bool), np.zeros(4, bool)))
    with pytest.raises(dd.ParameterError, match="two or more"):
        metrics.intersection_over_union(a)
    with pytest.raises(dd.ParameterError, match="same frames"):
        metrics.intersection_over_union(a, b[:10])
