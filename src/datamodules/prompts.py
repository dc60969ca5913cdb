"""Prompt data: rows ``{"prompt": str | list[message], "answer": str}`` rendered with the student's chat
template, left-padded so every response starts in the same column.

A *source* is any callable returning the rows of one split (``list[dict]``): the synthetic
``ArithmeticTask`` or ``JsonlPrompts`` for files.

A row may carry a reference ``solution`` for the SFT stage: a string (the whole response), or a
multi-turn tool-use episode ``[assistant, tool, ..., assistant]`` rendered as ``ToolRollout`` renders one
(``src.tools.episodes.render_episode``); batches then carry ``target_mask``, 1 on the assistant's tokens only.
The tokenizer reaches the datamodule through ``set_tokenizer`` (it belongs to the student, which the
LightningModule loads).

The teacher may see another prompt than the student (``teacher_prompts``): one rendered with its own tokenizer and
chat template (a cross-vocabulary teacher, ``set_teacher_tokenizer``), or one holding privileged context the
student does not see (``teacher_context``: a template filled from the row, e.g. ``"Reference answer: {answer}"``,
appended to the last user message; self-distillation). Batches then carry ``teacher_input_ids`` and
``teacher_attention_mask``, left-padded like the student's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader

from src.datamodules.rows import (
    BadRow,
    DataRowError,
    RowReader,
    check_on_error,
    checked_rows,
    prompt_value,
    reference_text,
    row_id,
)


class JsonlPrompts:
    """Rows from a JSONL file; ``prompt_field`` / ``answer_field`` name the columns. Every malformed line (bad JSON,
    missing field) is named by file and line in one ``DataRowError`` (``src.datamodules.rows``)."""

    def __init__(self, path: str, prompt_field: str = "prompt", answer_field: str = "answer", limit: int | None = None,
                 on_error: str = "raise"):
        self.reader = RowReader(path)
        self.prompt_field, self.answer_field, self.limit = prompt_field, answer_field, limit
        self.on_error = check_on_error(on_error, limit)

    def __call__(self) -> list[dict]:
        records, by_line = self.reader.records()
        return checked_rows(self.reader.name, records, by_line, self._row, self.on_error, self.limit)

    def _row(self, pos: int, record: dict) -> dict:
        missing = [k for k in (self.prompt_field, self.answer_field) if k not in record]
        if missing:
            raise BadRow(f"missing field(s) {missing}; has {sorted(record)}")
        prompt, answer = prompt_value(record[self.prompt_field]), reference_text(record[self.answer_field])
        if not prompt:
            raise BadRow(f"empty prompt (field {self.prompt_field!r})")
        if not answer:
            raise BadRow(f"empty answer (field {self.answer_field!r} is {record[self.answer_field]!r})")
        return {"prompt": prompt, "answer": answer, "id": row_id(record, pos)}  # the line, where the row has no id


class _Tokenized(torch.utils.data.Dataset):
    def __init__(self, ids: list[list[int]], answers: list[str], targets: list[list[int]] | None = None,
                 row_ids: list | None = None, target_masks: list[list[bool]] | None = None,
                 teacher_ids: list[list[int]] | None = None):
        self.ids, self.answers, self.targets, self.target_masks = ids, answers, targets, target_masks
        self.row_ids = row_ids if row_ids is not None else list(range(len(ids)))
        self.teacher_ids = teacher_ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        target = self.targets[i] if self.targets is not None else None
        target_mask = self.target_masks[i] if self.target_masks is not None else None
        teacher = self.teacher_ids[i] if self.teacher_ids is not None else None
        return self.ids[i], self.answers[i], target, self.row_ids[i], target_mask, teacher


class PromptDataModule(LightningDataModule):
    """
    Args:
        train, val, test: sources (callables returning rows); ``val``/``test`` may be None.
        batch_size: prompts per training step (each yields ``rollout.num_samples`` responses).
        eval_batch_size: prompts per validation/test batch.
        instruction: appended to each user prompt (e.g. "put the final answer within \\boxed{}").
        system_prompt: optional system message.
        max_prompt_tokens: longer prompts are an error naming the row.
        task: name used in metric keys.
        tools: function schemas (or a ``ToolEnvironment``, whose ``schemas()`` are taken) announced to the
            model through the chat template's ``tools=`` argument.
        teacher_context: privileged context for the teacher's prompt only: a ``str.format`` template over the row's
            fields (``"The answer is {answer}."``), appended to the last user message (module docstring).
    """

    def __init__(self, train: Callable[[], list[dict]], val=None, test=None, batch_size: int = 64,
                 eval_batch_size: int | None = None, instruction: str | None = None,
                 system_prompt: str | None = None, max_prompt_tokens: int | None = None,
                 num_workers: int = 0, seed: int = 0, task: str = "math", tools=None, purpose: str = "training",
                 teacher_context: str | None = None):
        super().__init__()
        if teacher_context is not None and (not isinstance(teacher_context, str) or not teacher_context.strip()):
            raise ValueError(f"data.teacher_context must be a non-empty template string or null, got "
                             f"{teacher_context!r}")
        self.teacher_context, self.teacher_tokenizer = teacher_context, None
        if purpose not in ("training", "evaluation"):
            raise ValueError(f"data.purpose must be 'training' or 'evaluation', got {purpose!r}")
        self.purpose = purpose
        self.tools = tools.schemas() if hasattr(tools, "schemas") else (list(tools) if tools else None)
        self.sources = {"train": train, "val": val, "test": test}
        for key, value in (("data.batch_size", batch_size), ("data.eval_batch_size", eval_batch_size),
                           ("data.max_prompt_tokens", max_prompt_tokens)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{key} must be a positive whole number, got {value!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.num_workers must be 0 or more, got {num_workers!r}")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.instruction, self.system_prompt = instruction, system_prompt
        self.max_prompt_tokens, self.num_workers, self.seed, self.task = max_prompt_tokens, num_workers, seed, task
        self.tokenizer = None
        self.splits: dict[str, _Tokenized] = {}

    def set_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def set_teacher_tokenizer(self, tokenizer) -> None:
        """The tokenizer (and chat template) the teacher's prompts are rendered with: a cross-vocabulary teacher's."""
        self.teacher_tokenizer = tokenizer

    @property
    def teacher_prompts(self) -> bool:
        """Whether the teacher sees a prompt of its own (its template, or privileged context)."""
        return self.teacher_tokenizer is not None or self.teacher_context is not None

    def longest_prompts(self, teacher: bool = False) -> dict[str, tuple[int, object]]:
        """Per tokenised split, its longest prompt's (token count, row id); ``teacher``: of the teacher's own."""
        out = {}
        for split, data in self.splits.items():
            ids = data.teacher_ids if teacher else data.ids
            if ids:
                i = max(range(len(ids)), key=lambda j: len(ids[j]))
                out[split] = (len(ids[i]), data.row_ids[i])
        return out

    def longest_teacher_prompts(self) -> dict[str, tuple[int, object]]:
        """``longest_prompts`` of the teacher's own prompts (none where it reads the student's)."""
        return self.longest_prompts(teacher=True)

    def messages(self, row: dict) -> list[dict]:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            content = f"{prompt}\n{self.instruction}" if self.instruction else prompt
            msgs = [{"role": "user", "content": content}]
        else:
            msgs = list(prompt)
        if self.system_prompt and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": self.system_prompt}] + msgs
        return msgs

    def teacher_messages(self, row: dict, position: int = 0) -> list[dict]:
        """The teacher's chat: the student's, with ``teacher_context`` filled from ``row`` (the split's
        ``position``-th) appended to the last user message."""
        msgs = [dict(m) for m in self.messages(row)]
        if self.teacher_context is None:
            return msgs
        try:
            context = self.teacher_context.format(**row)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"data.teacher_context {self.teacher_context!r} cannot be filled from row "
                             f"{row.get('id', position)!r} (fields {sorted(row)}): {type(e).__name__}: {e}") from e
        last = next((m for m in reversed(msgs) if m["role"] == "user"), None)
        if last is None or not isinstance(last["content"], str):
            raise ValueError(f"data.teacher_context: row {row.get('id', position)!r} has no user message with text "
                             "content to append the context to")
        last["content"] = f"{last['content']}\n\n{context}"
        return msgs

    def _render(self, tokenizer, messages: list[dict], tools) -> list[int]:
        extra = {"tools": tools} if tools else {}
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **extra)
        return ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            raise RuntimeError("PromptDataModule.set_tokenizer(tokenizer) must be called before setup()")
        for split, source in self.sources.items():
            if source is None or split in self.splits:
                continue
            rows = source()
            # a row's own tools (tool-use data) win over the datamodule's
            ids = [self._render(self.tokenizer, self.messages(r), r.get("tools") or self.tools) for r in rows]
            teacher_ids = None
            if self.teacher_prompts:
                teacher_ids = [self._render(self.teacher_tokenizer or self.tokenizer, self.teacher_messages(r, i),
                                            r.get("tools") or self.tools) for i, r in enumerate(rows)]
            if self.max_prompt_tokens:
                for i, x in enumerate(ids):
                    if len(x) > self.max_prompt_tokens:
                        raise ValueError(f"data.{split}: row {rows[i].get('id', i)!r} has a prompt of {len(x)} tokens, "
                                         f"more than data.max_prompt_tokens={self.max_prompt_tokens}")
            targets = target_masks = None
            if rows and all("solution" in r for r in rows):  # reference solutions, for the SFT stage
                targets, target_masks = map(list, zip(*(self.episode_target(r) for r in rows)))
                if all(isinstance(r["solution"], str) for r in rows):
                    target_masks = None  # every token is the model's
            row_ids = [r.get("id", i) for i, r in enumerate(rows)]  # joins eval results back to the data
            counts = Counter(map(str, row_ids))
            dup = sorted(x for x, c in counts.items() if c > 1)
            if dup:
                raise DataRowError(f"{split} split: row ids must be unique, repeated: {dup[:10]}"
                                   f"{' ...' if len(dup) > 10 else ''} (give each row its own 'id')")
            self.splits[split] = _Tokenized(ids, [r["answer"] for r in rows], targets, row_ids, target_masks,
                                            teacher_ids)

    def episode_target(self, row: dict) -> tuple[list[int], list[bool]]:
        """A solution's tokens without the closing EOS (``reference_rollout`` appends it) and the mask of those
        the model writes; a string solution is all the model's."""
        solution = row["solution"]
        if isinstance(solution, str):
            ids = self.tokenizer(solution, add_special_tokens=False)["input_ids"]
            return ids, [True] * len(ids)
        from src.tools.episodes import render_episode

        ids, mask = render_episode(self.tokenizer, list(solution), self.tokenizer.eos_token_id,
                                   row.get("tools") or self.tools)
        return ids[:-1], mask[:-1]

    def collate(self, items) -> dict:
        ids, answers, targets, row_ids, target_masks, teacher_ids = zip(*items)
        input_ids, attention_mask = left_padded(ids, self.tokenizer.pad_token_id)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "references": list(answers),
                 "ids": list(row_ids)}
        if teacher_ids[0] is not None:
            batch["teacher_input_ids"], batch["teacher_attention_mask"] = left_padded(
                teacher_ids, (self.teacher_tokenizer or self.tokenizer).pad_token_id)
        if targets[0] is not None:
            batch["target_ids"] = list(targets)
        if target_masks[0] is not None:
            batch["target_mask"] = list(target_masks)
        return batch

    def _eval_loader(self, split):
        if split not in self.splits:
            return []
        return DataLoader(self.splits[split], batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=self.collate, num_workers=self.num_workers)

    def train_dataloader(self):
        trainer = getattr(self, "trainer", None)
        start, rank, world = 0, 0, 1
        if trainer is not None:
            # Resume exactly: the stream restarts at the batch after the last optimiser step taken.
            start = trainer.global_step // getattr(trainer.lightning_module, "updates_per_rollout", 1)
            rank, world = trainer.global_rank, trainer.world_size
        stream = PromptStream(self.splits["train"], self.batch_size, self.seed, start, rank, world, self.collate)
        return DataLoader(stream, batch_size=None, num_workers=0)

    def val_dataloader(self):
        return self._eval_loader("val")

    def test_dataloader(self):
        return self._eval_loader("test")


def left_padded(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded to one width (responses start in the same column for every row) and their mask."""
    P = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), P), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), P), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, P - len(x):] = torch.tensor(x)
        attention_mask[i, P - len(x):] = 1
    return input_ids, attention_mask


class PromptStream(torch.utils.data.IterableDataset):
    """An endless, deterministic stream of prompt batches: global batch ``k`` is a fixed function of
    ``(seed, k)``, so a run resumed at batch ``k`` sees exactly what an uninterrupted run would.

    Each epoch is a fresh permutation (seeded by ``seed`` and the epoch); under DDP the global batch of
    ``batch_size * world`` prompts is split across ranks.
    """

    def __init__(self, data: _Tokenized, batch_size: int, seed: int, start: int, rank: int, world: int, collate):
        self.data, self.batch_size, self.seed, self.start = data, batch_size, seed, start
        self.rank, self.world, self.collate = rank, world, collate
        self.per_epoch = len(data) // (batch_size * world)
        if self.per_epoch == 0:
            raise ValueError(f"train split has {len(data)} prompts, fewer than one global batch "
                             f"(data.batch_size={batch_size} x {world} ranks)")

    def __iter__(self):
        k, order, order_epoch = self.start, None, -1
        gb = self.batch_size * self.world
        while True:
            epoch, j = divmod(k, self.per_epoch)
            if epoch != order_epoch:
                order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.seed + epoch))
                order_epoch = epoch
            idx = order[j * gb + self.rank * self.batch_size: j * gb + (self.rank + 1) * self.batch_size]
            yield self.collate([self.data[i] for i in idx.tolist()])
            k += 1
