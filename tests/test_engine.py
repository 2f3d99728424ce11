"""The agent loop's text and the generation engine (METHOD §1), on constructed models whose outputs are known
by hand: the instruction, the stop tokens, greedy decoding with padding, positions and cache rows, stop strings,
EOS, temperature scaling, and the sampler (its uniform draws set by hand).

No random weights decide anything here. ArithmeticLM's next token is a fixed function of the tokens it attends
to and their positions, so its greedy continuation is written out in plain Python (`greedy_by_hand`) and the
engine must reproduce it exactly; a wrong padding mask, a wrong position or a cache row kept for the wrong
sequence changes the function's value. FixedLM has fixed logits, so its sampling frequencies are known."""
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import engine
import grpo
import retrieve
import runs
from conftest import enc


# ----------------------------------------------------------------------------------------------------
# METHOD §1: the instruction, the question last, the information block

def test_instruction_has_the_tags_the_example_and_the_question_last(tok):
    question = "Which river flows through Paris?"
    text = tok.decode(grpo.prompt_ids(tok, question))
    head, tail = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"
    assert text.startswith(head) and text.endswith(tail)             # one user turn, through the chat template
    user = text[len(head):-len(tail)]
    assert user.endswith("Question: " + question)                    # the question comes last
    instruction = user[:-len(question)]
    for tag in ("<think>", "</think>", "<search>", "</search>", "<information>", "</information>", "<answer>",
                "</answer>"):
        assert tag in instruction, tag
    assert instruction.index("<search>") < instruction.index("</search>")
    assert "as many times as you need" in instruction                  # search as often as it needs
    assert "<answer> Paris </answer>" in instruction                   # a one-line example of a short answer
    assert "as short as possible" in instruction
    # a tokenizer without a chat template: the same user text, then a newline
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    assert plain.decode(grpo.prompt_ids(plain, question), skip_special_tokens=True) == user + "\n"
    # the question is stripped of surrounding white space
    assert grpo.prompt_ids(tok, "  " + question + "\n") == grpo.prompt_ids(tok, question)


def test_information_block_is_the_documents_between_the_tags():
    docs = [{"title": "Seine", "text": "A river."}, {"title": "Paris", "text": "A city."}]
    assert grpo.information_block(docs) == \
        "\n\n<information>Doc 1(Title: Seine) A river.\nDoc 2(Title: Paris) A city.</information>\n\n"
    assert grpo.information_block([]) == "\n\n<information></information>\n\n"


# ----------------------------------------------------------------------------------------------------
# METHOD §1: what ends a turn: EOS and the chat template's end-of-turn token

def test_stop_ids_hold_eos_and_every_generation_eos():
    tok_ = SimpleNamespace(eos_token_id=7)
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[5, 9]))
    assert engine.stop_ids(tok_, model) == {5, 7, 9}
    model.generation_config.eos_token_id = 9
    assert engine.stop_ids(tok_, model) == {7, 9}
    model.generation_config.eos_token_id = None
    assert engine.stop_ids(SimpleNamespace(eos_token_id=None), model) == set()


def end_of_turn(tok):
    """The token the chat template writes right after an assistant message: the end of a turn."""
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "XYZ"}],
                                  tokenize=True, return_dict=False)
    xyz = enc(tok, "XYZ")
    i = next(i for i in range(len(ids)) if ids[i:i + len(xyz)] == xyz)
    return ids[i + len(xyz)]


def test_stop_ids_hold_the_chat_templates_end_of_turn(tok):
    model, tok_ = runs.tiny_random_model(0)
    eot = end_of_turn(tok_)
    assert tok_.decode([eot]) == "<|im_end|>"
    assert eot in engine.stop_ids(tok_, model)


class _Past:
    """A constructed model's cache: per row, the (token, position, attended) of every position so far."""

    def __init__(self, ids, pos, keep):
        self.ids, self.pos, self.keep = ids, pos, keep

    def batch_select_indices(self, idx):
        self.ids, self.pos, self.keep = self.ids[idx], self.pos[idx], self.keep[idx]


class ScriptLM(nn.Module):
    """Emits script[i] at its i-th forward call, whatever the input (one row)."""

    def __init__(self, script, vocab):
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, 0
        self.anchor = nn.Parameter(torch.zeros(1))  # generate_turn reads the device from the parameters
        self.generation_config = SimpleNamespace(eos_token_id=None)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True,
                logits_to_keep=None):
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        logits[:, 0, self.script[self.calls]] = 10.0
        self.calls += 1
        return SimpleNamespace(logits=logits, past_key_values=None)


def test_the_end_of_turn_token_ends_a_turn_of_the_agent_loop(tok, tmp_path):
    # the model writes " ok", the end-of-turn token, then more; the engine must stop at the end of turn
    eot = end_of_turn(tok)
    first = enc(tok, " ok") + [eot]
    second = enc(tok, "<answer> Paris </answer>")
    model = ScriptLM(first + second, len(tok))   # past the end of turn the script goes on with the next turn
    model.generation_config.eos_token_id = eot   # as tiny_random_model sets it (Qwen3: EOS is <|im_end|>)
    retriever = retrieve.Retriever([{"id": "d", "title": "Paris", "text": "Paris."}], cache_dir=tmp_path)
    r, = grpo.generate_rollouts(model, tok, [{"question": "Capital?", "golden_answers": ["Paris"]}], [0],
                                retriever, max_turns=1, temperature=0.0)
    p = grpo.prompt_ids(tok, "Capital?")
    inv = enc(tok, grpo.INVALID_ACTION)
    assert r.ids == p + first + inv + second                              # nothing after the end of turn
    assert r.roles == [grpo.PROMPT] * len(p) + [grpo.POLICY] * 2 + [grpo.OBS] * len(inv) + [grpo.POLICY] * len(second)
    assert r.invalid_turns == 1 and r.answer == "Paris"


# ----------------------------------------------------------------------------------------------------
# The engine on ArithmeticLM: greedy continuations known by hand

WORDS = [" alpha", " beta", " gamma", " delta", " epsilon", " eta", " theta", " iota", " kappa", " lambda", " sigma"]


class ArithmeticLM(nn.Module):
    """next token = WORDS[(Σ_j (pos_j + 1) · id_j) mod 11] over the attended tokens j (attention mask 1), with
    pos_j the position the engine gives token j. The cache keeps every row's tokens, positions and mask."""

    def __init__(self, word_ids, vocab):
        super().__init__()
        self.words, self.vocab = torch.tensor(word_ids), vocab
        self.anchor = nn.Parameter(torch.zeros(1))
        self.generation_config = SimpleNamespace(eos_token_id=None)

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True,
                logits_to_keep=None):
        L = input_ids.shape[1]
        ids, pos, keep = input_ids, position_ids, attention_mask[:, -L:]
        if past_key_values is not None:
            ids = torch.cat([past_key_values.ids, ids], 1)
            pos = torch.cat([past_key_values.pos, pos], 1)
            keep = torch.cat([past_key_values.keep, keep], 1)
        assert torch.equal(keep, attention_mask)  # the engine's mask covers the cache and the new tokens
        state = (keep * (pos + 1) * ids).cumsum(-1)[:, -(logits_to_keep or L):]   # [B, n]
        nxt = self.words[state % len(self.words)]
        logits = torch.zeros(*nxt.shape, self.vocab)
        logits.scatter_(-1, nxt[..., None], 10.0)
        return SimpleNamespace(logits=logits, past_key_values=_Past(ids, pos, keep))


@pytest.fixture(scope="module")
def arith(tok):
    word_ids = [enc(tok, w) for w in WORDS]
    assert all(len(w) == 1 for w in word_ids)
    word_ids = [w[0] for w in word_ids]

    def greedy_by_hand(seq, n):
        seq, out = list(seq), []
        for _ in range(n):
            nxt = word_ids[sum((k + 1) * t for k, t in enumerate(seq)) % len(word_ids)]
            out.append(nxt)
            seq.append(nxt)
        return out

    return ArithmeticLM(word_ids, len(tok)), greedy_by_hand


@pytest.fixture(scope="module")
def prompts(tok, arith):
    _, by_hand = arith
    short = grpo.prompt_ids(tok, "Who?")
    long = grpo.prompt_ids(tok, "Which river flows through the capital of France, and how long is it in kilometres?")
    return short, long, by_hand(short, 12), by_hand(long, 12)


def test_the_constructed_continuations_are_not_degenerate(prompts):
    # by construction (a property of the arithmetic, the same on every machine)
    _, _, ref_s, ref_l = prompts
    assert len(set(ref_s)) >= 5 and len(set(ref_l)) >= 5 and ref_s != ref_l


def test_greedy_turn_equals_the_continuation_by_hand(tok, arith, prompts):
    model, _ = arith
    short, long, ref_s, ref_l = prompts
    gens, why = engine.generate_turn(model, tok, [short, long], [12, 12], [], set(), 0.0, None)
    assert gens == [ref_s, ref_l] and why == ["length", "length"]
    gens, _ = engine.generate_turn(model, tok, [long, short], [12, 12], [], set(), 0.0, None)   # padded second
    assert gens == [ref_l, ref_s]
    gens, _ = engine.generate_turn(model, tok, [short], [12], [], set(), 0.0, None)
    assert gens == [ref_s]


def test_max_new_per_row(tok, arith, prompts):
    model, _ = arith
    short, long, ref_s, ref_l = prompts
    gens, why = engine.generate_turn(model, tok, [short, long, short], [3, 9, 1], [], set(), 0.0, None)
    assert gens == [ref_s[:3], ref_l[:9], ref_s[:1]] and why == ["length"] * 3


def cut_by_hand(tok, ref, stops, eos=()):
    """ref up to and including the first token that is an EOS id or completes a stop string."""
    for k in range(len(ref)):
        if ref[k] in eos:
            return ref[:k + 1], "eos"
        hit = [s for s in stops if s in tok.decode(ref[:k + 1])]
        if hit:
            return ref[:k + 1], hit[0]
    return ref, "length"


def test_stop_string_across_a_token_boundary(tok, arith, prompts):
    model, _ = arith
    short, long, ref_s, ref_l = prompts
    # the last letter of token 3 and the start of token 4 (" x"): the string is completed by token 4
    stop = tok.decode(ref_s[3:4])[-1] + tok.decode(ref_s[4:5])[:2]
    expected = [cut_by_hand(tok, ref, ["no such string", stop]) for ref in (ref_s, ref_l)]
    assert len(expected[0][0]) <= 5 and expected[0][1] == stop
    gens, why = engine.generate_turn(model, tok, [short, long], [12, 12], ["no such string", stop], set(), 0.0, None)
    assert list(zip(gens, why)) == expected
    # a stop string inside the first token (its text without the first and last character): one token
    inner = tok.decode(ref_s[:1])[1:-1]
    expected = [cut_by_hand(tok, ref, [inner]) for ref in (ref_s, ref_l)]
    assert expected[0] == (ref_s[:1], inner)
    gens, why = engine.generate_turn(model, tok, [short, long], [12, 12], [inner], set(), 0.0, None)
    assert list(zip(gens, why)) == expected


def test_a_row_that_stops_leaves_the_others_exact(tok, arith, prompts):
    # rows stop at different steps (row selection from the cache), the others go on to their own continuation
    model, _ = arith
    short, long, ref_s, ref_l = prompts
    middle = grpo.prompt_ids(tok, "And the longest river of Europe?")
    ref_m = arith[1](middle, 12)
    eos = {ref_s[4]}
    expected = [cut_by_hand(tok, ref, [], eos) for ref in (ref_l, ref_s, ref_m)]
    gens, why = engine.generate_turn(model, tok, [long, short, middle], [12, 12, 12], [], eos, 0.0, None)
    assert list(zip(gens, why)) == expected
    assert expected[1] == (ref_s[:ref_s.index(ref_s[4]) + 1], "eos")


# ----------------------------------------------------------------------------------------------------
# Temperature (METHOD §3: rollouts at 1.0; §5.1: beliefs at ir_temperature): p ∝ exp(logit / T)

class FixedLM(nn.Module):
    """Logits 0, 1, 2 for tokens 0, 1, 2 and -inf for the rest, whatever the input."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True,
                logits_to_keep=None):
        logits = torch.full((input_ids.shape[0], 1, 8), float("-inf"))
        logits[:, 0, :3] = torch.tensor([0.0, 1.0, 2.0])
        return SimpleNamespace(logits=logits, past_key_values=None)


@pytest.mark.parametrize("T, expected", [
    # softmax(l / T) written out: e^(l/T) / Σ e^(l/T)
    (0.5, [1 / (1 + 7.389056 + 54.598150), 7.389056 / (1 + 7.389056 + 54.598150), 54.598150 / (1 + 7.389056 + 54.598150)]),
    (1.0, [1 / (1 + 2.718282 + 7.389056), 2.718282 / (1 + 2.718282 + 7.389056), 7.389056 / (1 + 2.718282 + 7.389056)]),
    (2.0, [1 / (1 + 1.648721 + 2.718282), 1.648721 / (1 + 1.648721 + 2.718282), 2.718282 / (1 + 1.648721 + 2.718282)]),
])
def test_sampling_frequencies_follow_the_temperature(tok, T, expected):
    n = 4000
    gens, why = engine.generate_turn(FixedLM(), tok, [[5]] * n, [1] * n, [], set(), T, torch.Generator().manual_seed(0))
    assert why == ["length"] * n
    freq = [sum(g == [t] for g in gens) / n for t in range(3)]
    assert sum(freq) == 1.0
    # a binomial frequency over 4000 draws has a standard deviation under 0.008: 0.03 is beyond 3.5 of them, and
    # the draws are seeded (the same numbers on every run)
    assert freq == pytest.approx(expected, abs=0.03)


def test_temperature_zero_is_greedy(tok):
    gens, _ = engine.generate_turn(FixedLM(), tok, [[5]] * 50, [1] * 50, [], set(), 0.0, None)
    assert gens == [[2]] * 50


# ----------------------------------------------------------------------------------------------------
# The sampler: the inverse of each row's cumulative distribution

def test_sampler_inverts_the_cumulative_distribution_at_the_uniform_draw(monkeypatch):
    # probs [0.2, 0, 0.5, 0.3]: cdf [0.2, 0.2, 0.7, 1.0]; token i holds [cdf[i-1], cdf[i]) of [0, 1).
    # The uniform draws are set by patching torch.rand, so each expected token is read off the cdf by hand.
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3]] * 6)
    u = torch.tensor([[0.0], [0.1999], [0.2], [0.6999], [0.7], [0.9999]], dtype=torch.float64)
    monkeypatch.setattr(torch, "rand", lambda *a, **k: u)
    assert engine.sample_tokens(probs, None).tolist() == [0, 0, 2, 2, 3, 3]  # never 1, whose probability is 0


def test_sampler_scales_the_draw_by_the_row_total(monkeypatch):
    # unnormalized rows: u·total, so [1, 3] is [0.25, 0.75]; u·total rounded up to the total itself (the last
    # row, u = 1) is past every cdf entry, and gives the last token, not an index out of range
    probs = torch.tensor([[1.0, 3.0], [1.0, 3.0], [0.0, 2.0], [1.0, 3.0]])
    u = torch.tensor([[0.24], [0.26], [0.0], [1.0]], dtype=torch.float64)
    monkeypatch.setattr(torch, "rand", lambda *a, **k: u)
    assert engine.sample_tokens(probs, None).tolist() == [0, 1, 1, 1]


def test_sampler_frequencies_rows_and_seed():
    # each row its own distribution; zeros at the start, in the middle and at the end are never drawn
    probs = torch.tensor([[0.0, 0.1, 0.0, 0.6, 0.3, 0.0], [0.5, 0.0, 0.0, 0.0, 0.0, 0.5]])
    n = 20000
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([engine.sample_tokens(probs, gen) for _ in range(n)])  # [n, 2]
    for row in range(2):
        freq = torch.bincount(draws[:, row], minlength=6).double() / n
        # a binomial frequency over 20,000 draws has a standard deviation under 0.0036: 0.015 is beyond 4 of them
        assert freq.tolist() == pytest.approx(probs[row].tolist(), abs=0.015)
        assert freq[probs[row] == 0].sum() == 0
    again = engine.sample_tokens(probs.repeat(50, 1), torch.Generator().manual_seed(3))
    assert torch.equal(again, engine.sample_tokens(probs.repeat(50, 1), torch.Generator().manual_seed(3)))
    assert not torch.equal(again, engine.sample_tokens(probs.repeat(50, 1), torch.Generator().manual_seed(4)))
