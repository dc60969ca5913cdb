"""Cross-vocabulary distillation (``src/modules/cross_vocab.py``): character tilings, span alignment, the teacher's
scoring of the response text under its own template and tokenizer, and the span rewards, on tiny models."""

from __future__ import annotations

import math
import string

import pytest
import torch

from src.modules.cross_vocab import align, span_rewards, teacher_response_logps, token_char_spans
from src.modules.method.rewards import log_ratio_reward
from src.modules.models.tiny import TinyQwen2
from src.modules.models.tokenizer import build_char_tokenizer

CORPUS = [f"{a} + {b} = {a + b}\n" for a in range(0, 90, 7) for b in range(0, 60, 11)] + [
    f"Step {i}: {i} * {i + 3} = {i * (i + 3)}.\n  Answer:\t#### {i * (i + 3)}" for i in range(12)]
PROMPT = [{"role": "user", "content": "What is 12 + 34?"}]
RESPONSES = ["12 + 34 = 46", "Step 1: 12 + 34 = 46.\n  Answer:\t#### 46", "  46  \n\n\t 46", "1 +"]
HARD = {
    "whitespace runs": "a  \n\t b   \n\n  12 +  34",
    "special token as text": "46<|im_end|>\n<|im_start|>user\n<|im_end|>x",
    "multi-byte characters": "café = 12 中文 😀 + é\n👍🏽 46",
    "ends mid-token": "Step 1: 12 + 34 = 4",
    "ends mid-special-token": "#### 46<|im_e",
    "empty": "",
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# another template than the student's ChatML: the teacher must render the prompt with its own
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}ASSISTANT: {% endif %}")


def bpe_tokenizer(byte_level: bool, trim_offsets: bool = False):
    """A BPE tokenizer trained on arithmetic text: byte-level (GPT-2 / Qwen style, any character; optionally with
    offsets trimmed of whitespace) or over printable ASCII with no pre-tokenizer (merges cross spaces)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if byte_level:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        if trim_offsets:
            backend.post_processor = processors.ByteLevel(trim_offsets=True)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        backend = Tokenizer(models.BPE(unk_token="<unk>"))
        backend.decoder = decoders.Fuse()
        alphabet = sorted(set(string.printable) - set("\r\x0b\x0c"))
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + 80, initial_alphabet=alphabet, show_progress=False,
                                  special_tokens=SPECIALS + ([] if byte_level else ["<unk>"]))
    backend.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token=None if byte_level else "<unk>")
    tok.chat_template = PLAIN_TEMPLATE
    return tok


def sharpened(model, seed: int):
    """Larger random weights: logits far from uniform, so log-probs differ from token to token."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4) if p.dim() == 2 else p.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def char_pair(tmp_path_factory):
    """The tiny character-level Qwen2 (ChatML) and its tokenizer."""
    spec = TinyQwen2(cache_dir=str(tmp_path_factory.mktemp("cache")), hidden_size=32, num_layers=1)
    return sharpened(spec.load_model(), 1), spec.load_tokenizer()


@pytest.fixture(scope="module")
def bpe_pair():
    """A tiny random Qwen2 over a byte-level BPE vocabulary, with another chat template than ChatML."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = bpe_tokenizer(byte_level=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, tie_word_embeddings=True))
    return sharpened(model, 2), tok


TOKENIZERS = {
    "char": build_char_tokenizer,
    "bpe": lambda: bpe_tokenizer(byte_level=False),
    "byte-bpe": lambda: bpe_tokenizer(byte_level=True),
    "byte-bpe-trimmed": lambda: bpe_tokenizer(byte_level=True, trim_offsets=True),
}


@pytest.fixture(scope="module")
def tokenizers():
    return {name: make() for name, make in TOKENIZERS.items()}


def assert_tiles(ranges, text):
    pos = 0
    for start, end in ranges:
        assert start == pos and end >= start
        pos = end
    assert pos == len(text)


def assert_spans_cover(spans, s_ranges, t_ranges):
    """Consecutive spans, every token in exactly one, each span's two groups over the same non-empty characters."""
    s_next = t_next = 0
    for s, t in spans:
        assert s.start == s_next and t.start == t_next and len(s) and len(t)
        s_next, t_next = s.stop, t.stop
        s_chars = (s_ranges[s[0]][0], s_ranges[s[-1]][1])
        assert s_chars == (t_ranges[t[0]][0], t_ranges[t[-1]][1]) and s_chars[1] > s_chars[0]
    assert (s_next, t_next) == (len(s_ranges), len(t_ranges))


def prompt_ids(tok, template: str) -> list[int]:
    """The prompt as each template spells it, written out here rather than rendered by the code under test."""
    text = {"chatml": "<|im_start|>user\nWhat is 12 + 34?<|im_end|>\n<|im_start|>assistant\n",
            "plain": "USER: What is 12 + 34?\nASSISTANT: "}[template]
    return tok(text, add_special_tokens=False)["input_ids"]


def reference_logp(model, prompt: list[int], ids: list[int], temperature: float) -> torch.Tensor:
    """log pi(ids | prompt) token by token, from the model's full logits (not the chunked scorer)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, torch.tensor(ids)[:, None])[:, 0]


# --- token_char_spans and align, on the hard texts ---

@pytest.mark.parametrize("case", sorted(HARD))
@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_char_spans_tile_the_text_and_each_token_completes_its_characters(tokenizers, name, case):
    tok, text = tokenizers[name], HARD[case]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ranges = token_char_spans(tok, text)
    assert len(ranges) == len(ids)
    assert_tiles(ranges, text)
    if tok.decode(ids) == text:  # the char and char-BPE tokenizers have no é: their <unk> spells no character
        for i, (_, end) in enumerate(ranges):  # the first i + 1 tokens spell the characters up to the token's end
            assert tok.decode(ids[: i + 1]).startswith(text[:end]), (i, ranges[i])
    else:
        assert name in ("char", "bpe") and case == "multi-byte characters"


def test_byte_level_pieces_of_one_character_share_it_with_the_last(tokenizers):
    text = "é中😀"
    for name in ("byte-bpe", "byte-bpe-trimmed"):
        ranges = token_char_spans(tokenizers[name], text)
        assert len(ranges) == 9  # 2 + 3 + 4 bytes, none merged by the arithmetic corpus
        assert ranges == [(0, 0), (0, 1), (1, 1), (1, 1), (1, 2), (2, 2), (2, 2), (2, 2), (2, 3)]


@pytest.mark.parametrize("case", sorted(HARD))
@pytest.mark.parametrize("pair", [("char", "bpe"), ("bpe", "char"), ("byte-bpe", "char"), ("char", "byte-bpe"),
                                  ("byte-bpe-trimmed", "bpe"), ("bpe", "byte-bpe")])
def test_spans_cover_the_whole_text_on_both_sides(tokenizers, pair, case):
    text = HARD[case]
    s_ranges, t_ranges = (token_char_spans(tokenizers[n], text) for n in pair)
    spans = align(s_ranges, t_ranges)
    if text:
        assert_spans_cover(spans, s_ranges, t_ranges)
    else:
        assert spans == []
    reward, carries = span_rewards(-torch.rand(len(s_ranges)), -torch.rand(len(t_ranges)), spans)
    assert reward.shape == carries.shape == (len(s_ranges),)


def test_align_closed_forms():
    # student "ab|c|d", teacher "a|bcd": two shared cuts (3 is not one: the teacher's token runs on to 4)
    assert align([(0, 2), (2, 3), (3, 4)], [(0, 1), (1, 4)]) == [(range(3), range(2))]
    assert align([(0, 1), (1, 2)], [(0, 1), (1, 2)]) == [(range(1), range(1)), (range(1, 2), range(1, 2))]
    # empty tokens join the span at their position; trailing ones the last span
    spans = align([(0, 0), (0, 1), (1, 1), (1, 2), (2, 2)], [(0, 1), (1, 2)])
    assert spans == [(range(2), range(1)), (range(2, 5), range(1, 2))]
    with pytest.raises(ValueError, match="tile"):
        align([(0, 1), (2, 3)], [(0, 3)])
    with pytest.raises(ValueError, match="same text"):
        align([(0, 2)], [(0, 3)])


# --- the teacher's scoring and the rewards ---

@pytest.mark.parametrize("teacher_name", ["char", "bpe"])
def test_identical_tokenisations_give_the_same_vocabulary_reward(char_pair, bpe_pair, teacher_name, single_thread):
    teacher, tok = char_pair if teacher_name == "char" else bpe_pair
    torch.manual_seed(0)
    for text in RESPONSES:
        ids, teacher_logp = teacher_response_logps(teacher, tok, PROMPT, text)
        ranges = token_char_spans(tok, text)
        spans = align(ranges, ranges)
        assert spans == [(range(i, i + 1), range(i, i + 1)) for i in range(len(ids))]
        student_logp = -3 * torch.rand(len(ids))
        for rule in ("last", "spread"):
            reward, carries = span_rewards(student_logp, teacher_logp, spans, rule=rule)
            assert reward.dtype == torch.float32 and carries.all()
            assert torch.equal(reward, log_ratio_reward(teacher_logp, student_logp))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("direction", ["char teacher, BPE student", "BPE teacher, char student",
                                       "BPE teacher, another BPE student"])
def test_span_teacher_logp_is_the_likelihood_of_the_span_text(char_pair, bpe_pair, tokenizers, direction,
                                                             temperature, single_thread):
    if direction.startswith("char"):
        (teacher, t_tok), template, s_tok = char_pair, "chatml", tokenizers["bpe"]
    else:
        (teacher, t_tok), template = bpe_pair, "plain"
        s_tok = tokenizers["char" if "char" in direction else "bpe"]
    prompt = prompt_ids(t_tok, template)
    multi = 0
    for text in RESPONSES:
        ids, logp = teacher_response_logps(teacher, t_tok, PROMPT, text, temperature=temperature)
        assert ids.tolist() == t_tok(text, add_special_tokens=False)["input_ids"] and logp.dtype == torch.float32
        s_ranges, t_ranges = token_char_spans(s_tok, text), token_char_spans(t_tok, text)
        spans = align(s_ranges, t_ranges)
        assert_spans_cover(spans, s_ranges, t_ranges)
        for s, t in spans:
            multi += len(s) != len(t)
            span_text = text[t_ranges[t[0]][0] : t_ranges[t[-1]][1]]
            assert t_tok.decode(ids[t.start : t.stop]) == span_text
            # scored apart: the prompt and the response before the span, then the span's teacher tokens
            ref = reference_logp(teacher, prompt + ids[: t.start].tolist(), ids[t.start : t.stop].tolist(),
                                 temperature)
            assert abs(logp[t.start : t.stop].sum().item() - ref.sum().item()) < 1e-5, span_text
    assert multi > 3  # not vacuous: the tokenisations disagree on several spans


def test_last_and_spread_give_the_same_span_sums(bpe_pair, tokenizers, single_thread):
    teacher, t_tok = bpe_pair  # byte-level BPE against the student's character BPE: spans of 2 and 3 tokens a side
    s_tok = tokenizers["bpe"]
    text = RESPONSES[1]
    _, teacher_logp = teacher_response_logps(teacher, t_tok, PROMPT, text)
    spans = align(token_char_spans(s_tok, text), token_char_spans(t_tok, text))
    torch.manual_seed(1)
    student_logp = -3 * torch.rand(spans[-1][0].stop)
    last, last_carries = span_rewards(student_logp, teacher_logp, spans, rule="last")
    spread, spread_carries = span_rewards(student_logp, teacher_logp, spans, rule="spread")
    assert any(len(s) > 1 for s, _ in spans)
    for s, t in spans:
        ratio = teacher_logp[t.start : t.stop].sum() - student_logp[s.start : s.stop].sum()
        torch.testing.assert_close(last[s.start : s.stop].sum(), ratio, atol=1e-6, rtol=0)
        torch.testing.assert_close(spread[s.start : s.stop].sum(), ratio, atol=1e-6, rtol=0)
        assert last_carries[s.start : s.stop].tolist() == [False] * (len(s) - 1) + [True]
        assert (last[s.start : s.stop - 1] == 0).all()
        assert torch.allclose(spread[s.start : s.stop], spread[s.start].expand(len(s)))
    assert spread_carries.all()
    # the response's total is the sequence log-ratio under either rule
    total = teacher_logp.sum() - student_logp.sum()
    torch.testing.assert_close(last.sum(), total, atol=1e-5, rtol=0)
    torch.testing.assert_close(spread.sum(), total, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="rule"):
        span_rewards(student_logp, teacher_logp, spans, rule="first")
    with pytest.raises(ValueError, match="cover"):
        span_rewards(student_logp[:-1], teacher_logp, spans)


# --- the wired path: sampled tokenisations, credits, the scorer, the preflight, a run ---

def test_sampled_char_spans_place_a_non_canonical_tokenisation(tokenizers):
    from src.modules.cross_vocab import sampled_char_spans

    tok = tokenizers["byte-bpe"]
    text = "12 + 34 = 46"
    canonical = tok(text, add_special_tokens=False)["input_ids"]
    assert sampled_char_spans(tok, canonical, text) == token_char_spans(tok, text)
    # one character per token: a tokenisation the tokenizer never writes, each token completing its character
    pieces = [i for ch in text for i in tok(ch, add_special_tokens=False)["input_ids"]]
    assert pieces != canonical and tok.decode(pieces) == text
    assert sampled_char_spans(tok, pieces, text) == [(k, k + 1) for k in range(len(text))]
    # a multi-byte character split over byte pieces: the first pieces complete nothing, the last completes it
    emoji = "a😀"
    byte_ids = [tok.convert_tokens_to_ids(t) for t in tok.convert_ids_to_tokens(tok(emoji)["input_ids"])]
    ranges = sampled_char_spans(tok, byte_ids, emoji)
    assert_tiles(ranges, emoji) and ranges[-1][1] == len(emoji)
    with pytest.raises(ValueError, match="do not decode to a prefix"):
        sampled_char_spans(tok, canonical, "something else")


@pytest.mark.parametrize("rule", ["last", "spread"])
def test_credited_teacher_logp_gives_span_rewards_and_is_exact_on_one_token_spans(rule):
    from src.modules.cross_vocab import credited_teacher_logp

    torch.manual_seed(0)
    student, teacher = -torch.rand(6) * 3, -torch.rand(5) * 3
    spans = [(range(0, 1), range(0, 1)), (range(1, 4), range(1, 2)), (range(4, 5), range(2, 4)),
             (range(5, 6), range(4, 5))]
    credit, carries = credited_teacher_logp(student, teacher, spans, rule)
    reward, carries_ref = span_rewards(student, teacher, spans, rule)
    torch.testing.assert_close(credit - student, reward, rtol=0, atol=1e-6)
    assert torch.equal(carries, carries_ref)
    for s, t in spans:  # a span's credits sum to the teacher's log-prob of its text
        torch.testing.assert_close(credit[list(s)].sum(), teacher[list(t)].sum(), rtol=0, atol=1e-6)
    assert credit[0] == teacher[0] and credit[5] == teacher[4]  # one token on each side: the teacher's, bit for bit
    if rule == "last":
        assert torch.equal(credit[1:3], student[1:3])  # before a span's last token: reward 0 exactly


def _rollout(tok, prompt: list[int], responses: list[list[int]], model, temperature: float, eos: int):
    """A rollout of ``responses`` (each ending in EOS or truncated) after ``prompt``, with the student's log-probs."""
    from src.modules.rollout.batch import Rollout

    T = max(len(r) for r in responses) + 2  # padding past the longest response, as a sampled batch has
    resp = torch.full((len(responses), T), tok.pad_token_id)
    mask = torch.zeros((len(responses), T), dtype=torch.bool)
    for b, r in enumerate(responses):
        resp[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), True
    P = len(prompt)
    ids = torch.cat([torch.tensor([prompt] * len(responses)), resp], dim=1)
    attention = torch.cat([torch.ones(len(responses), P, dtype=torch.long), mask.long()], dim=1)
    logp = torch.zeros(mask.shape)
    for b, r in enumerate(responses):
        logp[b, : len(r)] = reference_logp(model, prompt, r, temperature)
    return Rollout(input_ids=ids, attention_mask=attention, response_start=P, response_mask_BT=mask, old_logp_BT=logp,
                   entropy_BT=None, truncated_B=torch.tensor([r[-1] != eos for r in responses]),
                   teacher_prompt_ids=torch.tensor([prompt] * len(responses)),
                   teacher_prompt_mask=torch.ones(len(responses), P, dtype=torch.long))


def test_the_cross_vocabulary_scorer_with_identical_tokenizers_gives_the_same_vocabulary_reward(char_pair,
                                                                                                single_thread):
    from src.modules.cross_vocab import CrossVocabTeacher
    from src.modules.method.rewards import LogRatioReward
    from src.modules.scoring import Scorer

    model, tok = char_pair
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    responses = [tok(r, add_special_tokens=False)["input_ids"] + [eos] for r in RESPONSES[:3]]
    responses.append(tok(RESPONSES[3], add_special_tokens=False)["input_ids"])  # truncated: no EOS
    ro = _rollout(tok, prompt_ids(tok, "chatml"), responses, model, 0.7, eos)
    same = Scorer(model, model, 0.7)
    cross = Scorer(model, model, 0.7, cross_vocab=CrossVocabTeacher(tok, tok, [eos]))
    expected = LogRatioReward()(dataclass_replace(ro, teacher_logp_BT=same.teacher_logp(ro)))
    got_logp = cross.teacher_logp(ro)
    got = LogRatioReward()(dataclass_replace(ro, teacher_logp_BT=got_logp))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert torch.equal(ro.scored_mask_BT, ro.response_mask_BT)  # every span one token: every token carries


def dataclass_replace(ro, **kw):
    import dataclasses

    return dataclasses.replace(ro, **kw)


def test_the_cross_vocabulary_scorer_scores_the_text_under_the_teachers_template(char_pair, bpe_pair, single_thread):
    """A BPE student's sampled tokens, a character-level ChatML teacher: each carrying token's reward is its span's
    log-ratio, the teacher's side the likelihood of the span's text under its own prompt; the EOS is scored too."""
    from src.modules.cross_vocab import CrossVocabTeacher
    from src.modules.scoring import Scorer

    (teacher, t_tok), (student, s_tok) = char_pair, bpe_pair
    s_eos = s_tok.eos_token_id
    texts = ["Step 1: 12 + 34 = 46", "46 46", "12 + 34"]
    responses = [s_tok(t, add_special_tokens=False)["input_ids"] + [s_eos] for t in texts[:2]]
    # the third: its text one character per token, a tokenisation the student's tokenizer never writes
    responses.append([i for ch in texts[2] for i in s_tok(ch, add_special_tokens=False)["input_ids"]] + [s_eos])
    ro = _rollout(s_tok, prompt_ids(s_tok, "plain"), responses, student, 0.8, s_eos)
    t_prompt = prompt_ids(t_tok, "chatml")
    ro.teacher_prompt_ids = torch.tensor([t_prompt] * 3)
    ro.teacher_prompt_mask = torch.ones(3, len(t_prompt), dtype=torch.long)
    cv = CrossVocabTeacher(s_tok, t_tok, [s_eos])
    credited = Scorer(student, teacher, 0.8, cross_vocab=cv).teacher_logp(ro)
    # a non-canonical row carries no reward: splitting text into more pieces must not pay (the class's docstring)
    assert not ro.scored_mask_BT[2].any() and float(ro.metrics["noncanonical_frac"]) == pytest.approx(1 / 3)
    assert cv.align_row(responses[2])[2] is False
    for b, text in enumerate(texts[:2]):
        n = len(responses[b])
        t_ids, spans, canonical = cv.align_row(responses[b])
        assert canonical
        assert t_ids[:-1] == t_tok(text, add_special_tokens=False)["input_ids"] and t_ids[-1] == t_tok.eos_token_id
        t_logp = reference_logp(teacher, t_prompt, t_ids, 0.8)
        for s, t in spans:
            torch.testing.assert_close(credited[b, list(s)].sum(), t_logp[list(t)].sum(), rtol=0, atol=2e-5)
        assert ro.scored_mask_BT[b, :n].sum() == len(spans) and not ro.scored_mask_BT[b, n:].any()
        assert (credited[b, n:] == 0).all()


def test_the_preflight_names_the_cross_vocabulary_switch_and_what_differs(char_pair, bpe_pair, capsys):
    from src.modules.models.preflight import preflight, preflight_cross_vocab

    (teacher, t_tok), (student, s_tok) = char_pair, bpe_pair
    with pytest.raises(ValueError, match=r"model\.teacher\.cross_vocab=true"):
        preflight(student, s_tok, teacher, t_tok)
    preflight_cross_vocab(s_tok, t_tok)
    out = capsys.readouterr().out
    assert "model.teacher.cross_vocab" in out and "chat templates" in out and "vocabularies of" in out
    no_template = bpe_tokenizer(byte_level=True)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        preflight_cross_vocab(s_tok, no_template)


def test_a_run_with_a_bpe_student_and_a_character_teacher(make_cfg, single_thread, capsys):
    from src.train import train

    common = ("+model.student.tokenizer=bpe", "trainer.max_steps=2", "test=false", "trainer.val_check_interval=100",
              "callbacks.rollout_viewer=null")
    with pytest.raises(ValueError, match=r"model\.teacher\.cross_vocab=true"):
        train(make_cfg(*common))
    metrics, obj = train(make_cfg(*common, "+model.teacher.cross_vocab=true"))
    module = obj["module"]
    assert module.scorer.cross_vocab is not None and "[preflight] model.teacher.cross_vocab" in capsys.readouterr().out
    assert all(math.isfinite(metrics[k]) for k in ("train/loss", "train/reward_mean", "train/rev_kl"))
    assert 0 < metrics["train/kept_frac"] <= 1
