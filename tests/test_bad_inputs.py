"""Bad input a user can give, each answered by one message naming the key, file or row, before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from src.train import train

QUIET = ("test=false", "trainer.val_check_interval=100")


def _nothing_written(cfg) -> bool:
    out = Path(cfg.paths.output_dir)
    return not list(out.rglob("*.ckpt")) and not (out / "checkpoints" / "hf").exists()


def test_a_prompt_past_the_models_positions_is_refused_by_split_and_row(make_cfg):
    # the tiny models have 1,024 positions: the prompts fit, prompt plus budget does not
    cfg = make_cfg(*QUIET, "rollout.max_new_tokens=1020")
    with pytest.raises(ValueError, match=r"data.train: row .* has a prompt of \d+ tokens; with "
                                         r"rollout.max_new_tokens=1020 a sequence reaches \d+ positions, past "
                                         r"model.\w+'s max_position_embeddings \(1024\)"):
        train(cfg)
    assert _nothing_written(cfg)


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=0", "data.batch_size must be a positive whole number, got 0"),
    ("data.eval_batch_size=-2", "data.eval_batch_size must be a positive whole number, got -2"),
    ("rollout.max_new_tokens=0", "rollout.max_new_tokens must be >= 1, got 0"),
    ("module.optimizer.lr=-1", "module.optimizer.lr must be a positive number, got -1"),
])
def test_a_value_out_of_range_names_its_key(make_cfg, override, message):
    cfg = make_cfg(*QUIET, override)
    with pytest.raises(Exception, match=message):  # Hydra wraps a constructor's ValueError, message kept
        train(cfg)
    assert _nothing_written(cfg)


def test_a_huge_learning_rate_is_warned_about(make_cfg):
    with pytest.warns(UserWarning, match=r"module.optimizer.lr=1e\+06 is far above"):
        try:
            train(make_cfg(*QUIET, "module.optimizer.lr=1e6", "trainer.max_steps=1"))
        except Exception as e:  # the guards may stop the diverging run: that is their business
            assert "NaN or inf" in str(e)


def test_jsonl_rows_with_a_null_or_numeric_field_are_named_by_file_and_line(tmp_path):
    from src.datamodules.prompts import JsonlPrompts
    from src.datamodules.rows import DataRowError

    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": null}\n'
                    '{"prompt": null, "answer": "3"}\n{"prompt": 42, "answer": "4"}\n{"prompt": "  ", "answer": 5}\n')
    with pytest.raises(DataRowError) as e:
        JsonlPrompts(str(path))()
    message = str(e.value)
    assert f"{path.name}:2: empty answer (field 'answer' is None)" in message
    assert f"{path.name}:3: prompt is a NoneType, neither text nor a list of chat messages" in message
    assert f"{path.name}:4: prompt is an int" in message
    assert f"{path.name}:5: empty prompt (field 'prompt')" in message
    assert ":1:" not in message
    assert JsonlPrompts(str(path), on_error="skip")() == [{"prompt": "1+1=", "answer": "2", "id": 1}]


def test_chat_messages_without_text_and_answers_that_are_not_answers_are_named_by_file_and_line(tmp_path):
    from src.datamodules.prompts import JsonlPrompts
    from src.datamodules.rows import DataRowError

    path = tmp_path / "chat.jsonl"
    path.write_text('{"prompt": [{"role": "user", "content": null}], "answer": "2"}\n'
                    '{"prompt": [{"role": null, "content": "hi"}], "answer": "2"}\n'
                    '{"prompt": "1+1=", "answer": {"x": 1}}\n{"prompt": "1+1=", "answer": true}\n'
                    '{"prompt": [{"role": "user", "content": "1+1="}], "answer": 2}\n')
    with pytest.raises(DataRowError) as e:
        JsonlPrompts(str(path))()
    message = str(e.value)
    assert f"{path.name}:1: prompt message 0 (user) has content None, neither text nor a list of parts" in message
    assert f"{path.name}:2: prompt message 0 has role None, not a role name" in message
    assert f"{path.name}:3: answer is a dict ({{'x': 1}}), not text or a number" in message
    assert f"{path.name}:4: answer is a bool (True), not text or a number" in message
    assert ":5:" not in message


def test_tool_rows_with_a_prompt_or_answer_that_is_not_text_are_named_by_file_and_line(tmp_path):
    from src.datamodules.rows import DataRowError
    from src.datamodules.tool_use import ToolPrompts

    tools = '[{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object", "properties": {}}}}]'
    path = tmp_path / "tools.jsonl"
    path.write_text(f'{{"question": 42, "answer": "1", "tools": {tools}}}\n'
                    f'{{"question": ["x"], "answer": "1", "tools": {tools}}}\n'
                    f'{{"question": "1+1?", "answer": "", "tools": {tools}}}\n'
                    f'{{"question": "1+1?", "answer": 2, "tools": {tools}}}\n')
    with pytest.raises(DataRowError) as e:
        ToolPrompts(str(path))()
    message = str(e.value)
    assert f"{path.name}:1: prompt is an int, neither text nor a list of chat messages" in message
    assert f"{path.name}:2: prompt is a list, neither text nor a list of chat messages" in message
    assert f"{path.name}:3: empty answer (field 'answer' is '')" in message
    assert ":4:" not in message
    assert ToolPrompts(str(path), on_error="skip")()[0]["answer"] == "2"


@pytest.fixture
def saved_model(tmp_path):
    from src.modules.models.tiny import TinyQwen2

    folder = Path(TinyQwen2(cache_dir=str(tmp_path / "cache"), hidden_size=32, num_layers=1).build())
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    return copy


def test_a_weights_file_with_a_tensor_removed_is_refused_by_key_and_path(saved_model):
    from safetensors.torch import load_file, save_file

    from src.modules.models.specs import PretrainedLM

    weights = saved_model / "model.safetensors"
    tensors = load_file(weights)
    gone = next(k for k in tensors if "mlp" in k)
    del tensors[gone]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"model.student: the weights in '{saved_model}' do not cover the model "
                                         rf"\(missing keys: 1, e.g. \['{gone}'\]\)"):
        PretrainedLM(str(saved_model), key="model.student").load_model()


def test_a_truncated_weights_file_is_named_with_its_model_key(saved_model):
    from src.modules.models.specs import PretrainedLM

    weights = saved_model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(RuntimeError, match=rf"model.teacher: could not read the weights of '{saved_model}' .*"
                                           r"truncated or corrupt"):
        PretrainedLM(str(saved_model), key="model.teacher").load_model()


def test_a_model_folder_without_tokenizer_files_is_named(saved_model):
    from src.modules.models.specs import TOKENIZER_FILES, PretrainedLM

    for name in TOKENIZER_FILES + ("special_tokens_map.json",):
        (saved_model / name).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match=r"model.student: .* holds no tokenizer .*set model.student.tokenizer"):
        PretrainedLM(str(saved_model), key="model.student").load_tokenizer()


def test_hydra_wrapped_errors_end_on_their_message(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "src/train.py", "experiment=reopold_tiny", "data.batch_size=0",
                           f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"],
                          cwd=root, capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.strip().splitlines() if line and "HYDRA_FULL_ERROR" not in line]
    assert lines[-1] == "ValueError: data.batch_size must be a positive whole number, got 0"  # no full_key trailer


def test_a_checkpoint_with_nan_weights_or_another_shape_is_refused_by_name(make_cfg, tmp_path):
    import torch

    from src.modules.guards import NonFiniteError

    first = make_cfg(*QUIET, "trainer.max_steps=1", "callbacks.model_checkpoint.every_n_train_steps=1")
    train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    key = next(k for k in state["state_dict"] if k.startswith("student.") and "mlp" in k)
    state["state_dict"][key][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.ckpt")
    again = make_cfg(*QUIET, "trainer.max_steps=2", f"ckpt_path={tmp_path / 'nan.ckpt'}")
    again.paths.output_dir = str(tmp_path / "again")
    with pytest.raises(NonFiniteError, match=rf"nan.ckpt holds NaN or inf in 1 student tensor\(s\), e.g. \['{key}'\]"):
        train(again)
    other = make_cfg(*QUIET, "trainer.max_steps=2", "model.student.hidden_size=32", f"ckpt_path={last}")
    other.paths.output_dir = str(tmp_path / "other")
    with pytest.raises(ValueError, match=r"last.ckpt holds a student of another shape .*another model.student"):
        train(other)


def test_an_optimiser_step_that_overflows_stops_the_run_naming_the_learning_rate(make_cfg):
    import torch

    from src.modules.guards import NonFiniteError

    cfg = make_cfg(*QUIET, "module.optimizer.lr=1e30", "module.grad_clip=null",
                   "callbacks.model_checkpoint.every_n_train_steps=1")
    with pytest.warns(UserWarning, match="far above"), \
            pytest.raises(NonFiniteError, match=r"(the optimiser step left NaN or inf|next-token probabilities hold "
                                                r"NaN or inf \(its largest weight is [\d.e+]+\)).*Lower "
                                                r"module.optimizer.lr"):
        train(cfg)
    for ckpt in Path(cfg.paths.output_dir).rglob("*.ckpt"):  # huge but finite weights at most, never NaN
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), ckpt


def test_an_evaluation_preset_is_refused_as_training_data(make_cfg, tmp_path):
    from src.train import train

    cfg = make_cfg("experiment=reopold_tiny", "data=gsm8k", fast=False)
    with pytest.raises(ValueError, match=r"data=gsm8k is an evaluation preset \(data.purpose=evaluation\): its train "
                                         r"split is the benchmark's test file. Evaluate with src/eval.py data=gsm8k"):
        train(cfg)
    assert not Path(cfg.paths.output_dir).exists()  # refused before the run claimed a folder
    with pytest.raises(Exception, match="data.purpose must be 'training' or 'evaluation', got 'fit'"):
        train(make_cfg("data.purpose=fit"))
