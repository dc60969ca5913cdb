"""FSDP2 (``trainer=fsdp2_cpu``: two CPU processes, gloo): the sharded step is the one-process step, and a run
through the command line checkpoints, resumes and exports as an unsharded one does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ranks import leave

ROOT = Path(__file__).resolve().parents[1]
B, P, T, VOCAB = 12, 4, 6, 48
SPLIT = 7  # rank 0 holds rows 0-6, rank 1 rows 7-11: uneven, so rank 1 fills in micro-batches


def _models(tie: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def build(seed, hidden, layers):
        torch.manual_seed(seed)
        cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                          max_position_embeddings=64)
        return Qwen2ForCausalLM(cfg).float()

    student, teacher = build(0, 32, 2), build(1, 48, 3)
    teacher.requires_grad_(False).eval()
    return student, teacher


def _rollout():
    from src.modules.rollout.batch import Rollout

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (B, P + T), generator=g)
    mask = torch.ones(B, P + T, dtype=torch.long)
    mask[:3, :2] = 0  # left padding
    lengths = torch.tensor([6, 2, 5, 6, 1, 4, 6, 3, 2, 6, 5, 1])  # uneven response lengths
    response = torch.arange(T)[None, :] < lengths[:, None]
    mask[:, P:] = response.long()
    return Rollout(input_ids=ids, attention_mask=mask, response_start=P, response_mask_BT=response,
                   old_logp_BT=-torch.rand(B, T, generator=g) * 4, entropy_BT=torch.rand(B, T, generator=g) * 3,
                   truncated_B=lengths == T)


def _step(student, teacher, ro, shard=None, micro_batch_tokens=None):
    """One REOPOLD update (reward, clip, entropy selection, PPO-clipped loss, clip to norm 1, AdamW) on ``ro``, in
    micro-batches of ``micro_batch_tokens``; ``shard(scored, trainable)`` shards the models first. Returns loss,
    grad norm, the student's weights after the step (full) and the teacher's log-probs."""
    from src.modules.method.clipping import MixtureClip
    from src.modules.method.objectives import PolicyGradient, accumulate
    from src.modules.method.rewards import LogRatioReward
    from src.modules.method.selection import EntropyTopQuantile
    from src.modules.scoring import Scorer
    from src.modules.sharding import full

    scorer = Scorer(student, teacher, temperature=0.7, chunk_size=5, micro_batch_tokens=micro_batch_tokens)
    if shard is not None:
        shard(scorer.scored(student), True)
        shard(scorer.scored(teacher), False)
    objective = PolicyGradient(LogRatioReward(), MixtureClip(0.1), eps_low=0.2, eps_high=0.28,
                               micro_batch_tokens=micro_batch_tokens)
    # lr 1e-3: a first Adam step moves every weight by ~lr, so a wrong gradient shows at 1e-6; a larger lr would
    # also magnify the rounding of gradients near Adam's eps
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, foreach=True)
    objective.prepare(ro, scorer, EntropyTopQuantile(0.5))
    loss, _ = accumulate(objective, ro, scorer, torch.Tensor.backward)
    norm = full(torch.nn.utils.clip_grad_norm_(list(student.parameters()), 1.0))
    opt.step()
    weights = {k: full(v).detach().clone() for k, v in student.state_dict().items()}
    return float(loss), float(norm), weights, ro.teacher_logp_BT


def _sharded_step(rank: int, world: int, store: str, out: str, tie: bool, placement: str, micro: int | None,
                  hybrid: bool = False):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from src.modules.sharding import ShardingPlan

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    # hybrid: the mesh trainer.strategy.plan.hybrid builds on 2 nodes of 1 GPU (replicate across, shard within)
    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard")) if hybrid else \
        init_device_mesh("cpu", (world,))
    plan = ShardingPlan(param_dtype=None, reduce_dtype=None, activation_checkpointing=True, teacher_placement=placement)

    def shard(scored, trainable):
        if trainable or placement == "sharded":
            plan.shard(scored, mesh, trainable)

    student, teacher = _models(tie)
    mine = torch.arange(B)[:SPLIT] if rank == 0 else torch.arange(B)[SPLIT:]
    loss, norm, weights, teacher_logp = _step(student, teacher, _rollout().select_rows(mine), shard, micro)
    losses = [None] * world
    dist.all_gather_object(losses, loss)
    torch.save({"loss": sum(losses) / world, "norm": norm, "weights": weights, "teacher_logp": teacher_logp,
                "rows": mine}, f"{out}.{rank}")
    leave()


@pytest.mark.parametrize("tie,placement,micro", [(True, "sharded", None), (False, "sharded", None),
                                                 (True, "replicated", None), (True, "sharded", 3 * (P + T)),
                                                 (False, "sharded", P + T), (True, "hybrid", None)])
def test_a_sharded_step_is_the_one_process_step(tmp_path, tie, placement, micro):
    """Two ranks, with 7 and 5 of the rows and FSDP2 shards of both models, scoring and updating in micro-batches
    of ``micro`` tokens (3 rows: 3 and 2 micro-batches, so rank 1 adds a filler; 1 row: 7 each): the loss over the
    ranks, the gradient norm and every updated weight (head and embeddings, tied or not) are those of one process
    with every row in one batch; a sharded teacher scores as the whole one does. ``hybrid``: HSDP's 2-D mesh
    (replicated across two "nodes" of one GPU)."""
    import torch.multiprocessing as mp

    hybrid = placement == "hybrid"
    placement = "sharded" if hybrid else placement
    mp.spawn(_sharded_step, args=(2, str(tmp_path / "store"), str(tmp_path / "out"), tie, placement, micro, hybrid),
             nprocs=2)
    student, teacher = _models(tie)
    loss, norm, weights, teacher_logp = _step(student, teacher, _rollout())
    for rank in range(2):
        got = torch.load(tmp_path / f"out.{rank}")
        assert abs(got["loss"] - loss) < 1e-6, (rank, got["loss"], loss)
        assert abs(got["norm"] - norm) < 1e-6, (rank, got["norm"], norm)
        assert got["weights"].keys() == weights.keys()
        for k, w in weights.items():
            torch.testing.assert_close(got["weights"][k], w, atol=1e-6, rtol=0, msg=lambda m: f"{k}: {m}")
        torch.testing.assert_close(got["teacher_logp"], teacher_logp[got["rows"]], atol=1e-6, rtol=0)


def _train(tmp_path, cache_dir, *overrides):
    cmd = [sys.executable, "src/train.py", "experiment=reopold_tiny", "trainer=fsdp2_cpu", "trainer.val_check_interval=3",
           "data.batch_size=4", "data.train.n=64", "data.val.n=8", "data.test.n=8", "rollout.max_new_tokens=8",
           "callbacks.progress_bar=null", "trainer.enable_progress_bar=false", f"paths.log_dir={tmp_path}",
           f"paths.cache_dir={cache_dir}", "callbacks.phase_schedule.switch_step=1", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _export(run: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "hf" / "final").state_dict()


def test_fsdp2_cli_checkpoints_resumes_and_exports_the_student(tmp_path, cache_dir):
    """Through the command line under ``trainer=fsdp2_cpu``: a distributed checkpoint without the teacher; a Hugging
    Face export that loads with ``from_pretrained`` and holds exactly the checkpoint's student weights; and a run
    stopped after 2 steps and resumed from its sharded checkpoint ends where the 4-step run ends."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    common = ["callbacks.model_checkpoint.every_n_train_steps=2", "test=false", "trainer.val_check_interval=100"]
    _train(tmp_path / "whole", cache_dir, "trainer.max_steps=4", *common)
    (run,) = (tmp_path / "whole" / "reopold_tiny" / "runs").iterdir()
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and (ckpt / ".metadata").exists(), "a sharded (distributed) checkpoint expected"
    dcp_to_torch_save(ckpt, tmp_path / "whole.pt")
    state = torch.load(tmp_path / "whole.pt", weights_only=False)["state_dict"]
    assert state and not [k for k in state if k.startswith("teacher.")]
    exported = _export(run)
    for k, v in exported.items():
        torch.testing.assert_close(v, state[f"student.{k}"], atol=0, rtol=0, msg=lambda m: f"{k}: {m}")

    _train(tmp_path / "first", cache_dir, "trainer.max_steps=2", *common)
    (first,) = (tmp_path / "first" / "reopold_tiny" / "runs").iterdir()
    _train(tmp_path / "resumed", cache_dir, "trainer.max_steps=4", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}",
           *common)
    (resumed,) = (tmp_path / "resumed" / "reopold_tiny" / "runs").iterdir()
    for k, v in _export(resumed).items():
        torch.testing.assert_close(v, exported[k], atol=1e-6, rtol=1e-5, msg=lambda m: f"{k} after resume: {m}")


def test_gkd_is_refused_under_fsdp2():
    """GKD reads hidden states and heads outside a forward, where FSDP2 keeps them sharded: refused, by name,
    before any model loads."""
    from types import SimpleNamespace

    from lightning import LightningModule

    from src.modules.distill import DistillationModule
    from src.modules.method.objectives import GeneralizedJSD
    from src.modules.sharding import FSDP2Strategy

    module = DistillationModule.__new__(DistillationModule)
    LightningModule.__init__(module)
    module._trainer = SimpleNamespace(strategy=FSDP2Strategy(), state=SimpleNamespace(fn="fit"))
    module.objective, module.rollout, module.grad_clip, module.student = GeneralizedJSD(), None, 1.0, None
    module.student_spec = SimpleNamespace(load_tokenizer=lambda: pytest.fail("loaded before the check"))
    with pytest.raises(ValueError, match="trainer=fsdp2: GeneralizedJSD"):
        module.configure_model()


def test_train_refuses_gkd_under_fsdp2_before_anything_is_built(make_cfg, monkeypatch):
    import hydra.utils

    import src.train

    built = []
    instantiate = hydra.utils.instantiate
    monkeypatch.setattr(hydra.utils, "instantiate", lambda node, *a, **k: built.append(node.get("_target_")) or
                        instantiate(node, *a, **k))
    with pytest.raises(ValueError, match="trainer=fsdp2: GeneralizedJSD"):
        src.train.train(make_cfg("algorithm=gkd", "trainer=fsdp2_cpu"))
    assert not any("DataModule" in str(t) or "Distillation" in str(t) for t in built), built


def test_vllm_rollouts_are_refused_under_fsdp2():
    from types import SimpleNamespace

    from lightning import LightningModule

    from src.modules.distill import DistillationModule
    from src.modules.method.objectives import PolicyGradient
    from src.modules.rollout.vllm import VLLMRollout
    from src.modules.sharding import FSDP2Strategy

    module = DistillationModule.__new__(DistillationModule)
    LightningModule.__init__(module)
    module._trainer = SimpleNamespace(strategy=FSDP2Strategy(), state=SimpleNamespace(fn="fit"))
    module.objective, module.rollout = PolicyGradient(reward=None), VLLMRollout.__new__(VLLMRollout)
    module.grad_clip, module.student = 1.0, None
    module.student_spec = SimpleNamespace(load_tokenizer=lambda: pytest.fail("loaded before the check"))
    with pytest.raises(ValueError, match="trainer=fsdp2: VLLMRollout"):
        module.configure_model()


def test_the_sharding_plan_names_its_bad_values():
    from src.modules.sharding import ShardingPlan

    with pytest.raises(ValueError, match="trainer.strategy.plan.param_dtype"):
        ShardingPlan(param_dtype="bf16")
    with pytest.raises(ValueError, match="trainer.strategy.plan.teacher_placement"):
        ShardingPlan(teacher_placement="offload")


def test_the_visual_miniature_trains_under_fsdp2(tmp_path, cache_dir):
    """Vision blocks are FSDP units too: the visual run (images through generate inside the root's forward method,
    the teacher scoring on the same pixels) trains 2 steps in micro-batches of one row and exports the student."""
    from transformers import AutoModelForImageTextToText

    cmd = [sys.executable, "src/train.py", "experiment=visual_reasoning", "miniature=visual", "model=tiny_vl",
           "trainer=fsdp2_cpu", "data.batch_size=4", "data.train.n=32", "data.val.n=4", "data.test.n=4",
           "rollout.max_new_tokens=8", "rollout.num_samples=2", "trainer.max_steps=2", "trainer.val_check_interval=2",
           "callbacks.phase_schedule.switch_step=1", "objective.micro_batch_tokens=64", "test=false",
           "callbacks.progress_bar=null", "trainer.enable_progress_bar=false", f"paths.log_dir={tmp_path}",
           f"paths.cache_dir={cache_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run,) = (tmp_path / "visual_reasoning_mini" / "runs").iterdir()
    model = AutoModelForImageTextToText.from_pretrained(run / "checkpoints" / "hf" / "final")
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"


def _loaded_from_rank0(rank: int, world: int, store: str, out: str, path: str):
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from src.modules.models.specs import PretrainedLM
    from src.modules.scoring import ScoredModel
    from src.modules.sharding import ShardingPlan, fill_from_rank0

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    spec = PretrainedLM(path)
    model = spec.load_model() if rank == 0 else spec.load_empty()
    meta = next(model.parameters()).is_meta
    full = model.state_dict() if rank == 0 else None
    ShardingPlan(param_dtype=None, reduce_dtype=None).shard(ScoredModel(model), init_device_mesh("cpu", (world,)),
                                                              trainable=True)
    fill_from_rank0(model, full, torch.device("cpu"))
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    torch.save({"meta": meta, "state": state, "buffers": buffers, "eos": model.generation_config.eos_token_id},
               f"{out}.{rank}")
    leave()


def test_a_model_built_on_the_meta_device_receives_rank_0s_weights(tmp_path):
    """Rank 1 never reads the checkpoint: it builds the model on the meta device and, once sharded, holds exactly
    the weights, buffers and generation config that ``from_pretrained`` gives."""
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    student, _ = _models(tie=True)
    student.generation_config.eos_token_id = 7
    student.save_pretrained(tmp_path / "model")
    mp.spawn(_loaded_from_rank0, args=(2, str(tmp_path / "store"), str(tmp_path / "out"), str(tmp_path / "model")),
             nprocs=2)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    got = torch.load(tmp_path / "out.1", weights_only=False)
    assert got["meta"] and got["eos"] == 7
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(got["state"][k], v, atol=0, rtol=0, msg=lambda m: f"{k}: {m}")
    for k, v in reference.named_buffers():
        torch.testing.assert_close(got["buffers"][k], v, atol=0, rtol=0, msg=lambda m: f"{k}: {m}")
