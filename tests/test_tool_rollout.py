"""Multi-turn tool rollouts: token layout against the rendered conversation, masks, scoring in context, stops.

A scripted "model" writes fixed turns (its logits processors see made-up scores, so the recorded log-probs
have a closed form); tiny random Qwen2s check that the teacher and the student score each sampled token in
the full multi-turn context, exactly as a plain forward over the whole episode does.
"""

from __future__ import annotations

import json
import math

import hydra
import pytest
import torch
from transformers import GenerationConfig

from src.modules.models.tiny import TinyQwen2
from src.modules.models.tokenizer import CHATML_TEMPLATE, build_char_tokenizer
from src.modules.rollout.hf import HFGenerateRollout
from src.modules.rollout.tools import ToolRollout
from src.modules.scoring import score_tokens
from src.tools import Calculator, ToolEnvironment
from src.tools.episodes import TOOL_CHAT_TEMPLATE, tool_glue

pytestmark = pytest.mark.timeout(120)

QUESTION, DIRECT = "What is 123456789*987654321?", "Capital of France?"
CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "123456789*987654321"}}</tool_call>'
ANSWER = "The answer is 121932631112635269."
# what the Qwen-style template writes between the assistant's <|im_end|> and its next turn
GLUE = ("\n<|im_start|>user\n<tool_response>\n121932631112635269\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def tok():
    t = build_char_tokenizer()
    t.chat_template = TOOL_CHAT_TEMPLATE
    return t


@pytest.fixture
def env():
    return ToolEnvironment([Calculator()], timeout_s=5)


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def fake_scores(n_real_B: torch.Tensor, V: int) -> torch.Tensor:
    """Made-up logits that depend on the context length: a misaligned log-prob shows up."""
    return 3.0 * torch.sin(0.37 * torch.arange(V)[None, :] + 1.3 * n_real_B[:, None].float())


class ScriptedLM:
    """``generate`` writes ``scripts[key][k]`` + EOS as turn k of the prompt that contains ``key``."""

    def __init__(self, tok, scripts: dict[str, list[str]]):
        self.tok, self.scripts, self.batch_sizes = tok, scripts, []
        self.generation_config = GenerationConfig()

    def generate(self, input_ids, attention_mask, generation_config, logits_processor, **_):
        pad, eos = generation_config.pad_token_id, generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.batch_sizes.append(input_ids.shape[0])
        targets = []
        for row, m in zip(input_ids, attention_mask):
            text = self.tok.decode(row[m.bool()])
            key = next(k for k in self.scripts if k in text)
            turn = text.count("<|im_start|>assistant") - 1
            targets.append(encode(self.tok, self.scripts[key][turn]) + [eos[0]])
        seq, done = input_ids, torch.zeros(len(targets), dtype=torch.bool)
        for t in range(generation_config.max_new_tokens):
            logit_processor_out = logits_processor(seq, fake_scores((seq != pad).sum(-1), len(self.tok)))
            assert logit_processor_out.shape == (len(targets), len(self.tok))
            nxt = torch.tensor([pad if done[i] else targets[i][t] for i in range(len(targets))])
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            done |= torch.isin(nxt, torch.tensor(eos))
            if done.all():
                break
        return seq


def prompts(tok, env, questions):
    ids = [tok.apply_chat_template([{"role": "user", "content": q}], tools=env.schemas(),
                                   add_generation_prompt=True, tokenize=False) for q in questions]
    ids = [encode(tok, x) for x in ids]
    P = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), P), tok.pad_token_id)
    mask = torch.zeros((len(ids), P), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, P - len(x):], mask[i, P - len(x):] = torch.tensor(x), 1
    return input_ids, mask


def run(tok, env, scripts, questions, **kw):
    model = ScriptedLM(tok, scripts)
    ids, mask = prompts(tok, env, questions)
    ro = ToolRollout(env, tokenizer=tok, **kw)(model, ids, mask, [tok.eos_token_id], tok.pad_token_id)
    return ro, model, mask


def real_response(ro, b) -> list[int]:
    return ro.response_ids_BT[b][ro.attention_mask[b, ro.response_start:].bool()].tolist()


def test_scripted_episode_is_the_rendered_conversation_token_by_token(tok, env):
    ro, model, mask = run(tok, env, {DIRECT: ["Paris."], QUESTION: [CALL, ANSWER]}, [DIRECT, QUESTION],
                          max_new_tokens=400, temperature=0.7)
    eos = tok.eos_token_id
    t1, t2 = encode(tok, CALL) + [eos], encode(tok, ANSWER) + [eos]
    glue = encode(tok, GLUE)
    # the episode as the template renders the whole conversation (it adds "\n" after the last <|im_end|>)
    convo = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": CALL},
             {"role": "tool", "name": "calculator", "content": str(123456789 * 987654321)},
             {"role": "assistant", "content": ANSWER}]
    full = encode(tok, tok.apply_chat_template(convo, tools=env.schemas(), tokenize=False))
    prompt = ro.input_ids[1, : ro.response_start][mask[1].bool()].tolist()
    assert prompt + real_response(ro, 1) + encode(tok, "\n") == full
    assert real_response(ro, 1) == t1 + glue + t2
    sampled = [True] * len(t1) + [False] * len(glue) + [True] * len(t2)
    T = len(sampled)
    assert ro.response_mask_BT.shape == (2, T) and ro.response_mask_BT[1].tolist() == sampled
    assert ro.attention_mask[1, ro.response_start:].tolist() == [1] * T  # the glue is attended
    # the direct answer waits, right-padded
    direct = encode(tok, "Paris.") + [eos]
    assert ro.response_ids_BT[0].tolist() == direct + [tok.pad_token_id] * (T - len(direct))
    assert ro.response_mask_BT[0].tolist() == ro.attention_mask[0, ro.response_start:].bool().tolist() == \
        [True] * len(direct) + [False] * (T - len(direct))
    assert model.batch_sizes == [2, 1]  # finished sequences are not generated again
    # rollout-time log-probs: the made-up scores at temperature 0.7, given the whole context before each token
    for b in range(2):
        n_prompt = int(mask[b].sum())
        for t in range(T):
            if ro.response_mask_BT[b, t]:
                z = fake_scores(torch.tensor([n_prompt + t]), len(tok))[0] / 0.7
                want = torch.log_softmax(z, -1)[ro.response_ids_BT[b, t]]
                assert ro.old_logp_BT[b, t].item() == pytest.approx(want.item(), abs=1e-5)
                assert ro.entropy_BT[b, t] > 0
    assert (ro.old_logp_BT[~ro.response_mask_BT] == 0).all()
    assert (ro.old_logp_BT[ro.response_mask_BT] != 0).all()
    assert (ro.entropy_BT[~ro.response_mask_BT] == 0).all()
    assert not ro.truncated_B.any() and ro.group_size == 1 and ro.seconds > 0
    m = {k: v.item() for k, v in ro.metrics.items()}
    assert m == {"tools/calls_per_episode": 0.5, "tools/malformed_rate": 0.0, "tools/error_rate": 0.0,
                 "turns_mean": 1.5}
    # what the module grades: the sampled tokens only, which hold the final turn
    text = tok.decode(torch.where(ro.response_mask_BT[1], ro.response_ids_BT[1], tok.pad_token_id),
                      skip_special_tokens=True)
    assert text == CALL + ANSWER


# a last assistant message gets an empty think block (as Qwen3's template does): it is not a prefix any more
THINK_LAST = TOOL_CHAT_TEMPLATE.replace(
    "{% else %}<|im_start|>{{ message['role'] }}\n",
    "{% else %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}")


@pytest.mark.parametrize("template, want", [
    (TOOL_CHAT_TEMPLATE, GLUE),
    (THINK_LAST, GLUE),
    (CHATML_TEMPLATE, "\n<|im_start|>tool\n121932631112635269<|im_end|>\n<|im_start|>assistant\n"),
])
def test_glue_is_the_templates_text_between_turns(env, template, want):
    tok = build_char_tokenizer()
    tok.chat_template = template
    assert template != THINK_LAST or "<think>" in tok.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], tokenize=False)
    assert tool_glue(tok, CALL, env.execute(CALL), ["<|im_end|>"], env.schemas()) == want
    two = [{"role": "tool", "name": "calculator", "content": "6"}, {"role": "tool", "name": "calculator",
                                                                  "content": "7"}]
    if template == TOOL_CHAT_TEMPLATE:
        assert tool_glue(tok, CALL, two, ["<|im_end|>"]) == (
            "\n<|im_start|>user\n<tool_response>\n6\n</tool_response><|im_end|>\n"
            "<|im_start|>user\n<tool_response>\n7\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="none of the EOS"):
        tool_glue(tok, CALL, two, ["<|endoftext|>"])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    spec = TinyQwen2(cache_dir=str(tmp_path_factory.mktemp("m")), hidden_size=32, num_layers=2, seed=3)
    return spec


def test_teacher_scores_each_sampled_token_in_the_full_multi_turn_context(tok, env, teacher, single_thread):
    model = teacher.load_model().eval()
    ro, _, _ = run(tok, env, {DIRECT: ["Paris."], QUESTION: [CALL, ANSWER]}, [DIRECT, QUESTION],
                   max_new_tokens=400)
    logp_BT, _ = score_tokens(model, ro.input_ids, ro.attention_mask, ro.response_start, 1.0, chunk_size=7)
    P = ro.response_start
    for b in range(2):
        real = ro.input_ids[b][ro.attention_mask[b].bool()]  # prompt + turn 1 + glue + turn 2, no padding
        ref = torch.log_softmax(model(input_ids=real[None]).logits[0, :-1].float(), -1)
        ref = ref.gather(-1, real[1:, None]).squeeze(-1)
        n_prompt = int(ro.attention_mask[b, :P].sum())
        for t in ro.response_mask_BT[b].nonzero().flatten().tolist():
            assert logp_BT[b, t].item() == pytest.approx(ref[n_prompt + t - 1].item(), abs=1e-4)
    # the test can fail: had the glue not been attended, turn 2 would be scored without the tool output
    blind = ro.attention_mask.clone()
    blind[:, P:] &= ro.response_mask_BT.long()
    blind_BT, _ = score_tokens(model, ro.input_ids, blind, P, 1.0)
    turn2 = ro.response_mask_BT[1].clone()
    turn2[: len(encode(tok, CALL)) + 1] = False
    assert (blind_BT[1, turn2] - logp_BT[1, turn2]).abs().max() > 1e-3


def test_malformed_call_gets_an_error_message_and_the_episode_continues(tok, env):
    bad = '<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}</tool_call>'
    ro, _, _ = run(tok, env, {QUESTION: [bad, "I could not compute it."]}, [QUESTION], max_new_tokens=400)
    response = tok.decode(real_response(ro, 0))
    assert "<tool_response>\nerror: tool call is not valid JSON" in response
    assert response.endswith("I could not compute it.<|im_end|>")
    assert not ro.truncated_B.any()
    m = {k: v.item() for k, v in ro.metrics.items()}
    assert m == {"tools/calls_per_episode": 1.0, "tools/malformed_rate": 1.0, "tools/error_rate": 1.0,
                 "turns_mean": 2.0}


N1 = len(CALL) + 1  # tokens of the tool-call turn with its EOS (one per character)


@pytest.mark.parametrize("kw, sampled, turns, glue", [
    (dict(max_turns=2), [N1, N1], 2, 1),  # still calling at max_turns: no final answer
    (dict(max_new_tokens=N1 + 5), [N1, 5], 2, 1),  # budget runs out mid-turn
    (dict(max_new_tokens=N1), [N1], 1, 0),  # budget spent when the call is made: it is not executed
    (dict(turn_max_new_tokens=20), [20], 1, 0),  # a turn without EOS ends the episode
])
def test_max_turns_and_budgets_stop_episodes(tok, env, kw, sampled, turns, glue):
    ro, _, _ = run(tok, env, {QUESTION: [CALL, CALL, CALL, ANSWER]}, [QUESTION],
                   **{"max_new_tokens": 1000, **kw})
    assert ro.truncated_B.tolist() == [True]
    assert ro.metrics["turns_mean"].item() == turns
    assert int(ro.response_mask_BT.sum()) == sum(sampled)
    assert tok.decode(real_response(ro, 0)).count("<tool_response>") == glue
    # runs of sampled tokens: one per turn, with the expected lengths
    bits = "".join("1" if s else "0" for s in ro.response_mask_BT[0].tolist())
    runs = [len(r) for r in bits.split("0") if r]
    assert runs == sampled


def test_each_sequence_gets_exactly_its_own_episode_budget(tok, env):
    short = CALL.replace("123456789*987654321", "2*3")
    budget = N1 + len(ANSWER) + 1 - 3  # the long call leaves 3 tokens too few for the answer
    ro, model, _ = run(tok, env, {QUESTION: [CALL, ANSWER], DIRECT: [short, ANSWER]}, [QUESTION, DIRECT],
                       max_new_tokens=budget)
    assert ro.response_mask_BT.sum(-1).tolist() == [budget, len(short) + 1 + len(ANSWER) + 1]
    assert ro.truncated_B.tolist() == [True, False]
    assert model.batch_sizes == [2, 2]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return TinyQwen2(cache_dir=str(tmp_path_factory.mktemp("s")), hidden_size=32, num_layers=2, seed=5)


@pytest.mark.parametrize("greedy", [False, True])
def test_without_tool_calls_it_is_one_hf_generate_rollout(tok, env, student, greedy, single_thread):
    model = student.load_model().eval()
    ids, mask = prompts(tok, env, ["1+2=", "12345+678="])
    kw = dict(max_new_tokens=12, temperature=0.8, top_k=20, num_samples=3)
    torch.manual_seed(0)
    want = HFGenerateRollout(**kw)(model, ids, mask, [tok.eos_token_id], tok.pad_token_id, greedy=greedy)
    torch.manual_seed(0)
    got = ToolRollout(env, tok, **kw)(model, ids, mask, [tok.eos_token_id], tok.pad_token_id, greedy=greedy)
    assert got.metrics["tools/calls_per_episode"] == 0
    for name in ["input_ids", "attention_mask", "response_mask_BT", "truncated_B"]:
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.group_size == want.group_size == (1 if greedy else 3)
    if greedy:
        assert got.old_logp_BT is None and got.entropy_BT is None
    else:
        torch.testing.assert_close(got.old_logp_BT, want.old_logp_BT)
        torch.testing.assert_close(got.entropy_BT, want.entropy_BT)


class EchoEnvironment:
    """Answers every turn (a random model never writes a well-formed call)."""

    def schemas(self):
        return [Calculator().schema()]

    def execute(self, text):
        return [{"role": "tool", "name": "echo", "content": f"{len(text)} characters"}]


def test_random_student_smoke_two_turns(tok, student, single_thread):
    model = student.load_model().eval()
    eos = tok.eos_token_id
    model.lm_head.weight.data[eos] += 0.3 * model.model.norm.weight.data.sign()  # turns end early
    ids, mask = prompts(tok, EchoEnvironment(), ["1+2=", "12345+678="])
    torch.manual_seed(0)
    rollout = ToolRollout(EchoEnvironment(), tok, max_turns=2, max_new_tokens=40, turn_max_new_tokens=16,
                          temperature=0.7, num_samples=4)
    ro = rollout(model, ids, mask, [eos], tok.pad_token_id)
    B, P = 8, ids.shape[1]
    T = ro.input_ids.shape[1] - P
    assert ro.response_start == P and ro.group_size == 4
    for x in [ro.response_mask_BT, ro.old_logp_BT, ro.entropy_BT]:
        assert x.shape == (B, T)
    assert ro.attention_mask.shape == ro.input_ids.shape and ro.truncated_B.shape == (B,)
    assert 1 < ro.metrics["turns_mean"] < 2 and ro.truncated_B.any() and not ro.truncated_B.all()
    real_BT = ro.attention_mask[:, P:].bool()
    assert (ro.response_mask_BT <= real_BT).all() and (real_BT > ro.response_mask_BT).any()  # glue somewhere
    n_real = real_BT.sum(-1, keepdim=True)
    assert torch.equal(real_BT, torch.arange(T)[None] < n_real)  # real tokens, then padding
    assert (ro.input_ids[:, P:][~real_BT] == tok.pad_token_id).all()
    n_sampled = ro.response_mask_BT.sum(-1)
    assert n_sampled.max() <= 40
    last = ro.input_ids[:, P:].gather(1, n_real - 1).squeeze(1)
    assert ((last == eos) | ro.truncated_B).all()  # an episode ends on EOS unless it was cut
    # rollout-time log-probs are the student's own scores in the multi-turn context
    logp, ent = score_tokens(model, ro.input_ids, ro.attention_mask, P, 0.7, chunk_size=11)
    m = ro.response_mask_BT
    torch.testing.assert_close(logp[m], ro.old_logp_BT[m], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ent[m], ro.entropy_BT[m], atol=1e-4, rtol=1e-4)
    assert all(math.isfinite(v.item()) for v in ro.metrics.values())
    assert ro.select_rows(torch.tensor([1, 6])).response_mask_BT.shape == (2, T)


def test_needs_a_tokenizer_and_refuses_images(tok, env):
    rollout = ToolRollout(env)
    ids, mask = prompts(tok, env, ["x"])
    with pytest.raises(RuntimeError, match="needs a tokenizer"):
        rollout(ScriptedLM(tok, {}), ids, mask, [tok.eos_token_id], tok.pad_token_id)
    rollout.bind(tok, None)
    with pytest.raises(NotImplementedError, match="images"):
        rollout(ScriptedLM(tok, {}), ids, mask, [tok.eos_token_id], tok.pad_token_id,
                pixel_values=torch.zeros(4, 3), images_per_row=torch.tensor([1]))
    with pytest.raises(ValueError, match="max_turns"):
        ToolRollout(env, max_turns=0)


def test_config_composes_and_instantiates(make_cfg):
    cfg = make_cfg("rollout=tools", "tools@rollout.environment=default")
    rollout = hydra.utils.instantiate(cfg.rollout)
    assert isinstance(rollout, ToolRollout)
    assert list(rollout.environment.tools) == ["calculator", "python", "search"]
    assert rollout.temperature == cfg.rollout.temperature
    assert rollout.val_max_new_tokens == rollout.max_new_tokens == cfg.rollout.max_new_tokens
    assert json.loads(json.dumps(rollout.environment.schemas()))


def test_the_module_trains_on_tool_rollouts(make_cfg, tok, single_thread):
    """Through DistillationModule: generate, prepare (teacher log-probs in context), loss, backward."""
    cfg = make_cfg("rollout=tools", "rollout.max_turns=2", "rollout.max_new_tokens=24",
                   "rollout.num_samples=2")
    module = hydra.utils.instantiate(cfg.module)
    module.configure_model()
    assert module.rollout.tokenizer is module.tokenizer  # configure_model hands the rollout its tokenizer
    module.tokenizer.chat_template = TOOL_CHAT_TEMPLATE
    module.rollout.environment = EchoEnvironment()
    student = module.student
    student.lm_head.weight.data[tok.eos_token_id] += 0.2 * student.model.norm.weight.data.sign()  # turns end
    ids, mask = prompts(tok, EchoEnvironment(), ["1+2=", "3+4="])
    batch = {"input_ids": ids, "attention_mask": mask, "references": ["3", "7"]}
    ro = module.objective.rollout(batch, module.sampler, module.scorer)
    assert ro.references == ["3", "3", "7", "7"] and len(ro.response_texts) == 4
    module.objective.prepare(ro, module.scorer, module.selection)
    assert ro.teacher_logp_BT.shape == ro.response_mask_BT.shape
    assert (ro.teacher_logp_BT[~ro.response_mask_BT] == 0).all()
    assert ro.metrics["turns_mean"] > 1  # some episode was answered and went on
    assert {"tools/calls_per_episode", "turns_mean", "reward_mean"} <= set(ro.metrics)
    loss, _ = module.objective.loss(ro, module.scorer)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student.parameters())


def test_prompts_announce_the_tools_through_the_chat_template(tok, env):
    from src.datamodules.prompts import PromptDataModule

    rows = [{"prompt": "What is 123456789 * 987654321?", "answer": "121932631112635269"}]
    dm = PromptDataModule(train=lambda: rows, batch_size=1, tools=env)
    dm.set_tokenizer(tok)
    dm.setup("fit")
    text = tok.decode(dm.splits["train"].ids[0])
    assert '"name": "calculator"' in text and "<tools>" in text
    plain = PromptDataModule(train=lambda: rows, batch_size=1)
    plain.set_tokenizer(tok)
    plain.setup("fit")
    assert "calculator" not in tok.decode(plain.splits["train"].ids[0])


# ---------------------------------------------------------------- reference episodes for the SFT stages
@pytest.fixture(scope="module")
def mini_tok():
    from src.modules.models.tokenizer import TOOLS_CHATML_TEMPLATE

    t = build_char_tokenizer()
    t.chat_template = TOOLS_CHATML_TEMPLATE
    return t


def demonstrations(tok, n=2):
    from src.datamodules.prompts import PromptDataModule
    from src.datamodules.tool_use import ToolArithmeticTask

    rows = ToolArithmeticTask("train", n)()
    dm = PromptDataModule(train=lambda: rows, batch_size=n)
    dm.set_tokenizer(tok)
    dm.setup("fit")
    return rows, dm.collate([dm.splits["train"][i] for i in range(n)])


@pytest.mark.parametrize("template", ["compact", "qwen"])
def test_reference_episode_is_the_rollouts_episode_token_by_token(mini_tok, template, env):
    """What the SFT stage trains on is exactly the token stream (and the sampled mask) that ToolRollout
    produces when the policy writes the demonstration's turns."""
    from src.modules.rollout.batch import reference_rollout

    tok = mini_tok if template == "compact" else globals()["build_char_tokenizer"]()
    if template == "qwen":
        tok.chat_template = TOOL_CHAT_TEMPLATE
    rows, batch = demonstrations(tok)
    ref = reference_rollout(batch, tok.eos_token_id, tok.pad_token_id)
    scripts = {r["prompt"]: [m["content"] for m in r["solution"] if m["role"] == "assistant"] for r in rows}
    model = ScriptedLM(tok, scripts)
    ro = ToolRollout(env, tokenizer=tok, max_new_tokens=400)(model, batch["input_ids"], batch["attention_mask"],
                                                             [tok.eos_token_id], tok.pad_token_id)
    for name in ("input_ids", "attention_mask", "response_mask_BT", "truncated_B"):
        assert torch.equal(getattr(ro, name), getattr(ref, name)), name
    assert ro.metrics["tools/calls_per_episode"] == 1 and ro.metrics["tools/error_rate"] == 0


def test_reference_loss_mask_covers_only_the_assistants_tokens(mini_tok):
    from src.modules.method.objectives import ReferenceSFT
    from src.modules.rollout.batch import reference_rollout

    rows, batch = demonstrations(mini_tok)
    ro = reference_rollout(batch, mini_tok.eos_token_id, mini_tok.pad_token_id)
    ReferenceSFT().prepare(ro, scorer=None)
    im_end = "<|im_end|>"
    for b, row in enumerate(rows):
        call, reply, answer = row["solution"]
        real = ro.attention_mask[b, ro.response_start:].bool()
        written, read = ro.loss_mask_BT[b], real & ~ro.loss_mask_BT[b]
        ids = ro.response_ids_BT[b]
        assert mini_tok.decode(ids[written]) == call["content"] + im_end + answer["content"] + im_end
        assert mini_tok.decode(ids[read]) == (f"\n<|im_start|>user\n<tool_response>\n{reply['content']}\n"
                                              f"</tool_response>{im_end}\n<|im_start|>assistant\n")
        assert reply["content"] == row["answer"] and f"The answer is {row['answer']}." == answer["content"]
        prompt = mini_tok.decode(ro.input_ids[b, : ro.response_start][ro.attention_mask[b, : ro.response_start].bool()])
        assert prompt.startswith("<|im_start|>system\nTools: calculator(expression)<|im_end|>\n")
    # a plain-string solution still trains on every token of the solution and its EOS
    plain = {k: v for k, v in batch.items() if k != "target_mask"}
    ro = reference_rollout(plain, mini_tok.eos_token_id, mini_tok.pad_token_id)
    assert torch.equal(ro.response_mask_BT, ro.attention_mask[:, ro.response_start:].bool())


class ScriptedPolicy(torch.nn.Module):
    """A ``ScriptedLM`` the module can hold as its student."""

    def __init__(self, tok, scripts):
        super().__init__()
        self.lm = ScriptedLM(tok, scripts)
        self.generation_config = self.lm.generation_config

    def generate(self, *args, **kwargs):
        return self.lm.generate(*args, **kwargs)


GOOD, BAD = "Each of 2 runners ran 3 metres?", "A farm sold 4 eggs?"
SCRIPTS = {GOOD: [CALL.replace("123456789*987654321", "2*3"), "The answer is 6."],
           BAD: ['<tool_call>{"name": "calculator", "arguments": {"expression": "4+5"}</tool_call>',
                 "The answer is 9."],
           DIRECT: ["The answer is Paris."]}


def test_validation_logs_tool_episode_metrics_pooled_over_batches(make_cfg, tok, single_thread):
    """acc, tool calls per episode, malformed calls per call, turns and truncation, as val/<task>/...;
    pooled over batches (a per-batch mean would give the malformed rate 1/3 here, not 1/2)."""
    from src.callbacks.report import greedy_eval

    cfg = make_cfg("rollout=tools", "rollout.max_turns=3", "rollout.max_new_tokens=200")
    module = hydra.utils.instantiate(cfg.module)
    module.configure_model()
    module.tokenizer = module.rollout.tokenizer = module.sampler.tokenizer = tok
    module.student = ScriptedPolicy(tok, SCRIPTS)
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)
    batches = []
    for questions, refs in (([GOOD, DIRECT], ["6", "Paris"]), ([BAD], ["9"])):
        ids, mask = prompts(tok, module.rollout.environment, questions)
        batches.append({"input_ids": ids, "attention_mask": mask, "references": refs, "ids": questions})
        module._evaluate(batches[-1], "val")
    got = {k: float(v.compute()) for k, v in logged.items()}
    task = cfg.data.task
    assert got == pytest.approx({f"val/{task}/acc": 1.0, f"val/{task}/response_len": got[f"val/{task}/response_len"],
                                 f"val/{task}/truncation_rate": 0.0, f"val/{task}/tools/calls_per_episode": 2 / 3,
                                 f"val/{task}/tools/malformed_rate": 1 / 2, f"val/{task}/tools/error_rate": 1 / 2,
                                 f"val/{task}/turns_mean": 5 / 3})
    row = greedy_eval(module, batches, module.student)
    assert row["acc"] == 1.0 and row["n"] == 3 and row["truncation_rate"] == 0
    assert row["calls_per_episode"] == pytest.approx(2 / 3) and row["malformed_rate"] == pytest.approx(1 / 2)
    assert row["turns"] == pytest.approx(5 / 3)
