"""bench.scope_signals: the AUC, the token-alignment score and the hand-written pairs, exactly."""

import numpy as np
import pytest

from bench.scope_signals import alignment_f1, auc, handwritten_pairs


def test_auc_counts_ordered_pairs_and_ties_half():
    assert auc([3, 4], [1, 2]) == 1.0
    assert auc([1, 2], [3, 4]) == 0.0
    assert auc([1, 3], [2, 2]) == 0.5
    assert auc([2], [2]) == 0.5


def test_alignment_f1_is_one_for_the_same_tokens_and_zero_for_orthogonal_ones():
    a = np.eye(3)[:2]
    assert alignment_f1(a, a) == pytest.approx(1.0)
    assert alignment_f1(a, np.eye(3)[2:]) == pytest.approx(0.0)
    # one of two tokens matched on each side: recall = precision = 0.5
    assert alignment_f1(a, np.eye(3)[[0, 2]]) == pytest.approx(0.5)


def test_handwritten_pairs_are_three_rewordings_and_one_other_question_per_fact():
    positives, negatives = handwritten_pairs()
    assert len(positives) == 3 * len(negatives) == 120
    assert ("The capital of Australia is", "The currency of Australia is", "Australia") in negatives
