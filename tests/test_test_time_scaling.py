"""Test-time scaling analysis: pass@k and maj@k against brute force, cost arithmetic, the match point,
the loader's errors and the plot, on hand-made records (no model, no GPU)."""

from __future__ import annotations

import json
import math
from collections import Counter
from fractions import Fraction
from itertools import combinations

import numpy as np
import pytest

from src.modules.evaluation import test_time_scaling as tts


def _brute_pass(n: int, c: int, k: int) -> float:
    hits = [any(i < c for i in subset) for subset in combinations(range(n), k)]
    return sum(hits) / len(hits)


def _brute_maj(answers, correct, k) -> float:
    """Every k-subset, plain Counter vote; a tie of the top answers earns the fraction of them correct."""
    right = {a for a, ok in zip(answers, correct) if ok}
    credits = []
    for subset in combinations(range(len(answers)), k):
        votes = Counter(answers[i] for i in subset if answers[i] is not None)
        if not votes:
            credits.append(0.0)
            continue
        top = max(votes.values())
        tied = [a for a, v in votes.items() if v == top]
        credits.append(sum(a in right for a in tied) / len(tied))
    return sum(credits) / len(credits)


def _write(folder, model, n_params, k, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").write_text(json.dumps({"model": model, "n_params": n_params, "k": k, "temp": 0.6}))
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _row(pid, sample, answer, correct, tokens=10, seconds=0.5):
    return {"prompt_id": pid, "sample": sample, "answer": answer, "correct": correct, "tokens": tokens,
            "seconds": seconds, "truncated": False}


# ---- pass@k ------------------------------------------------------------------------------------------

def test_pass_at_k_matches_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert tts.pass_at_k(n, c, k) == pytest.approx(_brute_pass(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edges_vectorised_and_large_n():
    assert tts.pass_at_k(10, 0, 3) == 0.0
    assert tts.pass_at_k(10, 10, 3) == 1.0
    assert tts.pass_at_k(10, 1, 10) == 1.0  # k = n: any correct sample is in the one subset
    assert tts.pass_at_k(10, 0, 10) == 0.0
    assert tts.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    c_P = np.array([0, 1, 5, 8])
    np.testing.assert_allclose(tts.pass_at_k(8, c_P, 2), [_brute_pass(8, c, 2) for c in c_P])
    np.testing.assert_allclose(tts.pass_at_k(np.array([4, 6]), np.array([1, 1]), 2), [0.5, 1 / 3])
    # C(1000, 500) overflows a float; the product form stays exact to rounding
    exact = 1 - Fraction(math.comb(990, 500), math.comb(1000, 500))
    assert tts.pass_at_k(1000, 10, 500) == pytest.approx(float(exact), rel=1e-12)
    for n, c, k in ((3, 1, 4), (3, 4, 1), (3, -1, 1), (3, 1, 0)):
        with pytest.raises(ValueError):
            tts.pass_at_k(n, c, k)


# ---- maj@k -------------------------------------------------------------------------------------------

def test_maj_at_k_hand_case():
    answers, correct = ["1", "1", "2", "2", "2"], [False, False, True, True, True]
    assert tts.maj_at_k(answers, correct, 5) == 1.0
    assert tts.maj_at_k(answers, correct, 1) == pytest.approx(3 / 5)
    # k=2: {2,2} 3 pairs score 1, mixed 6 pairs tie and score 1/2, {1,1} scores 0 -> 6/10
    assert tts.maj_at_k(answers, correct, 2) == pytest.approx(0.6)
    # k=3: "2" wins with >= 2 of 3: C(3,2)C(2,1) + C(3,3) = 7 of 10
    assert tts.maj_at_k(answers, correct, 3) == pytest.approx(0.7)


def test_maj_at_k_matches_enumeration_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(1, 9))
        answers = [None if v == 0 else str(v) for v in rng.integers(0, 4, n)]
        right = str(rng.integers(1, 4))
        correct = [a == right for a in answers]
        for k in range(1, n + 1):
            assert tts.maj_at_k(answers, correct, k) == pytest.approx(_brute_maj(answers, correct, k)), \
                (answers, right, k)


def test_none_never_wins():
    assert tts.maj_at_k([None, None, None, "x"], [False, False, False, True], 4) == 1.0
    assert tts.maj_at_k([None, None, None, "x"], [False, False, False, False], 4) == 0.0
    assert tts.maj_at_k([None, None, None], [False, False, False], 2) == 0.0
    # 2 of the 4 pairs are all-None and count as wrong; the others hold "x"
    assert tts.maj_at_k([None, None, "x"], [False, False, True], 2) == pytest.approx(2 / 3)


def test_maj_at_k_sampled_is_seeded_and_close_to_exact():
    rng = np.random.default_rng(1)
    answers = [str(v) for v in rng.integers(0, 4, 12)]
    correct = [a == "0" for a in answers]
    exact = tts.maj_at_k(answers, correct, 5)
    sampled = tts.maj_at_k(answers, correct, 5, max_exact=0, n_subsets=4000, seed=3)
    assert sampled == tts.maj_at_k(answers, correct, 5, max_exact=0, n_subsets=4000, seed=3)
    assert sampled == pytest.approx(exact, abs=4 * 0.5 / math.sqrt(4000))


# ---- curve, reference and match point ----------------------------------------------------------------

def test_scaling_curve_costs_and_accuracies(tmp_path):
    rows = [_row("a", i, "7" if i < 3 else "8", i < 3, tokens=10 + i, seconds=0.5) for i in range(4)]
    rows += [_row("b", i, str(i), i == 0, tokens=20, seconds=1.5) for i in range(4)]
    res = tts.load_results(_write(tmp_path / "m", "m", 1000, 4, rows))
    curve = tts.scaling_curve(res)
    assert [r["k"] for r in curve] == [1, 2, 4]
    mean_tokens = (10 + 11 + 12 + 13 + 4 * 20) / 8
    for r in curve:
        assert r["tokens"] == pytest.approx(r["k"] * mean_tokens)
        assert r["flops"] == pytest.approx(2 * 1000 * r["k"] * mean_tokens)
        assert r["seconds"] == pytest.approx(r["k"] * 1.0)
        assert r["avg@k"] == pytest.approx(4 / 8)
        assert r["pass@k"] == pytest.approx((tts.pass_at_k(4, 3, r["k"]) + tts.pass_at_k(4, 1, r["k"])) / 2)
    # prompt b: four distinct answers, one right -> every k scores 1/4; prompt a by enumeration
    a_answers = ["7", "7", "7", "8"]
    for r in curve:
        want = (_brute_maj(a_answers, [True, True, True, False], r["k"]) + 0.25) / 2
        assert r["maj@k"] == pytest.approx(want)
    assert [r["k"] for r in tts.scaling_curve(res, [3])] == [3]
    assert tts.default_ks(6) == [1, 2, 4, 6] and tts.default_ks(1) == [1]
    with pytest.raises(ValueError, match="1..4"):
        tts.scaling_curve(res, [8])


def _pair(tmp_path, teacher_right=(True, True, True, False)):
    """Teacher (32 params, greedy 100 tokens, 2 s) right on 3 of 4 prompts; student (7 params, 50 tokens,
    0.25 s per sample) with 8 samples per prompt: 5 right ("r") and 3 distinct wrong answers."""
    teacher = [_row(p, -1, "r" if ok else "w", ok, tokens=100, seconds=2.0)
               for p, ok in enumerate(teacher_right)]
    teacher += [_row(p, 0, "r", True, tokens=100, seconds=2.0) for p in range(4)]
    student = [_row(p, i, "r" if i < 5 else f"w{i}", i < 5, tokens=50, seconds=0.25)
               for p in range(4) for i in range(8)]
    return (tts.load_results(_write(tmp_path / "student", "student-7B", 7, 8, student)),
            tts.load_results(_write(tmp_path / "teacher", "teacher-32B", 32, 1, teacher)))


def test_match_point_known_answer(tmp_path):
    student, teacher = _pair(tmp_path)
    # maj@1 = maj@2 = 5/8 < 3/4; maj@4 = 65/70 + (5/70)(1/4) (one "r" against three distinct wrongs ties)
    m = tts.match_point(student, teacher)
    assert m["k"] == 4
    assert m["teacher_acc"] == pytest.approx(0.75)
    assert m["student_acc"] == pytest.approx((65 + 5 / 4) / 70)
    assert m["flops_ratio"] == pytest.approx(32 * 100 / (4 * 7 * 50))
    assert m["seconds_ratio"] == pytest.approx(2.0 / (4 * 0.25))
    assert (m["student"], m["teacher"]) == ("student-7B", "teacher-32B")
    # pass@2 = 1 - C(3,2)/C(8,2) = 25/28 already beats 3/4
    assert tts.match_point(student, teacher, metric="pass@k")["k"] == 2
    # against the teacher's (always right) sample the student's avg@k never gets there
    assert tts.match_point(student, teacher, metric="avg@k", teacher_metric="avg@1") is None


def test_match_point_none_when_never_reached(tmp_path):
    student, teacher = _pair(tmp_path, teacher_right=(True, True, True, True))
    # a perfect teacher: the student's maj@4 = 0.946 falls short, only maj@8 (5 "r" outvote 3) gets there
    assert tts.match_point(student, teacher, ks=[1, 2, 4]) is None
    assert tts.match_point(student, teacher)["k"] == 8


def test_match_point_refuses_different_prompts(tmp_path):
    student, _ = _pair(tmp_path)
    teacher = tts.load_results(_write(tmp_path / "t2", "t", 32, 0, [_row(9, -1, "r", True)]))
    with pytest.raises(ValueError, match="different prompts"):
        tts.match_point(student, teacher)


def test_reference_point(tmp_path):
    _, teacher = _pair(tmp_path)
    greedy = tts.reference_point(teacher)
    assert (greedy["acc"], greedy["tokens"], greedy["flops"], greedy["seconds"]) == (0.75, 100, 6400, 2.0)
    assert tts.reference_point(teacher, "maj@1")["acc"] == 1.0
    with pytest.raises(ValueError, match="greedy"):
        tts.reference_point(teacher, "best@1")


# ---- loading -----------------------------------------------------------------------------------------

def test_load_results_round_trip(tmp_path):
    student, teacher = _pair(tmp_path)
    assert (student.name, student.n_params, student.k) == ("student-7B", 7, 8)
    assert sorted(student.samples) == [0, 1, 2, 3] and not student.greedy
    assert [s.answer for s in student.samples[2]] == ["r"] * 5 + ["w5", "w6", "w7"]
    assert teacher.greedy[3] == tts.Sample("w", False, 100, 2.0, False)
    assert teacher.meta["temp"] == 0.6


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({k: v for k, v in _row("a", 1, "x", True).items() if k != "correct"}),
     "missing key 'correct'"),
    (json.dumps(_row("a", 1, "x", 1)), "'correct' should be bool"),
    (json.dumps({**_row("a", 1, "x", True), "tokens": True}), "'tokens' should be int"),
    (json.dumps(_row("a", 0, "x", True)), "duplicate row"),
    (json.dumps(_row("a", 2, "x", True)), "outside 0..1"),
    ("[1, 2]", "expected a JSON object"),
])
def test_load_results_names_file_and_line(tmp_path, bad, message):
    folder = _write(tmp_path / "m", "m", 2, 2, [_row("a", 0, "x", True)])
    with (folder / "samples.jsonl").open("a") as f:
        f.write("\n" + bad + "\n")  # a blank line 2 is skipped but still counted: the bad row is line 3
    with pytest.raises(ValueError, match=message) as err:
        tts.load_results(folder)
    assert f"{folder / 'samples.jsonl'}:3:" in str(err.value)


def test_load_results_incomplete_prompts_and_bad_meta(tmp_path):
    folder = _write(tmp_path / "m", "m", 2, 2, [_row("a", 0, "x", True), _row("a", 1, "x", True),
                                                  _row("b", 0, "x", True)])
    with pytest.raises(ValueError, match="prompt 'b' has 1 of its 2 samples"):
        tts.load_results(folder)
    folder = _write(tmp_path / "g", "m", 2, 1, [_row("a", 0, "x", True), _row("a", -1, "x", True),
                                                  _row("b", 0, "x", True)])
    with pytest.raises(ValueError, match="prompt 'b' has no greedy row"):
        tts.load_results(folder)
    (folder / "meta.json").write_text(json.dumps({"model": "m", "k": 1}))
    with pytest.raises(ValueError, match=r"meta\.json: 'n_params' should be int"):
        tts.load_results(folder)


# ---- reporting ---------------------------------------------------------------------------------------

def test_plot_scaling_writes_png(tmp_path):
    student, teacher = _pair(tmp_path)
    curves = {"student": tts.scaling_curve(student)}
    refs = {"teacher": tts.reference_point(teacher)}
    for x in ("flops", "seconds", "k"):
        path = tmp_path / f"scaling_{x}.png"
        fig = tts.plot_scaling(curves, refs, x=x, path=path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert fig.axes[0].get_xscale() == "log"
        # maj@k and pass@k lines, the teacher's horizontal line, and its star on a cost axis
        assert len(fig.axes[0].lines) == (3 if x == "k" else 4)
    with pytest.raises(ValueError, match="x should be"):
        tts.plot_scaling(curves, x="tokens")


def test_summary_table(tmp_path):
    student, teacher = _pair(tmp_path)
    table = tts.summary_table({"student": tts.scaling_curve(student)},
                              {"7B vs 32B": tts.match_point(student, teacher), "never": None})
    lines = table.splitlines()
    assert lines[0].startswith("| model | k | pass@k | maj@k |")
    assert "| student | 4 | 100.0 | 94.6 | 62.5 |" in table
    assert any(line.startswith("| 7B vs 32B | maj@k | greedy | 4 |") and "2.29x | 2.00x |" in line
               for line in lines)
    assert "| never | | | not reached |" in table
