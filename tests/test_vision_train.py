"""Vision-language distillation on tiny random Qwen2.5-VL models: the rollout carries the images, the
teacher scores the student's tokens on the same pixels, image tokens never enter the loss."""

from __future__ import annotations

import pytest
import torch

from src.modules.models.multimodal import model_inputs, vision_token_ids
from src.train import train

VL = ["experiment=visual_reasoning", "miniature=visual", "model=tiny_vl", "data.batch_size=4", "data.train.n=32", "data.val.n=4",
      "data.test.n=4", "rollout.max_new_tokens=8", "rollout.num_samples=2", "trainer.max_steps=2",
      "trainer.val_check_interval=2", "callbacks.phase_schedule.switch_step=1"]


@pytest.fixture
def vl_run(make_cfg, single_thread):
    cfg = make_cfg(*VL, "test=false", fast=False)
    metrics, obj = train(cfg)
    return cfg, metrics, obj


def test_visual_reasoning_miniature_trains_end_to_end(vl_run, make_cfg):
    cfg, metrics, obj = vl_run
    module = obj["module"]
    assert type(module.student).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert "val/visual_mini/acc" in metrics and metrics["train/loss"] == metrics["train/loss"]
    # the student moved, the teacher did not and is still frozen in eval mode
    fresh = obj["cfg"].model.student
    from hydra.utils import instantiate

    initial = instantiate(fresh).load_model().state_dict()
    changed = [k for k, v in module.student.state_dict().items() if not torch.equal(v, initial[k])]
    assert changed, "the student's weights did not change"
    teacher0 = instantiate(obj["cfg"].model.teacher).load_model().state_dict()
    for k, v in module.teacher.state_dict().items():
        assert torch.equal(v, teacher0[k]), k
    assert not module.teacher.training and not any(p.requires_grad for p in module.teacher.parameters())


def _rollout(module, datamodule):
    batch = next(iter(datamodule.train_dataloader()))
    return batch, module.sampler(module.student, batch)


def test_teacher_scores_the_students_tokens_on_the_same_images(vl_run):
    _, _, obj = vl_run
    module, dm = obj["module"], obj["datamodule"]
    batch, ro = _rollout(module, dm)
    G = ro.group_size
    assert G == 2 and ro.input_ids.shape[0] == 2 * batch["input_ids"].shape[0]
    # the rollout's pixels are the batch's, each prompt's images repeated for its G samples
    n_img = batch["model_kwargs"]["images_per_row"]
    assert torch.equal(ro.model_kwargs["images_per_row"], n_img.repeat_interleave(G))
    assert ro.model_kwargs["pixel_values"].shape[0] == G * batch["model_kwargs"]["pixel_values"].shape[0]

    logp_BT = module.scorer.teacher_logp(ro)
    # reference: the teacher's full forward on prompt + response with the same pixels, banned ids removed
    with torch.no_grad():
        logits = module.teacher(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                                **model_inputs(ro.model_kwargs, seq_len=ro.input_ids.shape[1])).logits
    logits = logits[:, ro.response_start - 1:-1].float() / module.scorer.temperature
    logits[..., module.scorer.banned_ids] = -1e30
    want = torch.log_softmax(logits, -1).gather(-1, ro.response_ids_BT[..., None]).squeeze(-1)
    torch.testing.assert_close(logp_BT, want * ro.response_mask_BT, atol=1e-4, rtol=1e-4)
    # and the images matter: other pixels, other log-probs
    ro.model_kwargs = {**ro.model_kwargs, "pixel_values": torch.randn_like(ro.model_kwargs["pixel_values"])}
    assert not torch.allclose(module.scorer.teacher_logp(ro), logp_BT, atol=1e-4)


def test_image_tokens_and_prompt_never_enter_the_loss(vl_run):
    _, _, obj = vl_run
    module, dm = obj["module"], obj["datamodule"]
    _, ro = _rollout(module, dm)
    vision_ids = torch.tensor(vision_token_ids(module.processor))
    prompt = ro.input_ids[:, :ro.response_start]
    assert torch.isin(prompt, vision_ids).any(), "the prompts carry image tokens"
    # the policy never samples a vision token, and the loss only ever sees response columns
    assert not torch.isin(ro.response_ids_BT[ro.response_mask_BT], vision_ids).any()
    module.objective.prepare(ro, module.scorer, module.selection)
    assert ro.loss_mask_BT.shape == ro.response_mask_BT.shape == (ro.input_ids.shape[0],
                                                                  ro.input_ids.shape[1] - ro.response_start)
    assert not (ro.loss_mask_BT & ~ro.response_mask_BT).any()
    # a minibatch split keeps each row with its own images
    idx = torch.tensor([1, 0])
    sub = ro.select_rows(idx)
    torch.testing.assert_close(module.scorer.teacher_logp(sub), module.scorer.teacher_logp(ro)[idx])


def test_preflight_rejects_a_teacher_with_other_image_settings():
    from src.modules.models.multimodal import preflight_processors
    from src.modules.models.tiny import build_tiny_vl_processor

    a, b = build_tiny_vl_processor(), build_tiny_vl_processor(max_pixels=224 * 224)
    preflight_processors(a, build_tiny_vl_processor())
    with pytest.raises(ValueError, match="max_pixels.*model.student has 12544.*model.teacher has 50176"):
        preflight_processors(a, b)
    with pytest.raises(ValueError, match="only model.student takes images"):
        preflight_processors(a, a.tokenizer)


def test_paper_setting_composes(make_cfg):
    cfg = make_cfg("experiment=visual_reasoning", "data.train.path=/data/train.jsonl",
                   "data.test.path=/data/test.jsonl", fast=False)
    assert cfg.model.student.path == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert cfg.model.teacher.path == "Qwen/Qwen2.5-VL-32B-Instruct"
    assert cfg.trainer.strategy._target_.endswith("FSDP2Strategy")  # ZeRO-3 is refused (check_strategy)
    assert cfg.trainer.strategy.plan.teacher_placement == "sharded" and cfg.trainer.strategy.plan.param_dtype == "bfloat16"
    assert cfg.model.student.dtype == "float32" and cfg.objective.micro_batch_tokens and cfg.rollout.kv_cache_gb


def test_reference_sft_trains_the_vision_tower_on_the_rows_images(make_cfg, single_thread):
    # the SFT stage that builds the visual teacher: its loss must see the images, so the vision tower learns
    cfg = make_cfg("experiment=visual_teacher", "data.batch_size=4", "data.train.n=16", "data.val.n=4",
                   "data.test.n=4", "trainer.max_steps=2", "trainer.val_check_interval=2", "test=false",
                   "model.student.hidden_size=32", "model.student.num_layers=1", "model.student.vision_depth=1",
                   "model.student.vision_hidden_size=16", fast=False)
    _, obj = train(cfg)
    module = obj["module"]
    from hydra.utils import instantiate

    initial = instantiate(obj["cfg"].model.student).load_model().state_dict()
    visual = {k: v for k, v in module.student.state_dict().items() if ".visual." in f".{k}"}
    assert visual and any(not torch.equal(v, initial[k]) for k, v in visual.items()), "vision tower did not train"


def test_scorer_refuses_image_placeholders_without_pixels(vl_run):
    _, _, obj = vl_run
    module, dm = obj["module"], obj["datamodule"]
    batch, ro = _rollout(module, dm)
    from src.modules.scoring import hf_backbone

    with pytest.raises(ValueError, match="no pixel_values"):
        hf_backbone(module.student, ro.input_ids, ro.attention_mask, ro.response_start)


def test_miniature_override_swaps_in_the_trained_stages(make_cfg):
    # one override turns the paper's setting into the CPU miniature, whose models are the cached SFT stages
    cfg = make_cfg("experiment=visual_reasoning", "miniature=visual", fast=False)
    assert cfg.model.teacher.experiment == "visual_teacher"
    assert cfg.model.student.experiment == "visual_student_init"
    assert cfg.trainer.accelerator == "cpu" and "strategy" not in cfg.trainer
    assert cfg.data.train._target_.endswith("VisualTask") and cfg.callbacks.report.split == "test"
    from src.modules.models.stages import compose_stage

    teacher, student = compose_stage("visual_teacher"), compose_stage("visual_student_init")
    assert teacher.objective._target_.endswith("ReferenceSFT") and teacher.model.teacher is None
    # the student is the smaller model, on the same task and the same image layout
    assert student.model.student.hidden_size < teacher.model.student.hidden_size
    assert student.data.train.cell_size == teacher.data.train.cell_size == cfg.data.train.cell_size
    # the two settings the miniature's result rests on (docs/results/visual_reasoning.md)
    assert list(student.model.student.mrope_section) == [0, 0, 8]
    assert cfg.module.optimizer._target_ == "torch.optim.SGD" and cfg.module.optimizer.lr == 5e-3
    # the warm start learns from noisy demonstrations (8 read as 3, 9 as 4); the teacher and the evaluation do not
    assert dict(student.data.train.misread) == {8: 3, 9: 4} and student.data.train.misread_share == 0.9
    assert not teacher.data.train.get("misread") and not student.data.val.get("misread")
    assert not cfg.data.train.get("misread")


def test_freeze_keeps_the_vision_tower_fixed_and_names_a_wrong_prefix(cache_dir):
    from src.modules.models.tiny import TinyQwen2VL

    spec = TinyQwen2VL(cache_dir=str(cache_dir), hidden_size=32, num_layers=1, vision_hidden_size=16,
                       freeze=["model.visual"])
    model = spec.load_model()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("model.visual.") for n in frozen)
    assert any(p.requires_grad for n, p in model.named_parameters() if n.startswith("model.language_model."))
    assert len(frozen) == sum(1 for n, _ in model.named_parameters() if n.startswith("model.visual."))
    with pytest.raises(ValueError, match="model.student.freeze: no parameter .* under 'model.vision'"):
        TinyQwen2VL(cache_dir=str(cache_dir), hidden_size=32, num_layers=1, vision_hidden_size=16,
                    freeze=["model.vision"], key="model.student").load_model()


def _column_rotation_gap(model, columns: int = 3) -> float:
    """Largest difference between the decoder's rotary (cos) rows of neighbouring image columns of a 1 x N
    image (3-D positions as Qwen2.5-VL assigns them: time fixed, height fixed, width = column)."""
    import torch

    rope = model.model.language_model.rotary_emb
    pos = torch.zeros(3, 1, columns, dtype=torch.long)
    pos[2, 0] = torch.arange(columns)
    x = torch.zeros(1, columns, model.config.text_config.hidden_size)
    cos, _ = rope(x, pos)
    return float((cos[0, 1:] - cos[0, :-1]).abs().max())


def _mrope_section(model) -> list[int]:
    text = model.config.text_config
    rope = getattr(text, "rope_parameters", None) or text.rope_scaling  # transformers 5 / 4
    return list(rope["mrope_section"])


def test_mrope_section_lets_a_tiny_decoder_tell_image_columns_apart(cache_dir):
    from src.modules.models.tiny import TinyQwen2VL

    arch = dict(cache_dir=str(cache_dir), hidden_size=64, num_layers=1, vision_hidden_size=16)
    default = TinyQwen2VL(**arch).load_model()
    # the default split hands width the slowest of a head-16's 8 frequencies: columns look alike
    assert _mrope_section(default) == [4, 2, 2]
    assert _column_rotation_gap(default) < 1e-3
    wide = TinyQwen2VL(**arch, mrope_section=[0, 0, 8]).load_model()
    assert _mrope_section(wide) == [0, 0, 8]
    assert _column_rotation_gap(wide) > 0.5  # the fastest frequency turns ~1 rad per column
    based = TinyQwen2VL(**arch, rope_theta=100.0).load_model()
    inv_freq = based.model.language_model.rotary_emb.inv_freq
    assert abs(float(inv_freq[4]) - 100.0 ** -0.5) < 1e-6  # theta ** (-2i / head), i = 4 of 8
    assert TinyQwen2VL(**arch, mrope_section=[0, 0, 8]).path != TinyQwen2VL(**arch).path
    with pytest.raises(ValueError, match=r"model.student.mrope_section .* head_size / 2 = 8, got \[4, 4, 4\]"):
        TinyQwen2VL(**arch, mrope_section=[4, 4, 4], key="model.student")
    with pytest.raises(ValueError, match="model.student.rope_theta must be positive"):
        TinyQwen2VL(**arch, rope_theta=0, key="model.student")


def test_a_prompt_with_its_images_past_the_positions_is_refused(make_cfg):
    """The position check reads the decoder's positions (``text_config``) and counts each prompt's image tokens."""
    cfg = make_cfg(*VL, "test=false", "rollout.max_new_tokens=2040", fast=False)  # the tiny decoders: 2,048
    with pytest.raises(ValueError, match=r"data.train: row .* has a prompt of \d+ tokens; with "
                                         r"rollout.max_new_tokens=2040 a sequence reaches \d+ positions, past "
                                         r"model.\w+'s max_position_embeddings \(2048\)"):
        train(cfg)
