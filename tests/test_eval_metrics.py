"""The evaluation metrics on tiny cases whose answers were computed by hand (in the comments)."""

from __future__ import annotations

import numpy as np
import pytest

from imgdedup.evaluation import metrics as m


def test_sweep_over_hamming_distances():
    # distances 0 2 2 5 9, duplicates at 0, 2 and 5; negatives at 2 and 9
    dist = np.array([0, 2, 2, 5, 9])
    lab = np.array([True, True, False, True, False])
    s = m.sweep(dist, lab, higher_is_closer=False)
    assert s.thresholds.tolist() == [0, 2, 5, 9]
    assert s.tp.tolist() == [1, 2, 3, 3] and s.fp.tolist() == [0, 1, 1, 2]
    np.testing.assert_allclose(s.precision, [1, 2 / 3, 3 / 4, 3 / 5])
    np.testing.assert_allclose(s.recall, [1 / 3, 2 / 3, 1, 1])
    np.testing.assert_allclose(s.fpr, [0, 0.5, 0.5, 1])
    # precision 1.0 only at radius 0 (recall 1/3); at >= 0.7 radius 5 wins with recall 1
    assert m.threshold_at_precision(s, 1.0) == {"threshold": 0.0, "precision": 1.0, "recall": 1 / 3, "fpr": 0.0,
                                                "fails_at": 2.0}
    assert m.threshold_at_precision(s, 0.7)["threshold"] == 5.0
    assert m.threshold_at_precision(s, 0.7)["recall"] == 1.0
    assert m.threshold_at_precision(s, 0.7)["fails_at"] == 9.0
    assert m.threshold_at_precision(s, 0.5)["fails_at"] is None  # every threshold reaches 0.5
    assert m.closest_negative(dist, lab, higher_is_closer=False) == 2.0


def test_sweep_over_similarities_takes_ties_together():
    sim = np.array([0.9, 0.8, 0.8, 0.1])
    lab = np.array([True, False, True, False])
    s = m.sweep(sim, lab, higher_is_closer=True)
    np.testing.assert_allclose(s.thresholds, [0.9, 0.8, 0.1])
    assert s.tp.tolist() == [1, 2, 2] and s.fp.tolist() == [0, 1, 2]
    assert m.threshold_at_precision(s, 0.99)["threshold"] == pytest.approx(0.9)
    assert m.closest_negative(sim, lab, higher_is_closer=True) == pytest.approx(0.8)
    # no duplicates at all: every threshold is all false positives, no threshold reaches the target
    assert m.threshold_at_precision(m.sweep(sim, np.zeros(4, bool), True), 0.5) is None


def test_confusion_and_prf_at_one_threshold():
    # radius 2 on the first case: tp 2 (0, 2), fp 1 (2), fn 1 (5), tn 1 (9)
    c = m.confusion(np.array([0, 2, 2, 5, 9]), np.array([1, 1, 0, 1, 0], bool), 2, higher_is_closer=False)
    assert (c["tp"], c["fp"], c["fn"], c["tn"]) == (2, 1, 1, 1)
    assert c["precision"] == pytest.approx(2 / 3) and c["recall"] == pytest.approx(2 / 3)
    assert c["f1"] == pytest.approx(2 / 3) and c["fpr"] == 0.5
    assert m.prf(0, 0, 4) == (1.0, 0.0, 0.0)  # nothing predicted: no false positive, no recall
    assert m.prf(3, 1, 0) == (0.75, 1.0, pytest.approx(2 * 0.75 / 1.75))


def test_average_precision_and_ndcg_by_hand():
    # ranked relevance 1 0 1 0 with 3 relevant items in total (one never retrieved):
    # AP = (1/1 + 2/3) / 3 = 5/9
    assert m.average_precision([1, 0, 1, 0], 3) == pytest.approx(5 / 9)
    # DCG = 1/log2(2) + 1/log2(4) = 1.5; ideal = 1 + 1/log2(3) + 1/2 = 2.1309298
    assert m.ndcg([1, 0, 1, 0], 3) == pytest.approx(1.5 / (1.5 + 1 / np.log2(3)))
    assert m.average_precision([1, 1], 2) == 1.0 and m.ndcg([1, 1], 2) == 1.0
    assert m.average_precision([], 1) == 0.0
    with pytest.raises(ValueError):
        m.average_precision([0], 0)


def test_ranking_metrics_on_three_images():
    # a and b are duplicates, c is distinct. Hamming distances: a-b 3, a-c 5, b-c 2.
    dist = np.array([[0, 3, 5], [3, 0, 2], [5, 2, 0]])
    same = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], bool)
    # query a ranks b, c -> AP 1, NDCG 1; query b ranks c, a -> AP 1/2, NDCG 1/log2(3); c has no duplicate
    full = m.ranking_metrics(dist, same, higher_is_closer=False)
    assert full["queries"] == 2 and full["skipped"] == 1
    assert full["map"] == pytest.approx(0.75)
    assert full["ndcg"] == pytest.approx((1 + 1 / np.log2(3)) / 2)
    # radius 2: a retrieves nothing, b retrieves only c -> both AP 0
    assert m.ranking_metrics(dist, same, False, threshold=2)["map"] == 0.0
    # radius 3: same as the full ranking (c is beyond for a, already ranked before a for b)
    assert m.ranking_metrics(dist, same, False, threshold=3)["map"] == pytest.approx(0.75)


def test_ranking_ties_count_against_the_signal():
    # a is equally far from its duplicate b and from c: the tie is ranked c first -> AP 1/2
    dist = np.array([[0, 2, 2], [2, 0, 9], [2, 9, 0]])
    same = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], bool)
    out = m.ranking_metrics(dist, same, higher_is_closer=False)
    assert out["map"] == pytest.approx((0.5 + 1.0) / 2)


def test_distribution_summary():
    assert m.distribution(np.array([4, 1, 3])) == {"n": 3, "min": 1.0, "median": 3.0, "max": 4.0,
                                                   "mean": pytest.approx(8 / 3)}
    assert m.distribution(np.array([]))["median"] is None
