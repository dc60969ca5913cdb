"""The preflight: before step 0, teacher and student must agree on what a token means.

``preflight`` compares the tokenizers by content (every token's id, the special tokens, pad and EOS) and the rendered
chat template, and checks that each model's output head covers the tokenizer; ``preflight_processors``
(``multimodal.py``) compares how a vision-language pair turns an image into tokens and patches. Each stops the run
with one message naming both values.

Output heads often carry padding rows past the tokenizer (Qwen2.5-1.5B has 151,936 rows, Qwen2.5-7B 152,064, one
tokenizer of 151,665 tokens). Where only that padding differs, ``preflight`` returns the shared tokenizer's size:
both models are then scored over those ids only, and the student never samples a padding row.
"""

from __future__ import annotations

from src.modules.models.specs import PROBE, round_trips


def padded_vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def render_template(tokenizer) -> str | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _first_differences(a: dict, b: dict, n: int = 3) -> list[str]:
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return [f"{k!r}: {a.get(k, '(absent)')} vs {b.get(k, '(absent)')}" for k in keys[:n]]


def preflight(student, student_tok, teacher, teacher_tok, student_key="model.student",
              teacher_key="model.teacher") -> int | None:
    """Stop before step 0 unless teacher and student agree on what a token means.

    Compares the tokenizers by content (vocabulary with ids, special tokens, pad and EOS ids), the rendered chat
    template, and each model's output rows against the tokenizer. Returns None where both heads have the same rows,
    else the shared tokenizer's size: score over its ids only (the rows past it are padding).
    """
    for key, tok in ((student_key, student_tok), (teacher_key, teacher_tok)):
        if not round_trips(tok):
            raise ValueError(f"preflight: {key}'s tokenizer ({type(tok).__name__}) does not round-trip "
                             f"{PROBE!r}: it would drop or alter characters of every prompt and response")
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab != t_vocab:
        raise ValueError(f"preflight: student and teacher tokenizers differ in content ({len(s_vocab)} vs "
                         f"{len(t_vocab)} tokens; first differences, token: {student_key} id vs {teacher_key} id: "
                         f"{'; '.join(_first_differences(s_vocab, t_vocab))}). Distilling across tokenizers scores the "
                         f"response text instead: set {teacher_key}.cross_vocab=true (src/modules/cross_vocab.py).")
    checks = [
        ("special tokens", sorted(student_tok.all_special_tokens), sorted(teacher_tok.all_special_tokens)),
        ("pad token id", student_tok.pad_token_id, teacher_tok.pad_token_id),
        ("eos token id", student_tok.eos_token_id, teacher_tok.eos_token_id),
        ("rendered chat template", render_template(student_tok), render_template(teacher_tok)),
    ]
    for what, s, t in checks:
        if s != t:
            raise ValueError(f"preflight: student and teacher disagree on {what}: {student_key} has {s!r}, "
                             f"{teacher_key} has {t!r}. Use models of one family and tokenizer, or set "
                             f"{teacher_key}.cross_vocab=true to score the response text with the teacher's own.")
    n_tok = len(student_tok)
    rows = {student_key: padded_vocab_size(student), teacher_key: padded_vocab_size(teacher)}
    for key, n in rows.items():
        if n < n_tok:
            raise ValueError(f"preflight: {key}'s output head has {n} rows, fewer than its tokenizer's {n_tok} tokens: "
                             f"the model cannot score every token (a tokenizer of another model?)")
    if rows[student_key] == rows[teacher_key]:
        print(f"[preflight] {student_key} and {teacher_key} share one tokenizer ({n_tok} tokens, {rows[student_key]} "
              f"output rows) and chat template")
        return None
    print(f"[preflight] one tokenizer ({n_tok} tokens); output heads padded to {rows[student_key]} ({student_key}) "
          f"and {rows[teacher_key]} ({teacher_key}) rows: both are scored over the tokenizer's {n_tok} ids")
    return n_tok


def preflight_cross_vocab(student_tok, teacher_tok, student_key="model.student",
                          teacher_key="model.teacher") -> None:
    """``model.teacher.cross_vocab``: the pair may differ in tokenizer and chat template (the teacher scores the
    response text with its own, ``src/modules/cross_vocab.py``). Prints what differs; stops where the path cannot
    work: a tokenizer that does not round-trip text, or one without character offsets (not a fast tokenizer), or a
    teacher with no chat template, EOS or pad token."""
    for key, tok in ((student_key, student_tok), (teacher_key, teacher_tok)):
        if not round_trips(tok):
            raise ValueError(f"preflight: {key}'s tokenizer ({type(tok).__name__}) does not round-trip "
                             f"{PROBE!r}: the text the teacher scores would not be the text the student wrote")
        if not getattr(tok, "is_fast", False):
            raise ValueError(f"preflight: {teacher_key}.cross_vocab needs fast (Rust) tokenizers for character "
                             f"offsets; {key}'s is {type(tok).__name__}")
    if render_template(teacher_tok) is None:
        raise ValueError(f"preflight: {teacher_key} has no chat template to render its prompts with")
    for what in ("eos_token_id", "pad_token_id"):
        if getattr(teacher_tok, what) is None:
            raise ValueError(f"preflight: {teacher_key}'s tokenizer has no {what.removesuffix('_id')} token")
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    differs = []
    if s_vocab != t_vocab:
        differs.append(f"vocabularies of {len(s_vocab)} and {len(t_vocab)} tokens, {len(s_vocab.keys() & t_vocab.keys())} "
                       "strings in common")
    if render_template(student_tok) != render_template(teacher_tok):
        differs.append("chat templates")
    if student_tok.eos_token != teacher_tok.eos_token:
        differs.append(f"EOS {student_tok.eos_token!r} and {teacher_tok.eos_token!r}")
    print(f"[preflight] {teacher_key}.cross_vocab: the teacher scores the student's response text with its own "
          f"tokenizer and chat template, span by span ({'; '.join(differs) or 'the pair shares one tokenizer here'})")


def preflight_dtypes(student_spec, teacher_spec) -> None:
    """Say where the teacher's weights have another dtype than the student's; refuse it in self-distillation (one
    checkpoint as both), where the rounding alone would give every token a reward (bf16 against fp32: about 0.05)."""
    s, t = getattr(student_spec, "dtype", None), getattr(teacher_spec, "dtype", None)
    if s is None or t is None or s == t:
        return
    names = f"{student_spec.key}.dtype={str(s).removeprefix('torch.')}, {teacher_spec.key}.dtype=" \
            f"{str(t).removeprefix('torch.')}"
    if getattr(student_spec, "path", None) and student_spec.path == getattr(teacher_spec, "path", None):
        raise ValueError(f"preflight: self-distillation ({student_spec.key} and {teacher_spec.key} are both "
                         f"{student_spec.path!r}) with {names}: the dtype's rounding alone would be rewarded. Give "
                         f"both one dtype")
    print(f"[preflight] {names}: the teacher scores in its own precision")
