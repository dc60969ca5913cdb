"""Test-time scaling: accuracy against inference cost as a model draws more samples per prompt.

The paper's claim (PAPER.md section 6): with k samples a distilled student approaches its teacher at a
fraction of the teacher's cost (a 7B student matching a 32B teacher with about 3.3x speedup). This reads
what ``src/eval.py`` stores per evaluated model, a folder with ``meta.json`` ({"model", "n_params",
"k", ...}) and ``samples.jsonl`` (one row per response: prompt_id, sample in 0..k-1 or -1 for greedy,
answer, correct, tokens, seconds, truncated), and computes, for k = 1, 2, 4, ..., K:

    pass@k = E_prompt[ 1 - C(n-c, k) / C(n, k) ]    n samples, c correct (Chen et al. 2021, eq. 1)
    maj@k  = E_prompt E_{S subset of size k}[ correct(majority answer of S) ]
    avg@k  = E_prompt[ c / n ]                      single-sample accuracy, the same for every k
    tokens = k * mean generated tokens per sample;  flops = 2 * n_params * tokens;
    seconds = k * mean seconds per sample

FLOPs count generation only (2 N per token, no prompt prefill, no attention term). ``seconds`` is the
batch wall-clock divided evenly over its responses, so it is a throughput cost, not a latency, and two
models compare fairly only when they were evaluated on the same hardware with the same batching.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

PromptId = str | int
METRICS = ("pass@k", "maj@k", "avg@k")
_ROW_TYPES = {"prompt_id": (str, int), "sample": (int,), "answer": (str, type(None)), "correct": (bool,),
              "tokens": (int,), "seconds": (int, float), "truncated": (bool,)}


@dataclass(frozen=True)
class Sample:
    answer: str | None
    correct: bool
    tokens: int
    seconds: float
    truncated: bool


@dataclass
class Results:
    """One evaluated model: ``samples[pid][i]`` is sample i of prompt pid, ``greedy[pid]`` its greedy
    response. Every prompt has exactly ``k`` samples, and a greedy response if any prompt has one.
    Prompt ids are kept as written: 1 and "1" are different prompts."""

    name: str
    n_params: int
    k: int
    samples: dict[PromptId, list[Sample]]
    greedy: dict[PromptId, Sample]
    meta: dict = field(default_factory=dict)

    @property
    def prompt_ids(self) -> set[PromptId]:
        return set(self.samples) | set(self.greedy)

    def column(self, name: str) -> np.ndarray:
        """``name`` ("correct", "tokens", "seconds") of every sample as a [P, G] array."""
        return np.array([[getattr(s, name) for s in row] for row in self.samples.values()], dtype=float)


def _check_row(row: object, where: str) -> Sample:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key, types in _ROW_TYPES.items():
        if key not in row:
            raise ValueError(f"{where}: missing key {key!r}")
        value = row[key]
        # bool is an int in Python: a `true` where a count belongs is a writer bug, not a 1
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            kinds = "/".join(t.__name__ for t in types)
            raise ValueError(f"{where}: {key!r} should be {kinds}, got {value!r}")
    if row["sample"] < -1 or row["tokens"] < 0 or row["seconds"] < 0:
        raise ValueError(f"{where}: negative 'sample' (below -1), 'tokens' or 'seconds' in {row!r}")
    return Sample(row["answer"], row["correct"], row["tokens"], float(row["seconds"]), row["truncated"])


def load_results(path: str | Path) -> Results:
    """Read one model's ``meta.json`` and ``samples.jsonl`` from the folder ``path``.

    Raises ValueError naming the file (and the line, for a row) on malformed JSON, a missing key or a
    wrongly typed value, a duplicate (prompt_id, sample), a sample index outside 0..k-1, or a prompt
    missing some of its k samples or its greedy response (a partial file would bias every metric).
    """
    path = Path(path)
    meta_path, rows_path = path / "meta.json", path / "samples.jsonl"
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    for key, kind in (("model", str), ("n_params", int), ("k", int)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise ValueError(f"{meta_path}: {key!r} should be {kind.__name__}, got {meta.get(key)!r}")
    if meta["n_params"] <= 0 or meta["k"] < 0:
        raise ValueError(f"{meta_path}: need n_params > 0 and k >= 0, got {meta['n_params']} and {meta['k']}")
    k = meta["k"]
    sampled: dict[PromptId, dict[int, Sample]] = {}
    greedy: dict[PromptId, Sample] = {}
    with rows_path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{rows_path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            sample = _check_row(row, where)
            pid, i = row["prompt_id"], row["sample"]
            if i >= k:
                raise ValueError(f"{where}: sample {i} outside 0..{k - 1} (meta.json says k={k})")
            seen, key = (greedy, pid) if i == -1 else (sampled.setdefault(pid, {}), i)
            if key in seen:
                raise ValueError(f"{where}: duplicate row for prompt {pid!r}, sample {i}")
            seen[key] = sample
    prompts = set(sampled) | set(greedy)
    if not prompts:
        raise ValueError(f"{rows_path}: no rows")
    for pid in prompts:
        have = len(sampled.get(pid, ()))
        if k and have != k:
            raise ValueError(f"{rows_path}: prompt {pid!r} has {have} of its {k} samples")
        if greedy and pid not in greedy:
            raise ValueError(f"{rows_path}: prompt {pid!r} has no greedy row (sample -1) while others do")
    samples = {pid: [row[i] for i in range(k)] for pid, row in sampled.items()}
    return Results(meta["model"], meta["n_params"], k, samples, greedy, meta)


def pass_at_k(n: int | np.ndarray, c: int | np.ndarray, k: int) -> float | np.ndarray:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, eq. 1 and its numpy form):

        1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i)     (1 when n - c < k)

    The product never forms a binomial, so it neither overflows nor cancels for large n. ``n`` and ``c``
    broadcast (e.g. ``c_P`` per prompt); a scalar pair returns a float. Needs 1 <= k <= n, 0 <= c <= n.
    """
    n_arr, c_arr = np.broadcast_arrays(np.asarray(n, dtype=np.int64), np.asarray(c, dtype=np.int64))
    if k < 1 or (n_arr < k).any() or (c_arr < 0).any() or (c_arr > n_arr).any():
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    out = np.ones(n_arr.shape)
    for n_val in np.unique(n_arr):
        # miss[c] = prod of the top c factors (1 - k/i), i = n..n-c+1: all positive while n - c >= k
        miss = np.concatenate([[1.0], np.cumprod(1.0 - k / np.arange(n_val, 0, -1))])
        at = n_arr == n_val
        out[at] = np.where(n_val - c_arr[at] >= k, 1.0 - miss[c_arr[at]], 1.0)
    return float(out) if out.ndim == 0 else out


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int, *, max_exact: int = 20_000,
             n_subsets: int = 2_000, seed: int | Sequence[int] = 0) -> float:
    """Expected accuracy of a majority vote over k of one prompt's n samples, drawn without replacement.

    maj@k = mean over subsets S (|S| = k) of credit(S). When C(n, k) <= ``max_exact`` every subset is
    enumerated (exact); otherwise ``n_subsets`` subsets are drawn uniformly with ``np.random``'s
    generator seeded by ``seed``, so the estimate is deterministic (standard error <= 0.5/sqrt(n_subsets)).

    credit(S): answers are compared as given (the grader normalised them; equal values written apart,
    "0.5" and "1/2", split their vote). None is never a candidate: a subset whose answers are all None
    scores 0. A tie between the most frequent answers gets fractional credit, the fraction of tied answers
    that are correct, which is the expected score of a uniformly random tie-break and independent of the
    sample order. An answer's correctness is the mean ``correct`` flag of the samples giving it (one value
    when the grader is consistent; a truncated response may be flagged wrong despite a right answer).
    """
    n = len(answers)
    if len(correct) != n or not 1 <= k <= n:
        raise ValueError(f"maj@k needs len(answers) == len(correct) >= k >= 1, got {n}, {len(correct)}, {k}")
    index: dict[str, int] = {}
    label_G = np.array([-1 if a is None else index.setdefault(a, len(index)) for a in answers])
    n_answers = len(index)
    if n_answers == 0:
        return 0.0
    votes_A = np.bincount(label_G[label_G >= 0], minlength=n_answers)
    acc_A = np.bincount(label_G[label_G >= 0], weights=np.asarray(correct, float)[label_G >= 0],
                        minlength=n_answers) / votes_A
    if math.comb(n, k) <= max_exact:
        subsets_SK = np.array(list(combinations(range(n), k)))
    else:
        subsets_SK = np.argsort(np.random.default_rng(seed).random((n_subsets, n)), axis=1)[:, :k]
    label_SK = label_G[subsets_SK]
    n_sub = len(subsets_SK)
    flat = (np.arange(n_sub)[:, None] * n_answers + label_SK)[label_SK >= 0]
    counts_SA = np.bincount(flat, minlength=n_sub * n_answers).reshape(n_sub, n_answers)
    top_S = counts_SA.max(1, keepdims=True)
    tied_SA = (counts_SA == top_S) & (top_S > 0)
    credit_S = (tied_SA * acc_A).sum(1) / np.maximum(tied_SA.sum(1), 1)
    return float(credit_S.mean())


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, with n itself appended when it is not a power of two."""
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return ks + [n] if ks and ks[-1] != n else ks


def scaling_curve(results: Results, ks: Sequence[int] | None = None, *, max_exact: int = 20_000,
                  n_subsets: int = 2_000, seed: int = 0) -> list[dict]:
    """One row per k (default ``default_ks(results.k)``): {"k", "pass@k", "maj@k", "avg@k", "tokens",
    "flops", "seconds"}, accuracies averaged over prompts, costs per prompt (see the module docstring).

    maj@k's sampled subsets are seeded per (seed, k, prompt id), so a curve does not depend on row order.
    """
    if results.k < 1:
        raise ValueError(f"{results.name}: no sampled responses (k = 0), so no scaling curve")
    ks = default_ks(results.k) if ks is None else list(ks)
    if not all(1 <= k <= results.k for k in ks):
        raise ValueError(f"{results.name}: every k must lie in 1..{results.k}, got {ks}")
    correct_PG = results.column("correct")
    tokens, seconds = results.column("tokens").mean(), results.column("seconds").mean()
    rows = []
    for k in ks:
        maj_P = [maj_at_k([s.answer for s in row], [s.correct for s in row], k, max_exact=max_exact,
                          n_subsets=n_subsets, seed=[seed, k, zlib.crc32(repr(pid).encode())])
                 for pid, row in results.samples.items()]
        rows.append({"k": k, "pass@k": float(np.mean(pass_at_k(results.k, correct_PG.sum(1), k))),
                     "maj@k": float(np.mean(maj_P)), "avg@k": float(correct_PG.mean()),
                     "tokens": k * tokens, "flops": 2.0 * results.n_params * k * tokens,
                     "seconds": k * seconds})
    return rows


def reference_point(results: Results, metric: str = "greedy", **curve_kwargs) -> dict:
    """A model's accuracy and per-prompt cost at one operating point: "greedy" (its greedy responses) or
    "<pass|maj|avg>@<k>" (k samples, e.g. "maj@1"). Returns {"metric", "k", "acc", "tokens", "flops",
    "seconds"}."""
    if metric == "greedy":
        if not results.greedy:
            raise ValueError(f"{results.name}: no greedy rows (sample -1) for a greedy reference")
        rows = list(results.greedy.values())
        tokens, seconds = float(np.mean([r.tokens for r in rows])), float(np.mean([r.seconds for r in rows]))
        return {"metric": metric, "k": 1, "acc": float(np.mean([r.correct for r in rows])), "tokens": tokens,
                "flops": 2.0 * results.n_params * tokens, "seconds": seconds}
    name, _, k = metric.partition("@")
    if f"{name}@k" not in METRICS or not k.isdigit():
        raise ValueError(f"reference metric should be 'greedy' or one of pass|maj|avg@<int>, got {metric!r}")
    (row,) = scaling_curve(results, [int(k)], **curve_kwargs)
    return {"metric": metric, "k": int(k), "acc": row[f"{name}@k"], "tokens": row["tokens"],
            "flops": row["flops"], "seconds": row["seconds"]}


def match_point(student: Results, teacher: Results, metric: str = "maj@k", teacher_metric: str = "greedy",
                ks: Sequence[int] | None = None, **curve_kwargs) -> dict | None:
    """The smallest k (on ``ks``, default ``default_ks``) at which the student's ``metric`` reaches the
    teacher's accuracy at ``teacher_metric`` (see ``reference_point``), or None when no k reaches it.

    Reaching means student_acc >= teacher_acc - 1e-9 (maj@k averages floats). The returned ratios are
    teacher cost / student cost, the teacher paying for its reference (one greedy response per prompt,
    or its k samples) and the student for k samples, so a ratio above 1 means the student is cheaper:

        flops_ratio   = 2 N_t tokens_t / (2 N_s k tokens_s)
        seconds_ratio = seconds_t / (k seconds_s)        (the paper's "speedup")
    """
    if metric not in METRICS:
        raise ValueError(f"metric should be one of {METRICS}, got {metric!r}")
    if student.prompt_ids != teacher.prompt_ids:
        diff = len(student.prompt_ids ^ teacher.prompt_ids)
        raise ValueError(f"{student.name} and {teacher.name} were evaluated on different prompts "
                         f"({diff} in one but not the other): their accuracies do not compare")
    ref = reference_point(teacher, teacher_metric, **curve_kwargs)
    for row in scaling_curve(student, ks, **curve_kwargs):
        if row[metric] >= ref["acc"] - 1e-9:
            return {"student": student.name, "teacher": teacher.name, "metric": metric,
                    "teacher_metric": teacher_metric, "k": row["k"], "student_acc": row[metric],
                    "teacher_acc": ref["acc"], "student_flops": row["flops"], "teacher_flops": ref["flops"],
                    "flops_ratio": ref["flops"] / row["flops"], "student_seconds": row["seconds"],
                    "teacher_seconds": ref["seconds"],
                    "seconds_ratio": ref["seconds"] / row["seconds"] if row["seconds"] else math.inf}
    return None


_X_LABELS = {"k": "samples per prompt k", "flops": "generation FLOPs per prompt",
             "seconds": "wall-clock seconds per prompt (throughput)"}


def plot_scaling(curves: Mapping[str, list[dict]], teacher_refs: Mapping[str, dict] | None = None,
                 x: str = "flops", metrics: Sequence[str] = ("maj@k", "pass@k"),
                 path: str | Path | None = None):
    """Accuracy against ``x`` ("flops", "seconds" or "k"; log axis, base 2 for k), one line per model and
    metric. Each teacher reference (from ``reference_point``) is a dotted horizontal line at its accuracy
    and, on a cost axis, a star at its cost. Saves to ``path`` when given; returns the Figure.

    Builds a bare ``matplotlib.figure.Figure``: no pyplot, so no backend is chosen and no global figure is
    left open in a long-running process.
    """
    if x not in _X_LABELS:
        raise ValueError(f"x should be one of {sorted(_X_LABELS)}, got {x!r}")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    styles = {"maj@k": "-o", "pass@k": "--s", "avg@k": ":"}
    for name, curve in curves.items():
        color = None
        for metric in metrics:
            xs, ys = [r[x] for r in curve], [100 * r[metric] for r in curve]
            (line,) = ax.plot(xs, ys, styles.get(metric, "-"), color=color, label=f"{name} {metric}",
                              markersize=4)
            color = line.get_color()
    for name, ref in (teacher_refs or {}).items():
        line = ax.axhline(100 * ref["acc"], linestyle=":", color="black", alpha=0.7,
                          label=f"{name} {ref['metric']}")
        if x != "k":
            ax.plot([ref[x]], [100 * ref["acc"]], "*", color=line.get_color(), markersize=12)
    ax.set_xscale("log", base=2 if x == "k" else 10)
    ax.set_xlabel(_X_LABELS[x])
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Test-time scaling")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def summary_table(curves: Mapping[str, list[dict]], matches: Mapping[str, dict | None] | None = None) -> str:
    """Markdown: one row per model and k with accuracies (%) and per-prompt costs; then, when ``matches``
    is given (label, e.g. "7B vs 32B", to a ``match_point`` result), one row per pair with "not reached"
    where the match is None."""
    rule = "|---|---|---|---|---|---|---|---|"
    lines = ["| model | k | pass@k | maj@k | avg@k | tokens | TFLOPs | seconds |", rule]
    for name, curve in curves.items():
        lines += [f"| {name} | {r['k']} | {100 * r['pass@k']:.1f} | {100 * r['maj@k']:.1f} | "
                  f"{100 * r['avg@k']:.1f} | {r['tokens']:.0f} | {r['flops'] / 1e12:.3g} | "
                  f"{r['seconds']:.3g} |"
                  for r in curve]
    if matches:
        lines += ["", "| pair | student metric | teacher reference | k | student acc | teacher acc "
                  "| FLOPs ratio | wall-clock ratio |", rule]
        for label, m in matches.items():
            if m is None:
                lines.append(f"| {label} | | | not reached | | | | |")
            else:
                lines.append(f"| {label} | {m['metric']} | {m['teacher_metric']} | {m['k']} | "
                             f"{100 * m['student_acc']:.1f} | {100 * m['teacher_acc']:.1f} | "
                             f"{m['flops_ratio']:.2f}x | {m['seconds_ratio']:.2f}x |")
    return "\n".join(lines)
