"""A plain probe of one regime for the miniature: *recovery with a capable student* (issue 21).

The task is D-digit addition written as column steps (``7+5=12 c1`` ... ``#### 632``). A *recovery teacher* is
trained on clean traces plus traces with one injected slip (a wrong sum or a mis-copied digit in one column line,
masked from the loss) followed by the marker ``!`` and the right line; a *clean teacher* (the negative control) sees
clean traces only. One student warm start (smaller, trained to a plateau on clean traces plus a few recovery
traces: a small prior on the marker) is then trained from the same start by each method, at an equal rollout
budget, against each teacher:

- ``sft``: cross-entropy on teacher samples (temperature ``--temperature``);
- ``opd``: vanilla on-policy distillation, per-token reward ``log pi_t - log pi_s`` on the student's samples;
- ``reopold``: the same reward floored at ``log(lam / (1 - lam))``, exploration mask ``R >= floor`` for the first
  half, student-entropy top-``beta`` mask after.

The mechanism: the student slips when it samples; after a slip only a recovery teacher rewards ``!`` and the right
line. SFT on teacher samples sees almost no slips (the teacher rarely slips), so it cannot teach correction.
Measured per run: avg@4 at the sampling temperature (the primary metric), greedy accuracy, the rate of wrong
column lines in the student's samples and the share of them it corrects.

    python benchmarks/recovery_probe.py --out runs/recovery_probe [--seeds 0 1] [--digits 5] [--lr 3e-4 1e-3]

Models and results are cached under ``--out`` (resumable); a table goes to stdout and ``results.md``. Plain PyTorch
(no Lightning, no Hugging Face): a probe of the regime, not of the framework.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

CHARS = "0123456789+=c#! \n"
PAD, EOS = len(CHARS), len(CHARS) + 1
VOCAB = len(CHARS) + 2
STOI = {ch: i for i, ch in enumerate(CHARS)}


def encode(s: str) -> list[int]:
    return [STOI[c] for c in s]


def decode(ids) -> str:
    out = []
    for i in ids:
        if i == EOS:
            break
        if i != PAD:
            out.append(CHARS[i])
    return "".join(out)


# ------------------------------------------------------------------------------------------------------------ task
def column_lines(a: int, b: int, digits: int) -> list[tuple[str, int, int, int]]:
    """(line, x, y, carry_in) per column, right to left."""
    da, db = str(a).zfill(digits)[::-1], str(b).zfill(digits)[::-1]
    carry, out = 0, []
    for i in range(digits):
        x, y = int(da[i]), int(db[i])
        s = x + y + carry
        terms = f"{x}+{y}" + (f"+{carry}" if carry else "")
        out.append((f"{terms}={s} c{s // 10}", x, y, carry))
        carry = s // 10
    return out


def slipped(x: int, y: int, carry: int, rng: random.Random) -> str:
    """A wrong column line: a wrong sum, or a mis-copied digit with a sum consistent with it."""
    if rng.random() < 0.5:
        s = x + y + carry
        bad = rng.choice([d for d in (s - 2, s - 1, s + 1, s + 2) if 0 <= d <= 19])
        return f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={bad} c{bad // 10}"
    if rng.random() < 0.5:
        x = rng.choice([d for d in range(10) if d != x])
    else:
        y = rng.choice([d for d in range(10) if d != y])
    s = x + y + carry
    return f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={s} c{s // 10}"


def trace(a: int, b: int, digits: int, rng: random.Random, recovery: float) -> tuple[list[int], list[bool]]:
    """Response tokens (with EOS) and the loss mask: a slipped line is attended but not trained."""
    lines = column_lines(a, b, digits)
    slip_at = rng.randrange(digits) if rng.random() < recovery else -1
    ids, mask = [], []
    for i, (line, x, y, c) in enumerate(lines):
        if i == slip_at:
            bad = encode(slipped(x, y, c, rng) + "\n")
            ids += bad
            mask += [False] * len(bad)
            ids += encode("!")
            mask += [True]
        t = encode(line + "\n")
        ids += t
        mask += [True] * len(t)
    t = encode(f"#### {a + b}") + [EOS]
    return ids + t, mask + [True] * len(t)


def problems(n: int, digits: int, split: str, seed: int) -> list[tuple[int, int]]:
    """``n`` problems of a split; the splits are disjoint by a hash of the problem."""
    rng, out, seen = random.Random(f"{split}-{seed}-{digits}"), [], set()
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    want = {"train": range(0, 8), "val": range(8, 9), "test": range(9, 10)}[split]
    while len(out) < n:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if (a, b) in seen or int(hashlib.sha256(f"{a}+{b}".encode()).hexdigest()[:8], 16) % 10 not in want:
            continue
        seen.add((a, b))
        out.append((a, b))
    return out


def prompt_ids(pairs) -> torch.Tensor:
    return torch.tensor([encode(f"{a}+{b}=") for a, b in pairs])


# ----------------------------------------------------------------------------------------------------------- model
@dataclass
class Shape:
    d: int
    layers: int
    heads: int
    ctx: int = 160


class Block(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(s.d), nn.LayerNorm(s.d)
        self.qkv, self.proj = nn.Linear(s.d, 3 * s.d), nn.Linear(s.d, s.d)
        self.mlp = nn.Sequential(nn.Linear(s.d, 4 * s.d), nn.GELU(), nn.Linear(4 * s.d, s.d))
        self.heads = s.heads

    def forward(self, x, cache: list | None = None):
        """``cache``: None (a whole causal sequence), or ``[]`` / ``[k, v]`` to fill or extend (decoding)."""
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        a = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1).transpose(1, 2).reshape(B, T, D)
        x = x + self.proj(a)
        return x + self.mlp(self.ln2(x))


class LM(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, s.d), nn.Embedding(s.ctx, s.d)
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.layers))
        self.ln, self.head = nn.LayerNorm(s.d), nn.Linear(s.d, VOCAB, bias=False)

    def forward(self, ids, caches: list | None = None, start: int = 0):
        x = self.tok(ids) + self.pos(torch.arange(start, start + ids.shape[1]))
        for i, b in enumerate(self.blocks):
            x = b(x, None if caches is None else caches[i])
        return self.head(self.ln(x))


@torch.no_grad()
def generate(model: LM, prompts: torch.Tensor, temperature: float, max_new: int) -> torch.Tensor:
    """Responses [B, <=max_new] (PAD after EOS); temperature 0 is greedy."""
    ids, done = prompts, torch.zeros(len(prompts), dtype=torch.bool)
    caches = [[] for _ in model.blocks]
    logits = model(prompts, caches)[:, -1].float()
    for _ in range(max_new):
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(F.softmax(logits / temperature, -1), 1)[:, 0]
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        done |= nxt == EOS
        if done.all():
            break
        logits = model(nxt[:, None], caches, ids.shape[1] - 1)[:, -1].float()
    return ids[:, prompts.shape[1]:]


def token_logp(model: LM, prompts: torch.Tensor, resp: torch.Tensor, with_entropy: bool = False):
    """Per-response-token log-prob of the taken token [B, T] (and the predictive entropy)."""
    ids = torch.cat([prompts, resp.clamp(max=VOCAB - 1)], 1)
    logits = model(ids[:, :-1])[:, prompts.shape[1] - 1:].float()
    logp = F.log_softmax(logits, -1)
    taken = logp.gather(-1, resp[..., None].clamp(max=VOCAB - 1))[..., 0]
    if not with_entropy:
        return taken
    return taken, -(logp.exp() * logp).sum(-1)


def response_mask(resp: torch.Tensor) -> torch.Tensor:
    """1 on the tokens up to and including EOS."""
    is_eos = (resp == EOS).int()
    after = torch.cumsum(is_eos, 1) - is_eos  # EOS seen strictly before
    return (after == 0) & (resp != PAD)


# --------------------------------------------------------------------------------------------------------- grading
def grade(pairs, resp: torch.Tensor, digits: int) -> dict:
    """Accuracy; wrong column lines per sample; the share of them followed by ``!`` and the right line (corrected);
    ``!`` lines that only repeat a right line (false alarms, harmless) per sample."""
    correct = wrong = fixed = alarms = 0
    for (a, b), r in zip(pairs, resp.tolist()):
        text = decode(r)
        correct += text.rstrip().endswith(f"#### {a + b}") and text.count("####") == 1
        truth = [ln for ln, *_ in column_lines(a, b, digits)]
        lines = text.split("\n")
        col, prev_ok = 0, False
        for i, ln in enumerate(lines):
            if ln.startswith("####") or col >= digits:
                break
            marked = ln.startswith("!")
            body = ln[1:] if marked else ln
            if marked and prev_ok and col > 0 and body == truth[col - 1]:
                alarms += 1
                continue
            if body == truth[col]:
                col, prev_ok = col + 1, True
                continue
            wrong, prev_ok = wrong + 1, False
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if nxt.startswith("!"):
                fixed += nxt[1:] == truth[col]
            else:
                col += 1  # an uncorrected slip: the next line is the next column
    n = len(pairs)
    return {"acc": correct / n, "wrong_lines": wrong / n, "corrected": fixed / max(wrong, 1), "alarms": alarms / n}


@torch.no_grad()
def evaluate(model: LM, pairs, digits: int, temperature: float, k: int = 4) -> dict:
    model.eval()
    P = prompt_ids(pairs)
    max_new = 16 * digits + 40
    greedy = grade(pairs, generate(model, P, 0.0, max_new), digits)
    sampled = [grade(pairs, generate(model, P, temperature, max_new), digits) for _ in range(k)]
    model.train()
    avg = {key: sum(s[key] for s in sampled) / k for key in sampled[0]}
    return {"greedy": greedy["acc"], f"avg@{k}": avg["acc"], "wrong_lines": avg["wrong_lines"],
            "corrected": avg["corrected"], "alarms": avg["alarms"]}


# -------------------------------------------------------------------------------------------------------- training
def pad_batch(seqs, value):
    T = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (T - len(s)) for s in seqs])


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1))))


def sft(model: LM, digits: int, steps: int, batch: int, lr: float, recovery: float, seed: int, wd: float,
        n_train: int, log: str) -> None:
    """Cross-entropy on reference traces (recovery traces with their slip masked)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    data = problems(n_train, digits, "train", 0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, betas=(0.9, 0.98))
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, 50)
        pairs = [data[rng.randrange(len(data))] for _ in range(batch)]
        tr = [trace(a, b, digits, rng, recovery) for a, b in pairs]
        resp, mask = pad_batch([t for t, _ in tr], PAD), pad_batch([m for _, m in tr], False)
        logp = token_logp(model, prompt_ids(pairs), resp)
        loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"  [{log}] sft step {step} loss {loss.item():.4f}", flush=True)


def distill(student: LM, teacher: LM, method: str, digits: int, steps: int, batch: int, lr: float,
            temperature: float, seed: int, lam: float = 0.1, beta: float = 0.2) -> list[dict]:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    data = problems(20000, digits, "train", 1)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    floor, switch, max_new, curve = math.log(lam / (1 - lam)), steps // 2, 16 * digits + 40, []
    teacher.eval()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, 10)
        pairs = [data[rng.randrange(len(data))] for _ in range(batch)]
        P = prompt_ids(pairs)
        if method == "sft":
            resp = generate(teacher, P, temperature, max_new)
            mask = response_mask(resp)
            logp = token_logp(student, P, resp)
            loss = -(logp * mask).sum() / mask.sum()
        else:
            student.eval()
            resp = generate(student, P, temperature, max_new)
            student.train()
            mask = response_mask(resp)
            with torch.no_grad():
                t_logp = token_logp(teacher, P, resp)
            logp, ent = token_logp(student, P, resp, with_entropy=True)
            R = (t_logp - logp.detach())
            if method == "reopold":
                if step < switch:
                    mask = mask & (R >= floor)
                else:
                    tau = torch.quantile(ent.detach()[mask], 1 - beta)
                    mask = mask & (ent.detach() >= tau)
                R = R.clamp(min=floor)
            loss = -(R * logp * mask).sum() / mask.sum().clamp(min=1)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
    return curve


# ------------------------------------------------------------------------------------------------------------ main
def cached(path: Path, build):
    if path.exists():
        return torch.load(path, weights_only=False)
    obj = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return obj


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--digits", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=["sft", "opd", "reopold"])
    p.add_argument("--arms", nargs="+", default=["regime", "control"])
    p.add_argument("--lr", type=float, nargs="+", default=[3e-4, 1e-3])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--teacher", default="192,4,4", help="d,layers,heads")
    p.add_argument("--student", default="64,2,4", help="d,layers,heads")
    p.add_argument("--teacher-steps", type=int, default=2000)
    p.add_argument("--student-steps", type=int, default=2000)
    p.add_argument("--student-train", type=int, default=20000, help="distinct warm-start problems")
    p.add_argument("--student-recovery", type=float, default=0.03)
    p.add_argument("--only-stages", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    D, out = args.digits, args.out
    test = problems(512, D, "test", 0)
    shape = lambda s: Shape(*map(int, s.split(",")))  # noqa: E731

    def build(kind: str, recovery: float, spec: str, steps: int, n_train: int, wd: float, seed: int):
        def make():
            torch.manual_seed(seed)
            m = LM(shape(spec))
            t0 = time.perf_counter()
            sft(m, D, steps, 64, 2e-3 if kind == "teacher" else 1e-3, recovery, seed, wd, n_train, kind)
            return {"state": m.state_dict(), "seconds": time.perf_counter() - t0}
        obj = cached(out / "stages" / f"{kind}-D{D}-r{recovery}-{spec}-s{steps}-n{n_train}-wd{wd}.pt", make)
        m = LM(shape(spec))
        m.load_state_dict(obj["state"])
        return m

    teachers = {"regime": build("teacher", 0.5, args.teacher, args.teacher_steps, 60000, 0.01, 0),
                "control": build("teacher", 0.0, args.teacher, args.teacher_steps, 60000, 0.01, 0)}
    warm = build("student", args.student_recovery, args.student, args.student_steps, args.student_train, 0.1, 1)
    refs = cached(out / f"refs-D{D}-{args.student}-{args.student_steps}-{args.temperature}.pt", lambda: {
        **{f"teacher_{arm}": evaluate(t, test, D, args.temperature) for arm, t in teachers.items()},
        "warm": evaluate(warm, test, D, args.temperature)})
    for k, v in refs.items():
        print(f"{k:16s} " + " ".join(f"{a} {b:.3f}" for a, b in v.items()), flush=True)
    if args.only_stages:
        return 0
    rows = []
    for arm in args.arms:
        for lr in args.lr:
            for method in args.methods:
                for seed in args.seeds:
                    path = out / "runs" / f"D{D}-{args.student}" / arm / f"{method}-lr{lr:g}" / f"seed{seed}.json"
                    if not path.exists():
                        student = LM(shape(args.student))
                        student.load_state_dict(warm.state_dict())
                        t0 = time.perf_counter()
                        distill(student, teachers[arm], method, D, args.steps, args.batch, lr, args.temperature, seed)
                        r = {"arm": arm, "method": method, "lr": lr, "seed": seed,
                             **evaluate(student, test, D, args.temperature), "seconds": time.perf_counter() - t0}
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_text(json.dumps(r))
                    r = json.loads(path.read_text())
                    rows.append(r)
                    print(f"{arm:8s} {method:8s} lr {lr:g} seed {seed}: greedy {r['greedy']:.3f} avg@4 "
                          f"{r['avg@4']:.3f} wrong/sample {r['wrong_lines']:.3f} corrected {r['corrected']:.3f} "
                          f"({r['seconds']:.0f} s)", flush=True)
    lines = ["| arm | method | lr | seed | greedy | avg@4 | wrong lines/sample | corrected |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['arm']} | {r['method']} | {r['lr']:g} | {r['seed']} | {r['greedy']:.1%} | {r['avg@4']:.1%} | "
              f"{r['wrong_lines']:.3f} | {r['corrected']:.1%} |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
