"""Tool-use episodes as token streams: the chat template's text between an assistant turn and the next.

One episode is ``prompt, a_1, e_1, a_2, e_2, ..., a_K`` where ``a_k`` are assistant turns the policy sampled
(each up to and including its EOS) and ``e_k`` is the chat template's text around the tool messages that answer
``a_k`` (``\\n<|im_start|>user\\n<tool_response>\\n...</tool_response><|im_end|>\\n<|im_start|>assistant\\n``
for Qwen): the *glue*, rendered from a minimal conversation ``[user placeholder, assistant turn] + tool messages``
with a generation prompt (``tool_glue``). The rollout only sees prompt ids, and decoding them back to messages is
not possible in general; for ChatML-style templates (ChatML, Qwen2.5, Qwen3), where the text around tool messages
does not depend on earlier messages, the minimal conversation gives the exact glue. Templates that re-render
*earlier* assistant turns (Qwen3 drops their ``<think>`` blocks) describe a different token sequence from the one
sampled; the rollout keeps what the policy actually saw.

Both sides use it: the multi-turn rollout (``src.modules.rollout.tools``) appends the glue after each answered
turn, and the data side renders a reference demonstration into the same token stream (``render_episode``), so
SFT trains on what the rollout produces when the policy writes the same turns.
"""

from __future__ import annotations

# A Qwen2.5-style template with a tools section and a tool-role branch (the project's CHATML_TEMPLATE ignores
# `tools`); give it to a tokenizer whose own template lacks them: ``tok.chat_template = TOOL_CHAT_TEMPLATE``.
# transformers renders with trim_blocks, which eats a newline right after a tag: hence {{ '\\n' }}.
TOOL_CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{{ '\\n' }}</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags.<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message['content'] }}\n"
    "</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _render(tokenizer, messages, tools, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def tool_glue(tokenizer, turn_text: str, tool_messages: list[dict], eos_texts: list[str],
              tools: list[dict] | None = None) -> str:
    """The template's text between an assistant turn's EOS and the next assistant turn's first token.

    Rendered from ``[user placeholder, assistant turn] + tool messages`` with a generation prompt, it is
    what follows the first EOS text after the user message. The assistant turn itself is not compared:
    templates re-render it (Qwen3 adds an empty ``<think>`` block to a last assistant message only).
    """
    user = [{"role": "user", "content": "?"}]
    head = _render(tokenizer, user, tools, add_generation_prompt=False)
    turn = [{"role": "assistant", "content": turn_text}]
    full = _render(tokenizer, user + turn + list(tool_messages), tools, add_generation_prompt=True)
    if not full.startswith(head):
        raise ValueError("the chat template renders the user message differently once an assistant turn "
                         "follows it; the tool glue cannot be located")
    found = [(full.find(t, len(head)), t) for t in eos_texts if t]
    ends = [i + len(t) for i, t in found if i >= 0]
    if not ends:
        raise ValueError(f"the chat template closes assistant turns with none of the EOS tokens {eos_texts}")
    return full[min(ends):]


def glue_ids(tokenizer, turn_text: str, tool_messages: list[dict], eos_texts: list[str],
             tools: list[dict] | None = None) -> list[int]:
    """``tool_glue`` tokenised: the environment's tokens of one step of an episode."""
    glue = tool_glue(tokenizer, turn_text, tool_messages, eos_texts, tools)
    return tokenizer(glue, add_special_tokens=False)["input_ids"]


def render_episode(tokenizer, messages: list[dict], eos_token_id: int, tools: list[dict] | None = None
                   ) -> tuple[list[int], list[bool]]:
    """The response tokens a tool rollout's episode holds had the policy written ``messages``' assistant turns,
    and which of them it wrote (sampled: True; environment glue: False).

    ``messages`` alternate assistant turns and the tool messages answering them (``[assistant, tool, ...,
    assistant]``) and end with an assistant turn. Each turn is its text's tokens and ``eos_token_id``; the glue
    is ``tool_glue`` as the rollout renders it, so a reference demonstration trains on the token stream the
    rollout produces (``tests/test_tool_use_data.py`` checks one against a scripted episode token by token).
    """
    eos_texts = [tokenizer.decode([eos_token_id])]
    ids: list[int] = []
    sampled: list[bool] = []
    i = 0
    while i < len(messages):
        turn = messages[i]
        if turn.get("role") != "assistant":
            raise ValueError(f"message {i} of an episode must be an assistant turn, not {turn.get('role')!r}")
        turn_ids = tokenizer(turn["content"], add_special_tokens=False)["input_ids"] + [eos_token_id]
        ids += turn_ids
        sampled += [True] * len(turn_ids)
        j = i + 1
        while j < len(messages) and messages[j].get("role") == "tool":
            j += 1
        if j == i + 1 and j < len(messages):
            raise ValueError(f"assistant turn {i} is followed by another assistant turn, not by tool messages")
        if j > i + 1:
            if j == len(messages):
                raise ValueError("an episode must end with an assistant turn (the final answer)")
            env_ids = glue_ids(tokenizer, turn["content"], messages[i + 1 : j], eos_texts, tools)
            ids += env_ids
            sampled += [False] * len(env_ids)
        i = j
    return ids, sampled
