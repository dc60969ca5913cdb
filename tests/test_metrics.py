"""torchmetrics classes for avg@k, pass@k and maj@k against brute force and the offline analysis."""

from __future__ import annotations

from itertools import combinations

import pytest
import torch

from src.modules.evaluation.metrics import AvgAtK, MajAtK, PassAtK, default_ks
from src.modules.evaluation.test_time_scaling import maj_at_k


def _brute_pass(correct: list[bool], k: int) -> float:
    subsets = list(combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_subset_enumeration_and_accumulates_over_batches():
    g = torch.Generator().manual_seed(0)
    correct_PG = torch.rand(10, 6, generator=g) < 0.3
    for k in (1, 2, 3, 6):
        m = PassAtK(k)
        m.update(correct_PG[:4])
        m.update(correct_PG[4:])  # two batches: the mean is over all prompts
        want = sum(_brute_pass(row, k) for row in correct_PG.tolist()) / 10
        assert m.compute().item() == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError):
        PassAtK(7).update(correct_PG)


def test_avg_and_maj_at_k():
    correct_PG = torch.tensor([[True, False, False, True], [False, False, False, False]])
    answers = [["4", "5", "5", "4"], [None, None, "3", "3"]]
    avg = AvgAtK()
    avg.update(correct_PG)
    assert avg.compute().item() == pytest.approx(0.25)
    maj = MajAtK(4)
    maj.update(answers, correct_PG)
    # prompt 0: "4" and "5" tie -> half credit; prompt 1: "3" wins and is wrong
    assert maj.compute().item() == pytest.approx(0.25)
    maj2 = MajAtK(2)
    maj2.update(answers, correct_PG)
    want = (maj_at_k(answers[0], correct_PG[0].tolist(), 2) + maj_at_k(answers[1], correct_PG[1].tolist(), 2)) / 2
    assert maj2.compute().item() == pytest.approx(want)


def test_states_reduce_by_sum_so_ranks_combine():
    """Two ranks' states merged (what DDP sync does) give the metric of the union."""
    a, b, both = PassAtK(2), PassAtK(2), PassAtK(2)
    x = torch.tensor([[True, False, False], [False, False, False]])
    y = torch.tensor([[True, True, False]])
    a.update(x), b.update(y), both.update(torch.cat([x, y]))
    a.merge_state(b)
    assert a.compute().item() == pytest.approx(both.compute().item())


def test_default_ks():
    assert default_ks(8) == [1, 2, 4, 8]
    assert default_ks(6) == [1, 2, 4, 6]
    assert default_ks(1) == [1]
