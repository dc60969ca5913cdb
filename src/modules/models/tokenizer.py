"""The miniature's character tokenizer: one token per character, a ChatML template, saved as an
ordinary Hugging Face tokenizer directory, so tiny models go through the code path a Qwen model does.

Load a saved copy with ``PreTrainedTokenizerFast.from_pretrained`` (the framework's loader does this by
itself): next to a qwen2 ``config.json``, transformers 5's ``AutoTokenizer`` builds ``Qwen2Tokenizer``
instead, whose byte-level pre-tokenizer drops every space and newline of a character vocabulary.
"""

from __future__ import annotations

import string

TOKENIZER_VERSION = 1
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# ChatML with tools (for tool-use miniatures): Qwen2.5's layout (tool messages as a user turn in
# <tool_response> tags, see src/tools/episodes.py's TOOL_CHAT_TEMPLATE), but the tools section names
# each tool and its arguments only, since every prompt token costs CPU time: "Tools: calculator(expression)".
TOOLS_CHATML_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for tool in tools %}{% set fn = tool.function or tool %}"
    " {{ fn.name }}({{ (fn.parameters or {}).properties | default({}) | join(', ') }}){% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message['content'] }}\n"
    "</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# by name, for configs: TinyQwen2(chat_template="tools")
CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE, "tools": TOOLS_CHATML_TEMPLATE}


def build_char_tokenizer():
    """A ``PreTrainedTokenizerFast`` over printable ASCII; eos ``<|im_end|>``, pad ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\r\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for c in chars:
        vocab[c] = len(vocab)
    # BPE with no merges never merges: every character is its own token.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(SPECIAL_TOKENS)
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="<unk>", padding_side="left", truncation_side="left")
    tok.chat_template = CHATML_TEMPLATE
    return tok


def build_bpe_tokenizer(vocab_size: int = 128, corpus_problems: int = 4000):
    """A BPE tokenizer over the same printable ASCII, its merges learned from the arithmetic miniature's prompts and
    written solutions (3-digit additions, seed 0): another vocabulary than ``build_char_tokenizer``'s for the same
    text (a cross-vocabulary student, ``src/modules/cross_vocab.py``). Deterministic: the same corpus and trainer
    settings give the same merges. Same special tokens, EOS and pad, and the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    from src.datamodules.arithmetic import ArithmeticTask

    rows = ArithmeticTask(split="train", n=corpus_problems, digits=3, seed=0)()
    corpus = [f"{r['prompt']}\n{r['solution']}" for r in rows]
    chars = sorted(set(string.printable) - set("\r\x0b\x0c"))
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=chars, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="<unk>", padding_side="left", truncation_side="left")
    tok.chat_template = CHATML_TEMPLATE
    return tok
