"""Scores of per-frame decisions against ground truth (simulations) or a reference.

Binary decisions (single hit or not, hit or not, inside a region or not) are compared with
`confusion_matrix` and its rates; continuous scores with `roc_curve` / `roc_auc`. Every
function takes NumPy, Dask or xarray inputs of one value per frame and returns plain NumPy /
Python values. Conventions: the *positive* class is ``True`` (e.g. ``single_hit``); a larger
score means "more positive".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diffdask.errors import ParameterError


def _as_bool(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ParameterError(f"{name} must be one value per frame (1-D), got shape {arr.shape}.")
    if arr.dtype != bool:
        if arr.dtype.kind not in "biuf" or not np.all(np.isin(arr, (0, 1))):
            raise ParameterError(f"{name} must be boolean (or 0/1), got dtype {arr.dtype}.")
        arr = arr.astype(bool)
    return arr


def _pair(truth: Any, predicted: Any, pred_name: str = "predicted") -> tuple[np.ndarray, np.ndarray]:
    t = _as_bool("truth", truth)
    p = np.asarray(predicted)
    if p.shape != t.shape:
        raise ParameterError(f"truth has {t.shape[0]} frames but {pred_name} has shape {p.shape}.")
    return t, p


def confusion_matrix(truth: Any, predicted: Any) -> np.ndarray:
    """2×2 counts ``[[TN, FP], [FN, TP]]`` (rows: truth False/True; columns: predicted).

    Parameters
    ----------
    truth, predicted : array_like of bool, shape (n_frames,)

    Returns
    -------
    ndarray of int64, shape (2, 2)
        The layout of `sklearn.metrics.confusion_matrix` with labels (False, True).
    """
    t, p = _pair(truth, predicted)
    p = _as_bool("predicted", p)
    return np.array(
        [[np.sum(~t & ~p), np.sum(~t & p)], [np.sum(t & ~p), np.sum(t & p)]],
        dtype=np.int64,
    )


def _ratio(num: float, den: float) -> float:
    # An empty class has no rate: NaN says so, 0 or 1 would pretend a measurement.
    return float(num) / float(den) if den else float("nan")


def precision_recall_f1(truth: Any, predicted: Any) -> dict[str, float]:
    """Precision, recall (= TPR) and F1 of the positive class.

    Returns
    -------
    dict
        ``precision`` TP/(TP+FP), ``recall`` TP/(TP+FN), ``f1`` their harmonic mean; NaN
        where a denominator is 0.
    """
    (tn, fp), (fn, tp) = confusion_matrix(truth, predicted)
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {"precision": precision, "recall": recall, "f1": f1}


def roc_curve(truth: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Receiver operating characteristic of a continuous score.

    Parameters
    ----------
    truth : array_like of bool, shape (n_frames,)
    scores : array_like of float, shape (n_frames,)
        Larger = more likely positive.

    Returns
    -------
    fpr, tpr : ndarray
        False- and true-positive rates when calling positive every frame with score ≥ the
        threshold, from (0, 0) to (1, 1); tied scores make one step.
    thresholds : ndarray
        Decreasing; the first is +inf (nothing called positive).

    Raises
    ------
    ParameterError
        If a class is empty or a score is not finite.
    """
    t, s = _pair(truth, scores, "scores")
    s = s.astype(np.float64)
    if not np.all(np.isfinite(s)):
        raise ParameterError("scores must be finite; drop or fix NaN/inf scores first.")
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        raise ParameterError(
            f"a ROC curve needs both classes; truth has {n_pos} positive and {n_neg} negative frames."
        )
    order = np.argsort(-s, kind="mergesort")
    s_sorted, t_sorted = s[order], t[order]
    # Last index of each run of tied scores: one ROC point per distinct threshold.
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    tps = np.cumsum(t_sorted)[last]
    fps = (last + 1) - tps
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    thresholds = np.r_[np.inf, s_sorted[last]]
    return fpr, tpr, thresholds


def roc_auc(truth: Any, scores: Any) -> float:
    """Area under the ROC curve: P(score of a random positive > that of a random negative).

    Computed from ranks (Mann–Whitney U, ties count ½), exact and O(n log n).

    Parameters
    ----------
    truth : array_like of bool, shape (n_frames,)
    scores : array_like of float, shape (n_frames,)
        Larger = more likely positive.

    Returns
    -------
    float in [0, 1]
    """
    from scipy.stats import rankdata

    t, s = _pair(truth, scores, "scores")
    s = s.astype(np.float64)
    if not np.all(np.isfinite(s)):
        raise ParameterError("scores must be finite; drop or fix NaN/inf scores first.")
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        raise ParameterError(f"ROC AUC needs both classes; truth has {n_pos} positive and {n_neg} negative frames.")
    ranks = rankdata(s)
    u = ranks[t].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def classification_report(truth: Any, predicted: Any, scores: Any = None) -> dict[str, float]:
    """Everything a sorting table needs, in one dict.

    Parameters
    ----------
    truth, predicted : array_like of bool, shape (n_frames,)
    scores : array_like of float, optional
        Continuous score (larger = more positive) for ``roc_auc``.

    Returns
    -------
    dict
        ``tp``, ``fp``, ``tn``, ``fn`` (counts); ``tpr`` (recall: positives kept), ``fpr``
        (negatives called positive), ``tnr`` (negatives rejected), ``precision``, ``f1``,
        ``accuracy`` and, with scores, ``roc_auc``.
    """
    (tn, fp), (fn, tp) = confusion_matrix(truth, predicted)
    prf = precision_recall_f1(truth, predicted)
    report: dict[str, float] = {
        "tp": int(tp),
        "fp": int(fp),
        "tn": int(tn),
        "fn": int(fn),
        "tpr": prf["recall"],
        "fpr": _ratio(fp, fp + tn),
        "tnr": _ratio(tn, fp + tn),
        "precision": prf["precision"],
        "f1": prf["f1"],
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
    }
    if scores is not None:
        report["roc_auc"] = roc_auc(truth, scores)
    return report


def intersection_over_union(*selections: Any) -> float:
    """Intersection over union α = |A ∩ B ∩ …| / |A ∪ B ∪ …| of frame selections (Assalauova 2022, eq. 4).

    Compares selections of the same frames made by different methods (a CNN and EM, two CNN
    configurations, a classifier and latent-space sorting): 1 when they pick the same frames,
    0 when they share none. The paper applies it to pairs and to triples of selections.

    Parameters
    ----------
    *selections : array_like of bool, shape (n_frames,)
        Two or more per-frame masks over the same frames (True = selected).

    Returns
    -------
    float
        α in [0, 1]; NaN when no selection holds a frame (the union is empty).
    """
    if len(selections) < 2:
        raise ParameterError(f"intersection_over_union compares two or more selections, got {len(selections)}.")
    masks = [_as_bool(f"selection {i}", s) for i, s in enumerate(selections)]
    if len({m.shape for m in masks}) != 1:
        raise ParameterError(f"selections must cover the same frames; got lengths {[m.size for m in masks]}.")
    stacked = np.stack(masks)
    return _ratio(np.sum(stacked.all(axis=0)), np.sum(stacked.any(axis=0)))


__all__ = ["classification_report", "confusion_matrix", "intersection_over_union", "precision_recall_f1", "roc_auc",
           "roc_curve"]
