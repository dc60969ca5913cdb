"""Tool-use data (rows with function schemas), the miniature's task, the composite GRPO reward, and the
tool-use experiment's miniature end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from src.datamodules.prompts import PromptDataModule
from src.datamodules.rows import DataRowError
from src.datamodules.tool_use import CALCULATOR_SCHEMA, ToolArithmeticTask, ToolPrompts
from src.modules.evaluation.tool_score import CompositeToolScore
from src.modules.models.tokenizer import build_char_tokenizer
from src.tools.episodes import TOOL_CHAT_TEMPLATE

BARE = {"name": "calculator", "description": "math", "parameters": {"type": "object", "properties": {}}}


def write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_tool_prompts_read_schemas_in_every_form(tmp_path):
    path = write(tmp_path / "t.jsonl", [
        {"question": "1+1?", "tools": [BARE], "answer": 2, "id": "a"},
        {"prompt": "2+2?", "tools": [CALCULATOR_SCHEMA], "answer": "4"},
        {"messages": [{"role": "user", "content": "3+3?"}], "tools": json.dumps([BARE]), "answer": "6"},
    ])
    rows = ToolPrompts(path)()
    assert [r["answer"] for r in rows] == ["2", "4", "6"] and rows[0]["id"] == "a" and rows[1]["id"] == 2
    for r in rows:
        assert r["tools"][0]["type"] == "function" and r["tools"][0]["function"]["name"] == "calculator"


def test_bad_tool_rows_are_named_by_file_and_line(tmp_path, caplog):
    path = write(tmp_path / "bad.jsonl", [
        {"question": "ok", "tools": [BARE], "answer": "1"},
        "{not json",
        {"question": "no tools", "answer": "1"},
        {"question": "nameless", "tools": [{"parameters": {}}], "answer": "1"},
        {"question": "no answer", "tools": [BARE]},
    ])
    with pytest.raises(DataRowError) as e:
        ToolPrompts(path)()
    for line in (2, 3, 4, 5):
        assert f"bad.jsonl:{line}:" in str(e.value)
    with caplog.at_level("WARNING"):
        rows = ToolPrompts(path, on_error="skip")()
    assert len(rows) == 1 and sum("skipping" in r.message for r in caplog.records) == 4


def test_tool_arithmetic_task_is_right_deterministic_and_split_disjoint():
    train, test = ToolArithmeticTask("train", 200)(), ToolArithmeticTask("test", 50)()
    assert train == ToolArithmeticTask("train", 200)()
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    from src.tools.calculator import evaluate

    for r in train + test:
        assert str(evaluate(r["expression"])) == r["answer"] and r["tools"] == [CALCULATOR_SCHEMA]
        assert len(r["expression"].split("*")[0].split("+")[0].split("-")[0]) == 6


def test_direct_frac_swaps_that_share_of_demonstrations_and_keeps_the_problems():
    base, mixed = ToolArithmeticTask("train", 400)(), ToolArithmeticTask("train", 400, direct_frac=0.5)()
    assert [r["prompt"] for r in base] == [r["prompt"] for r in mixed]
    direct = [r for r in mixed if len(r["solution"]) == 1]
    assert 150 <= len(direct) <= 250  # about half, drawn from a stream of its own
    for r in direct:
        assert r["solution"] == [{"role": "assistant", "content": f"The answer is {r['answer']}."}]
    called = [(r, b) for r, b in zip(mixed, base) if len(r["solution"]) > 1]
    assert called and all(r["solution"] == b["solution"] for r, b in called)  # the others keep their episode
    assert mixed == ToolArithmeticTask("train", 400, direct_frac=0.5)()
    with pytest.raises(ValueError, match="direct_frac"):
        ToolArithmeticTask("train", 4, direct_frac=1.5)


def test_each_rows_tools_reach_its_prompt():
    tok = build_char_tokenizer()
    tok.chat_template = TOOL_CHAT_TEMPLATE
    rows = ToolArithmeticTask("train", 2)()
    rows[1] = {**rows[1], "tools": [{"type": "function", "function": {**BARE, "name": "abacus"}}]}
    dm = PromptDataModule(train=lambda: rows, batch_size=1)
    dm.set_tokenizer(tok)
    dm.setup("fit")
    first, second = (tok.decode(x) for x in dm.splits["train"].ids)
    assert '"name": "calculator"' in first and "abacus" not in first
    assert '"name": "abacus"' in second and "calculator" not in second


@pytest.mark.parametrize("response,score", [
    ('<tool_call>{"name": "calculator", "arguments": {"expression": "2*3"}}</tool_call>The answer is 6.', 1.2),
    ('<tool_call>{"name": "calculator", "arguments": {"expression": "2*3"}}</tool_call>The answer is 7.', 0.2),
    ("<tool_call>{oops</tool_call>The answer is 6.", 1.0),
    ("I think it is big.", 0.0),
])
def test_composite_tool_reward(response, score):
    assert CompositeToolScore()(response, "6") == pytest.approx(score)


def test_tool_use_miniature_runs_end_to_end(make_cfg, single_thread):
    from src.train import train

    # tiny random models instead of the trained stages (model=tool_mini), which take minutes to build
    cfg = make_cfg("experiment=tool_use", "miniature=tools", "model=tiny", "+model.student.chat_template=tools",
                   "+model.teacher.chat_template=tools", "data.batch_size=2", "data.train.n=16",
                   "data.val.n=4", "data.test.n=4", "rollout.max_new_tokens=12", "rollout.max_turns=2",
                   "trainer.max_steps=2", "trainer.val_check_interval=2", "callbacks.progress_bar=null",
                   "trainer.enable_progress_bar=false", fast=False)
    metrics, obj = train(cfg)
    assert type(obj["module"].rollout).__name__ == "ToolRollout"
    for name in ("acc", "truncation_rate", "tools/calls_per_episode", "tools/malformed_rate", "turns_mean"):
        assert f"val/tool_mini/{name}" in metrics
    assert "train/tools/calls_per_episode" in metrics
    report = json.loads((Path(cfg.paths.output_dir) / "report.json").read_text())
    assert set(report) == {"teacher", "student before", "student after"}
    assert {"calls_per_episode", "malformed_rate", "turns", "truncation_rate"} <= set(report["student after"])


def test_tool_use_miniature_uses_the_trained_stages(make_cfg):
    cfg = make_cfg("experiment=tool_use", "miniature=tools", fast=False)
    assert (cfg.model.student.experiment, cfg.model.teacher.experiment) == ("tool_student_mixed", "tool_teacher")
    grpo = make_cfg("experiment=tool_use", "miniature=tools", "algorithm=grpo", "reward=tool_composite", fast=False)
    assert grpo.model.teacher is None and grpo.rollout.num_samples == cfg.rollout.num_samples == 4
    assert grpo.reward.grader._target_ == "src.modules.evaluation.tool_score.CompositeToolScore"
    # no phase schedule left half-configured (a switch_step without a _target_) once GRPO turns it off
    assert not grpo.callbacks.get("phase_schedule") and cfg.callbacks.phase_schedule._target_
    for stage in ("tool_teacher", "tool_student_init", "tool_student_mixed"):
        stage_cfg = make_cfg(f"experiment={stage}", fast=False)
        assert stage_cfg.objective._target_.endswith("ReferenceSFT") and stage_cfg.model.teacher is None
        assert stage_cfg.data.train.digits == 4
    # the teacher and the copy-trained warm start are tiny Qwen2s; the student continues from that warm start
    # on demonstrations of which half skip the tool
    assert make_cfg("experiment=tool_student_init", fast=False).model.student.chat_template == "tools"
    mixed = make_cfg("experiment=tool_student_mixed", fast=False)
    assert mixed.model.student.experiment == "tool_student_init" and mixed.data.train.direct_frac == 0.5
    assert set(mixed.model.student) == {"_target_", "key", "experiment", "cache_dir", "overrides", "runner"}


def test_tool_use_paper_setting_composes(make_cfg):
    cfg = make_cfg("experiment=tool_use", "data.train.path=/d/train.jsonl", "data.test.path=/d/test.jsonl",
                   fast=False)
    assert cfg.model.teacher.path == "Qwen/Qwen2.5-7B-Instruct"
    assert [t._target_.rsplit(".", 1)[-1] for t in cfg.rollout.environment.tools] == [
        "Calculator", "PythonTool", "SearchTool"]
    grpo = make_cfg("experiment=tool_use", "algorithm=grpo", "reward=tool_composite", fast=False)
    assert grpo.reward.grader._target_ == "src.modules.evaluation.tool_score.CompositeToolScore" and grpo.model.teacher is None


def test_tool_arithmetic_rows_carry_a_reference_episode_with_the_real_calculators_reply():
    from src.tools import Calculator, ToolEnvironment
    from src.tools.calls import parse_tool_calls

    for r in ToolArithmeticTask("train", 20)():
        call, reply, answer = r["solution"]
        assert [m["role"] for m in r["solution"]] == ["assistant", "tool", "assistant"]
        (parsed,) = parse_tool_calls(call["content"])
        assert parsed.name == "calculator" and parsed.arguments == {"expression": r["expression"]}
        assert [reply] == ToolEnvironment([Calculator()]).execute(call["content"])
        assert reply["content"] == r["answer"] and answer["content"] == f"The answer is {r['answer']}."
        assert CompositeToolScore()(call["content"] + answer["content"], r["answer"]) == pytest.approx(1.2)


def test_tiny_model_chat_template_option(tmp_path):
    from src.modules.models.tiny import TinyQwen2

    default = TinyQwen2(cache_dir=str(tmp_path), hidden_size=32, num_layers=1)
    tools = TinyQwen2(cache_dir=str(tmp_path), hidden_size=32, num_layers=1, chat_template="tools")
    assert default.path != tools.path  # the template is part of the cache key
    assert TinyQwen2(cache_dir=str(tmp_path), hidden_size=32, num_layers=1, chat_template="chatml").path == default.path
    tok = tools.load_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "q"}], tools=[CALCULATOR_SCHEMA], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>system\nTools: calculator(expression)<|im_end|>\n<|im_start|>user\nq<|im_end|>\n" \
                   "<|im_start|>assistant\n"
    assert "Tools" not in default.load_tokenizer().apply_chat_template(
        [{"role": "user", "content": "q"}], tools=[CALCULATOR_SCHEMA], tokenize=False)
    with pytest.raises(ValueError, match="chat_template"):
        TinyQwen2(cache_dir=str(tmp_path), chat_template="qwen")
