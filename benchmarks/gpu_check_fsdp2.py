"""The GPU check of the memory plan: ``math_qwen3 trainer=fsdp2`` on random-weight models with Qwen3-1.7B / Qwen3-8B
shapes (built here from ``configs/model/shapes``, nothing downloaded), 3 steps at a reduced batch with
``objective.micro_batch_tokens`` set; each phase's measured peak (``train/peak_gb_<phase>``, the step's
``torch.cuda.max_memory_allocated``) against ``src/modules/memory_plan.py``'s estimate for the same settings, less
its fixed reserve for the CUDA context and allocator slack (which no allocated figure holds).

    python benchmarks/gpu_check_fsdp2.py --out /tmp/gpu_check [--batch 2] [--samples 4] [--max-new-tokens 1024]
        [--micro-batch-tokens 8192] [--tolerance 0.15]

Writes ``gpu_check.json`` and ``gpu_check.md`` (the table) into ``--out``; exits 1 where a phase's peak is not within
``--tolerance`` of the plan's. Needs one CUDA GPU with room for a 1.7B student in fp32 with AdamW and an 8B teacher
in bf16 (about 45 GB). The random models sample until the token budget (no EOS), so every row is full length.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PHASES = {"rollout": "rollout", "teacher scoring": "teacher_scoring", "update": "update"}


def build(hub_id: str, folder: Path) -> Path:
    """A random-weight bf16 model of ``hub_id``'s shape with the project's character tokenizer, saved to ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from src.modules.memory_plan import config_of
    from src.modules.models.tokenizer import build_char_tokenizer

    if (folder / "config.json").exists():
        return folder
    tok = build_char_tokenizer()
    fields = dict(config_of(hub_id))
    cfg = AutoConfig.for_model(fields.pop("model_type"), eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, bos_token_id=None, **fields)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def train_overrides(data, student, teacher, batch: int, samples: int, max_new_tokens: int, micro: int) -> list[str]:
    """``src/train.py``'s overrides for the check: ``math_qwen3`` on one GPU at a reduced batch, 3 steps, no
    checkpoints or exports (30 GB each), CSV metrics only."""
    return [
        "experiment=math_qwen3", "trainer.devices=1", f"data.train.path={data}", f"model.student.path={student}",
        f"model.teacher.path={teacher}", "model.teacher.dtype=bfloat16", f"data.batch_size={batch}",
        f"rollout.num_samples={samples}", f"rollout.max_new_tokens={max_new_tokens}",
        f"objective.micro_batch_tokens={micro}", "trainer.max_steps=3", "test=false",
        "trainer.val_check_interval=1000", "callbacks.model_checkpoint=null", "callbacks.hf_export=null",
        "logger=csv", "trainer.enable_progress_bar=false", "callbacks.progress_bar=null",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=2, help="prompts a step")
    parser.add_argument("--samples", type=int, default=4, help="responses a prompt")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--micro-batch-tokens", type=int, default=8192)
    parser.add_argument("--tolerance", type=float, default=0.15)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    student = build("Qwen/Qwen3-1.7B", args.out / "student")
    teacher = build("Qwen/Qwen3-8B", args.out / "teacher")
    data = args.out / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
                            for a, b in zip(range(100, 164), range(300, 364), strict=True)))
    overrides = train_overrides(data, student, teacher, args.batch, args.samples, args.max_new_tokens,
                                args.micro_batch_tokens)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "src/train.py", *overrides, f"paths.log_dir={args.out / 'logs'}"],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    (args.out / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(proc.stderr[-4000:])
        return 1
    (metrics,) = (args.out / "logs").rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    measured = {name: max(float(r[f"train/peak_gb_{key}"]) for r in rows if r.get(f"train/peak_gb_{key}"))
                for name, key in PHASES.items()}

    from transformers import AutoTokenizer

    from benchmarks.memory_plan import compose
    from src.modules.memory_plan import RESERVE_GB, plan

    tok = AutoTokenizer.from_pretrained(student)
    prompt_tokens = max(len(tok.apply_chat_template([{"role": "user", "content": json.loads(line)["prompt"]}],
                                                    add_generation_prompt=True, tokenize=True))
                        for line in data.read_text().splitlines())
    import torch

    estimate = plan(compose(overrides), gpu_gb=torch.cuda.get_device_properties(0).total_memory / 1e9, gpus=1,
                    prompt_tokens=prompt_tokens)
    # the plan adds RESERVE_GB for the CUDA context and the allocator's slack, which max_memory_allocated never sees
    result = {name: {"measured_gb": measured[name], "plan_gb": estimate.peak(name) - RESERVE_GB,
                     "ratio": measured[name] / (estimate.peak(name) - RESERVE_GB)} for name in PHASES}
    ok = all(abs(r["ratio"] - 1) <= args.tolerance for r in result.values())
    lines = [f"`python benchmarks/gpu_check_fsdp2.py --out OUT --batch {args.batch} --samples {args.samples} "
             f"--max-new-tokens {args.max_new_tokens} --micro-batch-tokens {args.micro_batch_tokens}` on "
             f"{torch.cuda.get_device_name(0)}: 3 steps in {seconds:.0f} s (start-up included)", "",
             "| phase | measured peak allocated (GB) | plan less its reserve (GB) | measured / plan |",
             "|---|---|---|---|"]
    lines += [f"| {n} | {r['measured_gb']:.1f} | {r['plan_gb']:.1f} | {r['ratio']:.2f} |" for n, r in result.items()]
    lines += ["", f"within {args.tolerance:.0%}: {'yes' if ok else 'NO'}", "", "plan:", "", estimate.table()]
    (args.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    (args.out / "gpu_check.json").write_text(json.dumps({"phases": result, "seconds": seconds, "ok": ok}, indent=1))
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
