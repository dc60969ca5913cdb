"""The miniature's pieces: task generator, tokenizer, stage cache, and the main job (shortened)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from src.datamodules.arithmetic import ArithmeticTask, addition_steps
from src.modules.evaluation.grading import is_correct
from src.modules.models.stages import StageModel
from src.modules.models.tokenizer import build_char_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("digits", [1, 2, 3, 5])
def test_generator_answers_and_steps_are_right(digits):
    for row in ArithmeticTask("train", n=50 if digits == 1 else 200, digits=digits, seed=3)():
        a, b = map(int, row["prompt"].rstrip("=").split("+"))
        assert row["answer"] == str(a + b)
        assert is_correct(row["solution"], row["answer"])
        # every written column step is true arithmetic and its carry is the tens digit
        for line in row["solution"].splitlines()[:-1]:
            lhs, rhs = line.split("=")
            total, carry = rhs.split(" c")
            assert sum(map(int, lhs.split("+"))) == int(total) and int(carry) == int(total) // 10


def test_steps_example():
    assert addition_steps(347, 285) == "7+5=12 c1\n4+8+1=13 c1\n3+2+1=6 c0\n#### 632"


def test_splits_are_disjoint_and_deterministic():
    splits = {s: ArithmeticTask(s, n=500 if s == "train" else 100, digits=3, seed=0)() for s in ("train", "val", "test")}
    prompts = {s: {r["prompt"] for r in rows} for s, rows in splits.items()}
    assert not prompts["train"] & prompts["val"] and not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    # a different sampling seed draws other problems, never crossing the split boundary
    other = {r["prompt"] for r in ArithmeticTask("train", n=500, digits=3, seed=7)()}
    assert not other & (prompts["val"] | prompts["test"])
    assert splits["test"] == ArithmeticTask("test", n=100, digits=3, seed=0)()


def test_too_many_rows_for_the_problem_space_is_an_error():
    with pytest.raises(ValueError, match="distinct"):
        ArithmeticTask("test", n=50, digits=1)()


def test_tokenizer_round_trips_and_renders_chatml(tmp_path):
    tok = build_char_tokenizer()
    text = addition_steps(987, 654)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    chat = again.apply_chat_template([{"role": "user", "content": "12+34="}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\n12+34=<|im_end|>\n<|im_start|>assistant\n"
    assert again.eos_token == "<|im_end|>" and again.pad_token == "<|endoftext|>"


def test_model_folder_tokenizer_keeps_whitespace(tmp_path):
    """Next to a qwen2 config.json, AutoTokenizer builds Qwen2Tokenizer, which drops the character
    vocabulary's spaces and newlines; the framework's loader must hand out a faithful tokenizer."""
    from src.modules.models.specs import PretrainedLM, round_trips
    from src.modules.models.tiny import TinyQwen2

    path = TinyQwen2(cache_dir=str(tmp_path), hidden_size=32, num_layers=1).build()
    tok = PretrainedLM(path).load_tokenizer()
    text = addition_steps(347, 285)
    assert round_trips(tok) and tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.padding_side == "left"


def test_preflight_rejects_a_tokenizer_that_alters_text(tmp_path):
    from tokenizers import normalizers

    from src.modules.models.preflight import preflight
    from src.modules.models.tiny import TinyQwen2

    spec = TinyQwen2(cache_dir=str(tmp_path), hidden_size=32, num_layers=1)
    model, good, bad = spec.load_model(), spec.load_tokenizer(), spec.load_tokenizer()
    bad.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(ValueError, match="model.teacher's tokenizer .* does not round-trip"):
        preflight(model, good, model, bad)


TINY_STAGE = ["data.train.digits=2", "data.train.n=60", "data.val.n=8", "data.test.n=8", "data.batch_size=8",
              "data.eval_batch_size=8", "model.student.hidden_size=32", "model.student.num_layers=1",
              "trainer.max_steps=2", "trainer.val_check_interval=2", "rollout.max_new_tokens=8",
              "callbacks.progress_bar=null", "trainer.enable_progress_bar=false", "test=false", "stage_check=null"]


def test_stage_cache_is_reused_and_rebuilt_on_change(tmp_path):
    from src.train import train

    first = StageModel("mini_math_teacher", cache_dir=str(tmp_path), overrides=TINY_STAGE, runner=train)
    path = Path(first.build())
    assert (path / "config.json").exists() and (path / "stage.json").exists()

    def must_not_train(cfg):
        raise AssertionError("an unchanged stage config was retrained")

    again = StageModel("mini_math_teacher", cache_dir=str(tmp_path), overrides=TINY_STAGE, runner=must_not_train)
    assert again.build() == str(path)
    assert again.load_model().config.hidden_size == 32

    # how a stage is evaluated, and what runs it, do not change what it trains: same cache entry
    evaluated = StageModel("mini_math_teacher", cache_dir=str(tmp_path), overrides=TINY_STAGE + ["module.eval_samples=4"],
                           runner=must_not_train)
    assert evaluated.build() == str(path)

    changed = StageModel("mini_math_teacher", cache_dir=str(tmp_path), overrides=TINY_STAGE + ["module.optimizer.lr=0.01"],
                         runner=must_not_train)
    with pytest.raises(AssertionError, match="retrained"):
        changed.build()
    assert changed.path != str(path)
    unbuildable = StageModel("mini_math_teacher", cache_dir=str(tmp_path), overrides=TINY_STAGE + ["seed=7"],
                             key="model.teacher")
    with pytest.raises(ValueError, match="model.teacher: stage 'mini_math_teacher' is not cached .* no runner"):
        unbuildable.build()


def test_a_stage_that_misses_its_check_stops_and_is_never_cached(tmp_path, capsys):
    from src.modules.models.stages import StageCheckError
    from src.train import train

    strict = TINY_STAGE + ["stage_check={metric: val/mini_math/acc, min: 0.99}"]
    stage = StageModel("mini_math_teacher", cache_dir=str(tmp_path), overrides=strict, runner=train)
    with pytest.raises(StageCheckError, match=r"stage 'mini_math_teacher' reached val/mini_math/acc = 0\.\d{4}; "
                                               r"it must be >= 0\.99 .*nothing was cached"):
        stage.build()
    assert not (Path(stage.path) / "config.json").exists()
    (failed,) = Path(stage.path).parent.glob(f"{Path(stage.path).name}.failed-*")  # kept for inspection
    assert (failed / "checkpoints").exists()

    # a declaration only checks: the same training passes a loose check and lands in the same cache entry
    loose = StageModel("mini_math_teacher", cache_dir=str(tmp_path), runner=train,
                       overrides=TINY_STAGE + ["stage_check={metric: val/mini_math/acc, min: 0.0}"])
    loose.build()
    assert loose.path == stage.path
    assert "passes its check" in capsys.readouterr().out
    # the stricter declaration is checked again against the cached stage's recorded metrics
    with pytest.raises(StageCheckError, match="cached at .*delete it to rebuild"):
        StageModel("mini_math_teacher", cache_dir=str(tmp_path), overrides=strict, runner=train).build()
    missing = StageModel("mini_math_teacher", cache_dir=str(tmp_path), runner=train,
                         overrides=TINY_STAGE + ["seed=5", "stage_check={metric: val/mini_math/bogus, min: 0.5}"])
    with pytest.raises(StageCheckError, match="logged no such metric"):
        missing.build()


def test_a_chained_stage_hashes_the_stage_it_builds_on():
    from src.modules.models.stages import compose_stage, stage_digest

    mixed = stage_digest(compose_stage("tool_student_mixed"))
    # tool_student_mixed continues tool_student_init's model: a change there must rebuild it too
    upstream = ["model.student.overrides=['trainer.max_steps=400']"]
    assert stage_digest(compose_stage("tool_student_mixed", upstream)) != mixed
    assert stage_digest(compose_stage("tool_student_mixed")) == mixed
    # how a stage computes is part of what it is: without the CPU wing it rounds differently, another stage
    base = stage_digest(compose_stage("mini_math_teacher"))
    assert stage_digest(compose_stage("mini_math_teacher", ["accel=none"])) != base
    # what a run shows (rollout pages) and a data preset's declared use are not what it trains
    assert stage_digest(compose_stage("mini_math_teacher", ["callbacks.rollout_viewer.every_n_steps=7",
                                                            "data.purpose=evaluation"])) == base


def test_main_job_shortened_prints_the_table(tmp_path):
    """CI's version of `make train`: same entry point and stages, shrunk to seconds."""
    proc = subprocess.run(
        [sys.executable, "src/train.py", "experiment=mini_math_quick", f"paths.log_dir={tmp_path}/logs",
         f"paths.cache_dir={tmp_path}/cache", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    for row in ("teacher", "student before", "student after"):
        assert re.search(rf"{row}\s*│\s*\d+\.\d%\s*│\s*\d+\.\d\s*│\s*\d+\s*│\s*64", out), f"no '{row}' row in\n{out}"
    assert re.search(r"student gain: [+-]\d+\.\d points", out)
    assert len(list((tmp_path / "cache" / "stages").glob("mini_math_teacher-*"))) >= 1


def test_a_narrower_warm_start_distribution_drops_carries_into_a_column():
    from src.datamodules.arithmetic import carries_into

    assert carries_into(57, 68) == [1, 2] and carries_into(150, 250) == [2] and carries_into(11, 22) == []
    narrow = ArithmeticTask("train", n=400, digits=3, carry_free=[2])()
    assert all(2 not in carries_into(*map(int, r["prompt"][:-1].split("+"))) for r in narrow)
    rare = ArithmeticTask("train", n=2000, digits=3, carry_free=[2], carry_kept=0.1)()
    share = sum(2 in carries_into(*map(int, r["prompt"][:-1].split("+"))) for r in rare) / len(rare)
    assert 0.02 < share < 0.12  # about 0.45 * 0.1 / (0.55 + 0.045) of the rows
    with pytest.raises(ValueError, match="carry_kept must lie in"):
        ArithmeticTask("train", carry_kept=2.0)


def test_noisy_demonstrations_forget_a_carry_in_a_share_of_the_rows():
    from src.datamodules.arithmetic import addition_steps, carries_into

    assert addition_steps(347, 285, {2}) == "7+5=12 c1\n4+8+1=13 c1\n3+2=5 c0\n#### 532"
    assert addition_steps(347, 285, {1}) == "7+5=12 c1\n4+8=12 c1\n3+2+1=6 c0\n#### 622"
    assert addition_steps(950, 50, {1}) == "0+0=0 c0\n5+5=10 c1\n9+0+1=10 c1\n#### 1000"  # nothing to forget
    clean = ArithmeticTask("train", n=300)()
    assert clean == ArithmeticTask("train", n=300, carry_forgotten_at=[2])()
    assert [r["prompt"] for r in clean] == [r["prompt"] for r in ArithmeticTask(
        "train", n=300, carry_forgotten_at=[2], carry_forgotten=0.6)()]  # the same problems at any rate
    rows = ArithmeticTask("train", n=2000, digits=3, carry_forgotten_at=[2], carry_forgotten=0.6)()
    hit = [r for r in rows if 2 in carries_into(*map(int, r["prompt"][:-1].split("+")))]
    slipped = [r for r in hit if r["solution"].rsplit("#### ", 1)[1] != r["answer"]]
    assert 0.5 < len(slipped) / len(hit) < 0.7  # the slips are the only wrong rows, and about 60% of those hit
    assert all(r["solution"].rsplit("#### ", 1)[1] == r["answer"] for r in rows if r not in hit)
    for r in slipped:  # the hundreds line leaves out its "+1"
        assert not re.search(r"\n\d\+\d\+1=", r["solution"].split("\n", 2)[2])
    with pytest.raises(ValueError, match="carry_forgotten must lie in"):
        ArithmeticTask("train", carry_forgotten=1.5, carry_forgotten_at=[2])
    with pytest.raises(ValueError, match="needs carry_forgotten_at"):
        ArithmeticTask("train", carry_forgotten=0.5)


def test_an_interrupted_stage_build_resumes_from_its_last_checkpoint(tmp_path, capsys):
    from omegaconf import open_dict

    from src.train import train

    overrides = TINY_STAGE + ["trainer.max_steps=4", "callbacks.model_checkpoint.every_n_train_steps=2"]

    def killed_after_two_steps(cfg):  # the build's process dies after its step-2 checkpoint
        with open_dict(cfg):
            cfg.module.scheduler.total_steps = cfg.trainer.max_steps  # the schedule of the 4-step build
            cfg.trainer.max_steps = 2
        train(cfg)
        raise KeyboardInterrupt

    stage = StageModel("mini_math_teacher", cache_dir=str(tmp_path), overrides=overrides, runner=killed_after_two_steps)
    with pytest.raises(KeyboardInterrupt):
        stage.build()
    (left,) = Path(stage.path).parent.glob(f".build-{Path(stage.path).name}-*")
    assert (left / "checkpoints" / "last.ckpt").exists()

    steps = []

    def train_and_count(cfg):
        metrics, objects = train(cfg)
        steps.append((cfg.ckpt_path, objects["trainer"].global_step))
        return metrics, objects

    again = StageModel("mini_math_teacher", cache_dir=str(tmp_path), overrides=overrides, runner=train_and_count)
    path = Path(again.build())
    assert "resuming mini_math_teacher from an interrupted build" in capsys.readouterr().out
    ((ckpt_path, global_step),) = steps
    assert ckpt_path.endswith("last.ckpt") and global_step == 4  # went on from step 2, not from 0
    assert (path / "config.json").exists() and not list(path.parent.glob(".build-*"))

    # a build stopped under another config is not resumed by this one
    other = overrides + ["module.optimizer.lr=0.01"]
    with pytest.raises(KeyboardInterrupt):
        StageModel("mini_math_teacher", cache_dir=str(tmp_path), overrides=other, runner=killed_after_two_steps).build()
    (stale,) = Path(stage.path).parent.glob(".build-*")
    stale.rename(stale.parent / f".build-{Path(stage.path).name}-99999999")  # named as a build of the first config
    assert again._interrupted_build(again.stage_cfg, Path(again.path)) is None
