"""The preflight: before step 0, teacher and student must agree on what a token means.

``preflight`` compares the padded output vocabulary, the tokenizer size, pad and EOS ids and the rendered chat
template; ``preflight_processors`` (``multimodal.py``) compares how a vision-language pair turns an image into
tokens and patches. Each stops the run with one message naming both values.
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


def preflight(student, student_tok, teacher, teacher_tok, student_key="model.student",
              teacher_key="model.teacher") -> None:
    """Stop before step 0 unless teacher and student agree on what a token means.

    Compares the padded output vocabulary, the tokenizer size, pad and EOS ids and the rendered chat
    template. Cross-tokenizer distillation is deliberately not supported yet.
    """
    checks = [
        ("padded vocabulary size (output embedding rows)", padded_vocab_size(student), padded_vocab_size(teacher)),
        ("tokenizer vocabulary size", len(student_tok), len(teacher_tok)),
        ("pad token id", student_tok.pad_token_id, teacher_tok.pad_token_id),
        ("eos token id", student_tok.eos_token_id, teacher_tok.eos_token_id),
        ("rendered chat template", render_template(student_tok), render_template(teacher_tok)),
    ]
    for key, tok in ((student_key, student_tok), (teacher_key, teacher_tok)):
        if not round_trips(tok):
            raise ValueError(f"preflight: {key}'s tokenizer ({type(tok).__name__}) does not round-trip "
                             f"{PROBE!r}: it would drop or alter characters of every prompt and response")
    for what, s, t in checks:
        if s != t:
            raise ValueError(f"preflight: student and teacher disagree on {what}: {student_key} has {s!r}, "
                             f"{teacher_key} has {t!r}. Use models of one family and tokenizer.")
