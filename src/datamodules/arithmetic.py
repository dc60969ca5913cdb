"""Synthetic multi-digit arithmetic with written-out steps: a verifiable reasoning task that tiny models
can learn on a CPU.

Example (``digits=3``, addition)::

    prompt:   "347+285="
    solution: "7+5=12 c1\\n4+8+1=13 c1\\n3+2+1=6 c0\\n#### 632"

Each step adds one column right to left with its carry. Splits are disjoint by construction: a
problem's split is a function of a stable digest of its text (never Python's salted ``hash``).
"""

from __future__ import annotations

import hashlib
import random


def addition_steps(a: int, b: int, forget: frozenset[int] | set[int] = frozenset()) -> str:
    """The written steps for ``a + b``; a column in ``forget`` leaves out the carry it receives (a slip: its
    line, the columns after it and the answer follow the slipped sum)."""
    da, db = str(a)[::-1], str(b)[::-1]
    carry, lines, digits = 0, [], []
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        if i in forget:
            carry = 0
        s = x + y + carry
        terms = f"{x}+{y}" + (f"+{carry}" if carry else "")
        carry = s // 10
        lines.append(f"{terms}={s} c{carry}")
        digits.append(str(s % 10))
    total = (str(carry) if carry else "") + "".join(reversed(digits))
    return "\n".join(lines) + f"\n#### {int(total)}"


def carries_into(a: int, b: int) -> list[int]:
    """The columns (0: the units) that receive a carry when adding ``a`` and ``b``."""
    out, carry, i = [], 0, 0
    while a or b or carry:
        if carry:
            out.append(i)
        carry = (a % 10 + b % 10 + carry) // 10
        a, b, i = a // 10, b // 10, i + 1
    return out


def split_of(problem: str, val_frac: float, test_frac: float) -> str:
    u = int(hashlib.sha256(problem.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"


class ArithmeticTask:
    """Rows ``{"prompt", "answer", "solution"}`` of one split.

    Args:
        split: ``train``, ``val`` or ``test``.
        n: number of rows (sampled without replacement from the split's problems).
        digits: operand length (difficulty knob).
        seed: sampling seed.
        val_frac, test_frac: shares of the problem space held out.
        carry_free: columns (0: the units) that must receive no carry: a narrower distribution than the
            task's (a warm start that never saw a carry there).
        carry_kept: the share of the problems ``carry_free`` would drop that are kept (a warm start that saw
            such carries rarely).
        carry_forgotten_at, carry_forgotten: the share of the problems with a carry into a column of
            ``carry_forgotten_at`` whose solution forgets that carry (noisy demonstrations: a warm start that
            writes the step right only sometimes). Their ``answer`` is the true sum: such a row is wrong.
        hinted, hint: the share of problems whose prompt ends with ``hint`` (filled with the answer, after a blank
            line, as ``PromptDataModule`` appends ``data.teacher_context``) and whose solution is clean: what a writer
            who was told the answer writes (a warm start that can read privileged context, for self-distillation).
    """

    def __init__(self, split: str = "train", n: int = 1000, digits: int = 3, seed: int = 0,
                 val_frac: float = 0.1, test_frac: float = 0.1, carry_free: list[int] | tuple[int, ...] = (),
                 carry_kept: float = 0.0, carry_forgotten_at: list[int] | tuple[int, ...] = (),
                 carry_forgotten: float = 0.0, hinted: float = 0.0, hint: str = "The answer is {answer}."):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        self.split, self.n, self.digits, self.seed = split, n, digits, seed
        self.val_frac, self.test_frac = val_frac, test_frac
        self.carry_free = set(int(c) for c in (carry_free or ()))
        if not 0.0 <= carry_kept <= 1.0:
            raise ValueError(f"data.<split>.carry_kept must lie in [0, 1], got {carry_kept}")
        self.carry_kept = carry_kept
        if not 0.0 <= carry_forgotten <= 1.0:
            raise ValueError(f"data.<split>.carry_forgotten must lie in [0, 1], got {carry_forgotten}")
        if carry_forgotten and not carry_forgotten_at:
            raise ValueError("data.<split>.carry_forgotten needs carry_forgotten_at: the columns whose carry is "
                             "forgotten (0: the units)")
        self.forgotten_at, self.carry_forgotten = set(int(c) for c in (carry_forgotten_at or ())), carry_forgotten
        if not 0.0 <= hinted <= 1.0:
            raise ValueError(f"data.<split>.hinted must lie in [0, 1], got {hinted}")
        self.hinted, self.hint = hinted, hint

    def __call__(self) -> list[dict]:
        rng = random.Random(f"{self.seed}-{self.split}-{self.digits}")
        lo, hi = 10 ** (self.digits - 1), 10**self.digits - 1
        seen, rows = set(), []
        space = (hi - lo + 1) ** 2
        for _ in range(50 * self.n + 1000):
            if len(rows) >= self.n or len(seen) >= space:
                break
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            problem = f"{a}+{b}="
            if problem in seen:
                continue
            seen.add(problem)
            if split_of(problem, self.val_frac, self.test_frac) != self.split:
                continue
            if self.carry_free and self.carry_free & set(carries_into(a, b)) and not rng.random() < self.carry_kept:
                continue
            forget = self.forgotten_at & set(carries_into(a, b))
            # drawn per problem, apart from the sampling stream: any rate gives the same problems
            if forget and not random.Random(f"{self.seed}-forget-{problem}").random() < self.carry_forgotten:
                forget = set()
            prompt = problem
            if self.hinted and random.Random(f"{self.seed}-hint-{problem}").random() < self.hinted:
                prompt, forget = f"{problem}\n\n{self.hint.format(answer=a + b)}", set()  # told the answer: clean
            rows.append({"prompt": prompt, "answer": str(a + b), "solution": addition_steps(a, b, forget)})
        if len(rows) < self.n:
            raise ValueError(f"only {len(rows)} distinct {self.digits}-digit problems in split {self.split!r}; "
                             f"asked for {self.n}")
        return rows
