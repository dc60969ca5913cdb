"""Self-distillation (``model.teacher=self``, ``src/modules/self_distillation.py``): the student's own weights score
its samples after a prompt that holds privileged context (``data.teacher_context``)."""

from __future__ import annotations

import math

import pytest
import torch

from src.datamodules.arithmetic import ArithmeticTask
from src.datamodules.prompts import PromptDataModule
from src.modules.models.tokenizer import build_char_tokenizer
from src.modules.self_distillation import SelfTeacher
from src.train import train

COMMON = ("model.teacher=self", "trainer.max_steps=2", "test=false", "trainer.val_check_interval=100",
          "callbacks.rollout_viewer=null")


def _datamodule(context):
    dm = PromptDataModule(train=ArithmeticTask("train", n=8, digits=2), val=None, batch_size=4,
                          teacher_context=context)
    dm.set_tokenizer(build_char_tokenizer())
    dm.setup()
    return dm


def test_the_teachers_prompt_holds_the_context_and_the_students_does_not():
    dm = _datamodule("The answer is {answer}.")
    batch = dm.collate([dm.splits["train"][i] for i in range(4)])
    tok = dm.tokenizer
    for b, answer in enumerate(batch["references"]):
        student = tok.decode(batch["input_ids"][b][batch["attention_mask"][b].bool()])
        teacher = tok.decode(batch["teacher_input_ids"][b][batch["teacher_attention_mask"][b].bool()])
        assert f"The answer is {answer}." in teacher and "The answer is" not in student
        # the same chat, the context appended to the user's message: the teacher's prompt ends as the student's
        assert teacher.replace(f"\n\nThe answer is {answer}.", "") == student
    plain = _datamodule(None)
    assert "teacher_input_ids" not in plain.collate([plain.splits["train"][0]])


def test_a_context_template_naming_a_missing_field_names_the_key_and_the_row():
    with pytest.raises(ValueError, match=r"data\.teacher_context .*\{solutionz\}.* row"):
        _datamodule("{solutionz}")
    with pytest.raises(ValueError, match="data.teacher_context must be"):
        PromptDataModule(train=ArithmeticTask("train", n=8), teacher_context="  ")


def test_the_teacher_scores_the_same_response_tokens_after_its_own_prompt(single_thread):
    """``Rollout.teacher_view``: the teacher's prompt, then the very tokens the student sampled."""
    import tempfile

    from src.modules.models.tiny import TinyQwen2
    from src.modules.rollout.batch import Rollout
    from src.modules.scoring import Scorer

    spec = TinyQwen2(cache_dir=tempfile.mkdtemp(), hidden_size=32, num_layers=1)
    model, tok = spec.load_model().eval(), spec.load_tokenizer()
    s_prompt, t_prompt = tok("<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n")["input_ids"], \
        tok("<|im_start|>user\n1+2=\n\nThe answer is 3.<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    resp = tok("1+2=3\n#### 3<|im_end|>")["input_ids"]
    ro = Rollout(input_ids=torch.tensor([s_prompt + resp]), attention_mask=torch.ones(1, len(s_prompt + resp),
                 dtype=torch.long), response_start=len(s_prompt), response_mask_BT=torch.ones(1, len(resp), dtype=bool),
                 old_logp_BT=torch.zeros(1, len(resp)), entropy_BT=None, truncated_B=torch.tensor([False]),
                 teacher_prompt_ids=torch.tensor([t_prompt]), teacher_prompt_mask=torch.ones(1, len(t_prompt),
                                                                                             dtype=torch.long))
    view = ro.teacher_view()
    assert torch.equal(view.response_ids_BT, ro.response_ids_BT) and view.input_ids[0, : len(t_prompt)].tolist() == t_prompt
    got = Scorer(model, model, 0.9).teacher_logp(ro)
    with torch.no_grad():
        logits = model(torch.tensor([t_prompt + resp])).logits[0, len(t_prompt) - 1 : -1]
    want = torch.log_softmax(logits / 0.9, -1).gather(-1, torch.tensor(resp)[:, None])[:, 0]
    torch.testing.assert_close(got[0], want, rtol=0, atol=2e-5)
    student = Scorer(model, model, 0.9).logp(model, ro)[0][0]
    assert not torch.allclose(got[0], student, atol=1e-3)  # the context changes what the teacher expects


def test_no_context_and_the_current_weights_give_zero_reward(make_cfg, single_thread, capsys):
    metrics, obj = train(make_cfg(*COMMON))
    module = obj["module"]
    assert module.self_distillation and module.teacher is None and module.scorer.teacher is module.student
    assert "model.teacher=self: the student's current weights score" in capsys.readouterr().out
    assert metrics["train/reward_mean"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["train/rev_kl"] == pytest.approx(0.0, abs=1e-5)
    assert module.student.training  # scoring in eval mode put it back


def test_with_context_the_reward_is_not_zero_and_an_ema_teacher_follows_the_student(make_cfg, single_thread):
    cfg = make_cfg(*COMMON, "data.teacher_context='The answer is {answer}.'", "module.self_teacher.weights=ema",
                   "module.self_teacher.ema_decay=0.5")
    from src.modules.distill import DistillationModule

    start = {}
    real = DistillationModule.configure_model

    def remember(self):
        real(self)
        start.update({k: v.detach().clone() for k, v in self.student.state_dict().items()})

    DistillationModule.configure_model = remember
    try:
        metrics, obj = train(cfg)
    finally:
        DistillationModule.configure_model = real
    module = obj["module"]
    assert abs(metrics["train/reward_mean"]) > 1e-4 and math.isfinite(metrics["train/loss"])
    teacher, student = module.teacher.state_dict(), module.student.state_dict()
    moved = [k for k in teacher if not torch.equal(teacher[k], start[k])]
    assert moved and all(not p.requires_grad for p in module.teacher.parameters())
    for k in moved:  # two steps of w_t <- 0.5 w_t + 0.5 w_s: between where it started and the student
        assert not torch.equal(teacher[k], student[k])
    # checkpoints keep the average, and a resumed run continues from it
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert not [k for k in ckpt["state_dict"] if k.startswith("teacher.")] and set(ckpt["ema_teacher"]) == set(teacher)
    with torch.no_grad():
        for p in module.teacher.parameters():
            p.zero_()
    module.on_load_checkpoint(ckpt)
    assert all(torch.equal(v, teacher[k]) for k, v in module.teacher.state_dict().items())


def test_a_frozen_teacher_keeps_the_starting_weights(make_cfg, single_thread):
    _, obj = train(make_cfg(*COMMON, "data.teacher_context='The answer is {answer}.'",
                                  "module.self_teacher.weights=frozen"))
    module = obj["module"]
    assert module.teacher is not module.student
    student = module.student.state_dict()
    assert any(not torch.equal(v, student[k]) for k, v in module.teacher.state_dict().items())


def test_bad_settings_are_refused_by_key(make_cfg):
    with pytest.raises(ValueError, match="module.self_teacher.weights must be one of"):
        SelfTeacher(weights="mean")
    with pytest.raises(ValueError, match="module.self_teacher.ema_decay"):
        SelfTeacher(weights="ema", ema_decay=1.0)
    with pytest.raises(Exception, match="on-policy objective with the log-ratio reward"):
        train(make_cfg(*COMMON, "algorithm=gkd"))
    with pytest.raises(Exception, match="grad_cosine_every"):
        train(make_cfg(*COMMON, "module.grad_cosine_every=1"))
    with pytest.raises(Exception, match="model.teacher must be a model spec, null or 'self'"):
        train(make_cfg("model.teacher=myself", "trainer.max_steps=1"))


def test_a_context_for_an_ordinary_teacher_needs_an_objective_that_reads_it(make_cfg):
    with pytest.raises(Exception, match="data.teacher_context gives the teacher its own input"):
        train(make_cfg("data.teacher_context='The answer is {answer}.'", "algorithm=gkd", "trainer.max_steps=1"))


def test_the_teachers_prompt_and_the_budget_must_fit_its_positions(make_cfg):
    with pytest.raises(Exception, match=r"gives the teacher a prompt of \d+ tokens .* past model.teacher's"):
        train(make_cfg(*COMMON, "data.teacher_context='" + "x" * 60 + " {answer}'",
                       "+model.student.max_position_embeddings=64", "rollout.max_new_tokens=12"))


def test_an_ema_run_resumed_from_a_checkpoint_without_the_average_starts_it_from_the_resumed_student():
    import types

    from src.modules.distill import DistillationModule

    student = torch.nn.Linear(2, 2)
    module = types.SimpleNamespace(teacher_spec=SelfTeacher(weights="ema"), teacher=torch.nn.Linear(2, 2),
                                   student=None, self_distillation=True)
    state = {f"student.{k}": v + 1 for k, v in student.state_dict().items()}
    with pytest.warns(UserWarning, match="holds no EMA teacher"):
        DistillationModule.on_load_checkpoint(module, {"state_dict": state})
    assert all(torch.equal(v, state[f"student.{k}"]) for k, v in module.teacher.state_dict().items())


def test_hinted_problems_read_as_the_teacher_context_writes_them_and_are_solved_cleanly():
    rows = ArithmeticTask("train", n=200, digits=3, carry_forgotten_at=[2], carry_forgotten=1.0, hinted=0.5)()
    hinted = [r for r in rows if "\n\nThe answer is" in r["prompt"]]
    assert 60 < len(hinted) < 140
    for r in hinted:
        assert r["prompt"].endswith(f"\n\nThe answer is {r['answer']}.")
        assert r["solution"].endswith(f"#### {r['answer']}")  # clean: the carry is never forgotten
    dm = PromptDataModule(train=ArithmeticTask("train", n=8, digits=3), val=None, batch_size=4,
                          teacher_context="The answer is {answer}.")
    plain = ArithmeticTask("train", n=8, digits=3)()[0]
    assert dm.teacher_messages(plain)[-1]["content"] == f"{plain['prompt']}\n\nThe answer is {plain['answer']}."
