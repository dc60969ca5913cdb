"""The study's analysis (gap closed, its area against log rollouts, rollouts to g = 0.5, paired t-intervals, the
tables and the figure) on synthetic curves, and its commands."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sample_efficiency", ROOT / "benchmarks" / "sample_efficiency.py")
se = importlib.util.module_from_spec(spec)
spec.loader.exec_module(se)
BUDGET = 12_800


def _rows():
    """Warm start 0.5, teacher 1.0: REOPOLD closes the gap by 1,600 rollouts, OPD by 6,400, seed by seed."""
    rows = []
    for seed in range(3):
        for samples, fast, slow in ((0, 0.5, 0.5), (1600, 0.9 + 0.01 * seed, 0.6), (6400, 1.0, 0.8 + 0.01 * seed),
                                    (12800, 1.0, 0.95)):
            rows.append({"arm": "regime", "method": "reopold", "seed": seed, "samples": samples, "val_acc": fast})
            rows.append({"arm": "regime", "method": "opd", "seed": seed, "samples": samples, "val_acc": slow})
    return rows


def test_gap_closed_and_its_area_against_log_rollouts():
    assert se.gap_closed(0.75, 0.5, 1.0) == 0.5
    # g = 1 from the first evaluation on: area 1; g = 0 throughout: 0; values outside [0, 1] are clipped
    assert se.area_under_g([(0, 0.0), (100, 1.0), (BUDGET, 1.0)], BUDGET) == pytest.approx(1.0)
    assert se.area_under_g([(0, 0.0), (100, -0.3), (BUDGET, 0.0)], BUDGET) == pytest.approx(0.0)
    assert se.area_under_g([(100, 1.7), (BUDGET, 1.2)], BUDGET) == pytest.approx(1.0)
    # a linear rise in log(rollouts) from 0 to 1: one half; the last value is held to the budget
    assert se.area_under_g([(100, 0.0), (BUDGET, 1.0)], BUDGET) == pytest.approx(0.5)
    assert se.area_under_g([(100, 0.0), (1000, 1.0)], 10_000) == pytest.approx(0.75)
    assert math.isnan(se.area_under_g([(0, 0.2), (100, 0.4)], BUDGET))  # one evaluation after the start


def test_rollouts_to_half_are_censored_at_the_budget():
    assert se.rollouts_to([(0, 0.0), (1600, 0.4), (3200, 0.6)], 0.5) == 3200
    assert math.isinf(se.rollouts_to([(0, 0.0), (1600, 0.4)], 0.5))
    assert se.fmt_rollouts([3200, 1600, math.inf], BUDGET) == "3,200 (2/3)"
    assert se.fmt_rollouts([3200, math.inf, math.inf], BUDGET) == "> 12,800 (1/3)"


def test_paired_t_interval():
    mean, _, hi = se.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and hi - mean == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert math.isnan(se.t_interval([1.0])[1])


def test_analysis_ranks_the_faster_method_and_pairs_by_seed():
    refs = {"regime": {"teacher_acc": 1.0, "warm_acc": 0.5}}
    result = se.analyse(_rows(), refs, BUDGET)
    reopold, opd = result["regime"]["reopold"], result["regime"]["opd"]
    assert all(reopold[s]["auc"] > opd[s]["auc"] for s in range(3))
    assert [reopold[s]["to_half"] for s in range(3)] == [1600] * 3 and [opd[s]["to_half"] for s in range(3)] == [6400] * 3
    n, (mean, lo, hi) = se.paired(result, "regime", "reopold", "opd")
    assert n == 3 and 0 < lo < mean < hi
    text = se.report(result, {**refs, "lr": {"reopold": 1e-4}}, BUDGET, greedy={})
    assert "| reopold | 0.0001 | 3 | 100.0 ± 0.0 |" in text
    rows = [line for line in text.splitlines() if line.startswith(("| reopold | 0.0001", "| opd | - | 3"))]
    assert len(rows) == 2 and all(line.endswith(" | - | - |") for line in rows)  # no KLs or cosines given
    with_kls = se.report(result, refs, BUDGET, greedy={}, kls={("regime", "opd"): [(0.5, 0.25), (0.25, 0.75)]},
                         cosines={("regime", "opd"): [0.5, 0.25, 0.0]})
    assert "| 0.3750 / 0.5000 | 0.250 |" in with_kls
    assert "| opd | 3 | +" in text  # REOPOLD - OPD, positive
    assert "Primary comparisons, stated before the runs" in text


def test_csv_round_trip_and_figure(tmp_path):
    pytest.importorskip("matplotlib")
    se.write_csv(_rows(), tmp_path / "s.csv")
    assert se.read_csv(tmp_path / "s.csv") == _rows()
    assert (tmp_path / "s.csv").read_text().splitlines()[0] == "arm,method,seed,samples,val_acc"
    result = se.analyse(_rows(), {"regime": {"teacher_acc": 1.0, "warm_acc": 0.5}}, BUDGET)
    se.plot(result, {("regime", "reopold"): 1e8, ("regime", "opd"): 1e8}, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 10_000


def test_flops_count_the_teachers_decoding_for_sft_and_its_scoring_on_policy():
    assert se.flops_per_rollout("sft", 10, 1, 100) == 10 * (200 + 6)
    assert se.flops_per_rollout("reopold", 10, 1, 100) == 10 * (8 + 200)
    assert se.flops_per_rollout("grpo", 10, 1, 100) == 80


def test_each_run_is_the_main_job_with_its_method_arm_and_evaluation():
    cmd = se.train_cmd("control", "gkd_reverse_kl", 3, 1e-4, Path("/tmp/x"), "test")
    assert "experiment=mini_math" in cmd and "algorithm=gkd" in cmd and "objective.beta=1.0" in cmd
    assert "model.student.overrides=['data.train.carry_forgotten=1.0']" in cmd
    assert f"+callbacks.diagnostics._target_={se.DIAGNOSTICS}" in cmd and f"module.grad_cosine_every={se.EVAL_EVERY}" in cmd
    assert not [c for c in se.train_cmd("regime", "grpo", 0, 1e-4, Path("/tmp/x"), "test") if "diagnostics" in c]
    assert {"seed=3", "module.optimizer.lr=0.0001", "data.val.split=test", f"data.val.n={se.TEST_PROMPTS}",
            f"module.eval_samples={se.EVAL_SAMPLES}", "validate_before=true"} <= set(cmd)
    assert "data.val.split=val" in se.train_cmd("regime", "sft", se.TUNE_SEED, 1e-3, Path("/tmp/x"), "val")


def test_a_finished_run_is_reused_only_for_the_same_command(tmp_path):
    import json

    cmd = se.train_cmd("regime", "opd", 0, 1e-4, tmp_path, "test")
    assert not se.finished(tmp_path, cmd)
    (tmp_path / "done.json").write_text(json.dumps({"seconds": 1.0, "cmd": ["/another/python", *cmd[1:]]}))
    assert se.finished(tmp_path, cmd)  # another interpreter path: the same run
    assert se.finished(tmp_path, se.train_cmd("regime", "opd", 0, 1e-4, tmp_path / "moved", "test"))  # a moved study
    assert not se.finished(tmp_path, se.train_cmd("regime", "opd", 0, 3e-4, tmp_path, "test"))  # another rate
    assert not se.finished(tmp_path, [c.replace(f"max_steps={se.STEPS}", "max_steps=7") for c in cmd])


def test_every_run_and_every_mechanism_evaluation_reads_the_same_test_prompts():
    """The runs evaluate ``data.val`` pointed at the test split, the mechanism's evaluations ``data.test``: the same
    rows in the same order, whatever the seed (so runs pair by seed on the same prompts)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    evaluated = se.test_rows(se.mechanism_cmd("regime", 3, Path("/tmp/x"), Path("/tmp/out")))
    assert len(evaluated) == se.TEST_PROMPTS
    assert evaluated == se.test_rows(se.mechanism_cmd("control", 0, None, Path("/tmp/out")))
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        run = compose("train", overrides=[o for o in se.train_cmd("regime", "opd", 7, 1e-4, Path("/tmp/x"), "test")[2:]
                                          if not o.startswith("hydra.")])
    assert instantiate(run.data.val)() == evaluated


def test_the_mechanism_counts_hundreds_lines_that_add_the_carry(tmp_path):
    """Greedy responses written with and without the carry into the hundreds; sampled ones are counted apart."""
    import json

    from src.datamodules.arithmetic import addition_steps, carries_into

    rows = se.test_rows(se.mechanism_cmd("regime", 0, Path("/tmp/x"), tmp_path))
    with (tmp_path / "samples.jsonl").open("w") as f:
        for i, row in enumerate(rows):
            a, b = map(int, row["prompt"].rstrip("=").split("+"))
            forget = {2} if i % 2 else set()  # every other response forgets the carry into the hundreds
            text = addition_steps(a, b, forget)
            for sample in (-1, 0):  # a sampled response that always forgets: not the greedy measure's
                wrote = text if sample == -1 else addition_steps(a, b, {2})
                f.write(json.dumps({"prompt_id": i, "sample": sample, "correct": wrote.endswith(f"#### {a + b}"),
                                    "response": wrote, "reference": row["answer"]}) + "\n")
    carried = [i for i, r in enumerate(rows) if 2 in carries_into(*map(int, r["prompt"].rstrip("=").split("+")))]
    m = se.carry_measure(tmp_path / "samples.jsonl", rows)
    assert m["problems_with_carry"] == len(carried) and 0 < len(carried) < len(rows)
    assert m["carry_written"] == pytest.approx(sum(i % 2 == 0 for i in carried) / len(carried))
    assert m["acc_carry"] == m["carry_written"] and m["acc_no_carry"] == 1.0
    assert m["carry_written_sampled"] == 0.0  # the sampled responses, counted apart, always forget it
    with pytest.raises(ValueError, match="not the prompts this evaluation read"):
        se.carry_measure(tmp_path / "samples.jsonl", rows[1:] + rows[:1])


def test_another_design_needs_its_own_folders(tmp_path):
    with pytest.raises(SystemExit):  # the study's folders: its finished runs and tables would be replaced
        se.main(["--steps", "4", "--analyse-only"])
    se.main(["--steps", "4", "--analyse-only", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
