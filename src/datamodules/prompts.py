"""Prompt data: rows ``{"prompt": str | list[message], "answer": str}`` rendered with the student's chat
template, left-padded so every response starts in the same column.

A *source* is any callable returning the rows of one split (``list[dict]``): the synthetic
``ArithmeticTask`` or ``JsonlPrompts`` for files.

A row may carry a reference ``solution`` for the SFT stage: a string (the whole response), or a
multi-turn tool-use episode ``[assistant, tool, ..., assistant]`` rendered as ``ToolRollout`` renders one
(``src.tools.episodes.render_episode``); batches then carry ``target_mask``, 1 on the assistant's tokens only.
The tokenizer reaches the datamodule through ``set_tokenizer`` (it belongs to the student, which the
LightningModule loads).
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
                 row_ids: list | None = None, target_masks: list[list[bool]] | None = None):
        self.ids, self.answers, self.targets, self.target_masks = ids, answers, targets, target_masks
        self.row_ids = row_ids if row_ids is not None else list(range(len(ids)))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        target = self.targets[i] if self.targets is not None else None
        target_mask = self.target_masks[i] if self.target_masks is not None else None
        return self.ids[i], self.answers[i], target, self.row_ids[i], target_mask


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
    """

    def __init__(self, train: Callable[[], list[dict]], val=None, test=None, batch_size: int = 64,
                 eval_batch_size: int | None = None, instruction: str | None = None,
                 system_prompt: str | None = None, max_prompt_tokens: int | None = None,
                 num_workers: int = 0, seed: int = 0, task: str = "math", tools=None, purpose: str = "training"):
        super().__init__()
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

    def longest_prompts(self) -> dict[str, tuple[int, object]]:
        """Per tokenised split, its longest prompt's (token count, row id)."""
        out = {}
        for split, data in self.splits.items():
            if data.ids:
                i = max(range(len(data.ids)), key=lambda j: len(data.ids[j]))
                out[split] = (len(data.ids[i]), data.row_ids[i])
        return out

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

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            raise RuntimeError("PromptDataModule.set_tokenizer(tokenizer) must be called before setup()")
        for split, source in self.sources.items():
            if source is None or split in self.splits:
                continue
            rows = source()
            ids = []
            for r in rows:  # a row's own tools (tool-use data) win over the datamodule's
                tools = r.get("tools") or self.tools
                extra = {"tools": tools} if tools else {}
                ids.append(self.tokenizer.apply_chat_template(self.messages(r), add_generation_prompt=True,
                                                              tokenize=True, **extra))
            ids = [x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x for x in ids]
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
            self.splits[split] = _Tokenized(ids, [r["answer"] for r in rows], targets, row_ids, target_masks)

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
        ids, answers, targets, row_ids, target_masks = zip(*items)
        P = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(ids), P), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), P), dtype=torch.long)
        for i, x in enumerate(ids):  # left padding: responses start at column P for every row
            input_ids[i, P - len(x):] = torch.tensor(x)
            attention_mask[i, P - len(x):] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "references": list(answers),
                 "ids": list(row_ids)}
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
