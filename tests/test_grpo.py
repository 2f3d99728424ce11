"""GRPO (METHOD §1 and §3): token bookkeeping of rollouts, the generation engine, advantages, the loss,
gradients, log-probs, a learning check, seeded repeatability, the defaults of Config, the presets and the
formula functions against METHOD, and the command line.

Every expectation is worked out by hand or by an independent computation (a plain full forward pass, a
step-by-step argmax, Python float arithmetic), never by calling the function under test a second time.
The model is runs.tiny_random_model: a 2-layer random Qwen3 with the real Qwen3 tokenizer (offline).
"""
import copy
import inspect
import json
import math
import socket
from pathlib import Path

import pytest
import torch

import engine
import grpo
import igsearch
import retrieve
import rewards
import runs
from conftest import enc, loss_and_grads
from grpo import OBS, PAD, POLICY, PROMPT

DOCS = [
    {"id": "d0", "title": "Paris", "text": "Paris is the capital and largest city of France."},
    {"id": "d1", "title": "Seine", "text": "The Seine is the river that flows through Paris."},
    {"id": "d2", "title": "Berlin", "text": "Berlin is the capital of Germany."},
    {"id": "d3", "title": "Danube", "text": "The Danube flows through Vienna and Budapest."},
    {"id": "d4", "title": "Tokyo", "text": "Tokyo is the capital of Japan."},
]
QUESTION = {"id": "q0", "question": "What is the capital of France?", "golden_answers": ["Paris"]}

# One intra-op thread for the whole module, its module fixtures (shaped_tiny, two_prompts) included: the matrices
# are tiny, so a second thread gains little, and on a shared CPU (tests run beside other jobs) OpenMP threads
# waiting on each other slow the file down.
pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture
def retriever(tmp_path):
    return retrieve.Retriever(DOCS, cache_dir=tmp_path)


def run_scripts(tok, retriever, scripts, questions=None, groups=None, **kw):
    questions = questions or [QUESTION] * len(scripts)
    groups = groups if groups is not None else [0] * len(scripts)
    return grpo.generate_rollouts(None, tok, questions, groups, retriever,
                                  turn_fn=grpo.scripted_turns(tok, scripts), **kw)


# ----------------------------------------------------------------------------------------------------
# 1. Roles and spans, token by token (METHOD §1)

TURN0 = "<think>I need to search.</think>\n<search> capital of France </search>"
TURN1 = "<think>Now the river.</think>\n<search> river through Paris </search> and some text after the stop"
TURN1_CUT = "<think>Now the river.</think>\n<search> river through Paris </search>"
TURN2 = "<think>Done.</think>\n<answer> Paris </answer>"


def test_two_search_trajectory_token_by_token(tok, retriever):
    r, = run_scripts(tok, retriever, [[TURN0, TURN1, TURN2]], max_turns=2, topk=2)
    p = grpo.prompt_ids(tok, QUESTION["question"])
    # BM25 by hand: "capital of France" -> Paris first (capital + france); "river through Paris" -> Seine
    # (river, through, paris) then Paris (paris) or Danube (through)
    docs0 = retriever.search(["capital of France"], 2)[0]
    docs1 = retriever.search(["river through Paris"], 2)[0]
    assert docs0[0]["title"] == "Paris" and docs1[0]["title"] == "Seine"
    pieces = [(p, PROMPT), (enc(tok, TURN0), POLICY), (enc(tok, grpo.information_block(docs0)), OBS),
              (enc(tok, TURN1_CUT), POLICY), (enc(tok, grpo.information_block(docs1)), OBS),
              (enc(tok, TURN2), POLICY)]
    ids = [i for piece, _ in pieces for i in piece]
    roles = [role for piece, role in pieces for _ in piece]
    assert r.ids == ids                  # exactly these ids, position by position
    assert r.roles == roles
    assert r.answer == "Paris" and not r.truncated and r.invalid_turns == 0
    assert [s["query"] for s in r.searches] == ["capital of France", "river through Paris"]
    assert [s["docs"] for s in r.searches] == [docs0, docs1]
    # spans: the query span is `<search> ... </search>` of the turn, tags included; the info span is the obs
    starts = [0]
    for piece, _ in pieces:
        starts.append(starts[-1] + len(piece))
    for t, (turn_piece, obs_piece) in enumerate([(1, 2), (3, 4)]):
        s, e = r.searches[t]["query_span"]
        assert e == starts[turn_piece + 1]                      # ends with the turn's last token
        assert tok.decode(r.ids[s:e]) == ["<search> capital of France </search>",
                                          "<search> river through Paris </search>"][t]
        assert tuple(r.searches[t]["info_span"]) == (starts[obs_piece], starts[obs_piece + 1])
        assert all(role == OBS for role in r.roles[starts[obs_piece]:starts[obs_piece + 1]])
    # the tokens of the text after </search> were never kept
    assert "after the stop" not in tok.decode(r.ids)
    assert tok.decode(r.ids[starts[3]:starts[4]]).endswith("</search>")
    assert r.n_policy == len(enc(tok, TURN0)) + len(enc(tok, TURN1_CUT)) + len(enc(tok, TURN2))


def test_show_rollout_tags_each_stretch_of_one_role(tok, retriever):
    r, = run_scripts(tok, retriever, [[TURN0, TURN2]], max_turns=1, topk=1)
    r.reward = 1.0
    docs = r.searches[0]["docs"]
    prompt = tok.decode(grpo.prompt_ids(tok, QUESTION["question"]))
    assert grpo.show_rollout(r, tok) == (
        f"[prompt]{prompt}[policy]{TURN0}[obs]{grpo.information_block(docs)}[policy]{TURN2}"
        "\n[answer='Paris' reward=1.000 searches=1]")


def test_query_span_with_a_space_before_the_tag(tok, retriever):
    # "</think> <search>": the tag may share a token with the space before it; the span still starts at it
    r, = run_scripts(tok, retriever, [["</think> <search> Berlin </search>", "<answer> x </answer>"]], max_turns=1)
    s, e = r.searches[0]["query_span"]
    text = tok.decode(r.ids[s:e])
    assert text.strip() == "<search> Berlin </search>"
    assert "think" not in text
    assert r.searches[0]["query"] == "Berlin"


def test_policy_mask_is_the_policy_positions_only(tok, retriever):
    rs = run_scripts(tok, retriever, [[TURN0, TURN2], ["<answer> Lyon </answer>"], ["hmm", TURN2]], max_turns=2)
    batch = grpo.collate(rs, tok.pad_token_id)
    assert batch.ids.shape == (3, max(len(r.ids) for r in rs))
    for b, r in enumerate(rs):
        n = len(r.ids)
        assert batch.ids[b, :n].tolist() == r.ids and batch.roles[b, :n].tolist() == r.roles
        assert (batch.ids[b, n:] == tok.pad_token_id).all() and (batch.roles[b, n:] == PAD).all()
        for k in range(batch.ids.shape[1]):
            role = batch.roles[b, k].item()
            assert batch.policy_mask[b, k].item() == (role == POLICY)
            assert batch.attention_mask[b, k].item() == (role != PAD)
    # every observation position of every rollout is outside the mask
    obs = [(b, k) for b, r in enumerate(rs) for k, role in enumerate(r.roles) if role == OBS]
    assert len(obs) > 50 and not any(batch.policy_mask[b, k] for b, k in obs)


def test_trailing_text_after_search_is_not_kept(tok, retriever):
    r, = run_scripts(tok, retriever, [["<search> q </search> trailing text", "<answer> a </answer>"]], max_turns=1)
    n_prompt = r.roles.count(PROMPT)
    first_turn = r.ids[n_prompt:r.searches[0]["info_span"][0]]
    assert first_turn == enc(tok, "<search> q </search>")
    trailing = enc(tok, " trailing text")
    assert all(trailing != r.ids[k:k + len(trailing)] for k in range(len(r.ids)))
    assert "trailing" not in tok.decode(r.ids)


def test_invalid_turn_gets_a_corrective_observation(tok, retriever):
    r, = run_scripts(tok, retriever, [["I am not sure.", "Still unsure", "<answer> Paris </answer>"]], max_turns=2)
    p = grpo.prompt_ids(tok, QUESTION["question"])
    inv = enc(tok, grpo.INVALID_ACTION)
    assert r.ids == p + enc(tok, "I am not sure.") + inv + enc(tok, "Still unsure") + inv + enc(tok, "<answer> Paris </answer>")
    assert r.roles == ([PROMPT] * len(p) + [POLICY] * 5 + [OBS] * len(inv) + [POLICY] * len(enc(tok, "Still unsure"))
                       + [OBS] * len(inv) + [POLICY] * 7)
    assert r.invalid_turns == 2 and r.searches == [] and r.answer == "Paris"


def test_after_max_turns_the_last_turn_cannot_search(tok, retriever):
    r, = run_scripts(tok, retriever, [["<search> Berlin </search>", "<search> Tokyo </search>", "<answer> x </answer>"]],
                     max_turns=1)
    assert len(r.searches) == 1 and r.searches[0]["query"] == "Berlin"
    # the second search is sampled (policy tokens, the whole text: </search> does not stop an answer-only turn)
    # but not executed: no information block after it, and the episode is over without an answer
    last = enc(tok, "<search> Tokyo </search>")
    assert r.ids[-len(last):] == last and r.roles[-len(last):] == [POLICY] * len(last)
    assert r.roles.count(OBS) == r.searches[0]["info_span"][1] - r.searches[0]["info_span"][0]
    assert r.answer is None and not r.truncated


def test_answer_in_the_last_turn_after_max_turns(tok, retriever):
    r, = run_scripts(tok, retriever, [["<search> Berlin </search>", "<search> Tokyo </search> <answer> Tokyo </answer>"]],
                     max_turns=1)
    assert len(r.searches) == 1 and r.answer == "Tokyo"


def test_total_token_cap_truncates(tok, retriever):
    p = grpo.prompt_ids(tok, QUESTION["question"])
    turn0 = enc(tok, "<search> Berlin </search>")
    obs0 = enc(tok, grpo.information_block(retriever.search(["Berlin"], 3)[0]))
    cap = len(turn0) + len(obs0) + 3  # three tokens left for the answer turn, which needs 7
    r, = run_scripts(tok, retriever, [["<search> Berlin </search>", "<answer> Berlin </answer>"]],
                     max_turns=2, max_response_tokens=cap)
    assert r.truncated and r.answer is None
    assert len(r.ids) - len(p) == cap                      # the cap is reached exactly
    assert r.ids[-3:] == enc(tok, "<answer> Berlin </answer>")[:3] and r.roles[-3:] == [POLICY] * 3
    # an observation that overflows the cap ends the episode too
    r, = run_scripts(tok, retriever, [["<search> Berlin </search>", "<answer> Berlin </answer>"]],
                     max_turns=2, max_response_tokens=len(turn0) + 5)
    assert r.truncated and r.answer is None and len(r.searches) == 1 and r.roles[-1] == OBS
    # a single turn longer than the whole cap
    r, = run_scripts(tok, retriever, [["<think>" + "word " * 40 + "</think><answer> x </answer>"]],
                     max_turns=2, max_response_tokens=20)
    assert r.truncated and r.answer is None and len(r.ids) - len(p) == 20
    # the per-turn limit alone is not truncation: it is an invalid turn, and the episode goes on
    r, = run_scripts(tok, retriever, [["<think>" + "word " * 40, "<answer> x </answer>"]],
                     max_turns=2, max_turn_tokens=10, max_response_tokens=500)
    assert not r.truncated and r.invalid_turns == 1 and r.answer == "x"


# ----------------------------------------------------------------------------------------------------
# 2. The generation engine (engine.generate_turn) on the tiny model

def greedy_reference(model, seq, n):
    """n greedy tokens by a full forward pass of the whole sequence at every step (no cache, no padding)."""
    seq, out = list(seq), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([seq]), logits_to_keep=1).logits[0, -1].argmax())
            out.append(nxt)
            seq.append(nxt)
    return out


@pytest.fixture(scope="module")
def shaped_tiny(tiny):
    """The tiny model with its layers re-drawn at std 0.3. At the default init (std 0.02, tied embeddings) the
    residual stream is almost the input embedding, so greedy decoding repeats the last prompt token forever
    and would hide a padding or position bug; with larger layer weights attention shapes every token."""
    model, tok = tiny
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.model.layers.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval(), tok


@pytest.fixture(scope="module")
def two_prompts(shaped_tiny):
    model, tok = shaped_tiny
    short = grpo.prompt_ids(tok, "Who?")
    long = grpo.prompt_ids(tok, "Which river flows through the capital of France, and how long is it in kilometres?")
    assert len(long) - len(short) >= 15
    return short, long, greedy_reference(model, short, 12), greedy_reference(model, long, 12)


def test_greedy_turn_equals_step_by_step_argmax(shaped_tiny, two_prompts):
    model, tok = shaped_tiny
    short, long, ref_s, ref_l = two_prompts
    gens, why = engine.generate_turn(model, tok, [short, long], [12, 12], [], set(), 0.0, None)
    assert gens == [ref_s, ref_l] and why == ["length", "length"]
    # the other order (the short prompt now padded in the second row) and each prompt alone give the same
    gens, _ = engine.generate_turn(model, tok, [long, short], [12, 12], [], set(), 0.0, None)
    assert gens == [ref_l, ref_s]
    gens, _ = engine.generate_turn(model, tok, [short], [12], [], set(), 0.0, None)
    assert gens == [ref_s]


def test_max_new_per_row(shaped_tiny, two_prompts):
    model, tok = shaped_tiny
    short, long, ref_s, ref_l = two_prompts
    gens, why = engine.generate_turn(model, tok, [short, long, short], [3, 9, 1], [], set(), 0.0, None)
    assert gens == [ref_s[:3], ref_l[:9], ref_s[:1]] and why == ["length"] * 3



def test_repeated_prompts_share_one_prefill(shaped_tiny, two_prompts):
    # InfoReasoner's K samples of one belief: the rows of a repeated prompt are prefilled once, then each row
    # continues on its own copy of the cache: greedy gives each prompt's own continuation, sampling K different ones
    model, tok = shaped_tiny
    short, long, ref_s, ref_l = two_prompts
    prefill_rows = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kw: prefill_rows.append(kw["input_ids"].shape) if kw["input_ids"].shape[1] > 1 else None,
        with_kwargs=True)
    try:
        gens, _ = engine.generate_turn(model, tok, [short, short, long, short], [12] * 4, [], set(), 0.0, None)
        assert gens == [ref_s, ref_s, ref_l, ref_s]
        assert [rows for rows, _ in prefill_rows] == [2]  # one prefill, of the 2 distinct prompts
        gen = torch.Generator().manual_seed(0)
        gens, _ = engine.generate_turn(model, tok, [long] * 6, [12] * 6, [], set(), 1.0, gen)
        assert [rows for rows, _ in prefill_rows] == [2, 1] and len({tuple(g) for g in gens}) == 6
    finally:
        hook.remove()

def test_kv_cache_writes_in_place_and_gives_the_dynamic_caches_logits(shaped_tiny, two_prompts):
    # the preallocated cache against transformers' own: two left-padded rows, a prefill and 4 decode steps, the
    # second row dropped after step 2 (as when it stops); the same logits, and every step writes into the one buffer
    model, tok = shaped_tiny
    short, long = two_prompts[:2]
    L = len(long)
    ids = torch.tensor([[0] * (L - len(short)) + short, long])
    attn = (torch.arange(L)[None] >= torch.tensor([[L - len(short)], [0]])).long()    # [2, L] left padding
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = {}
    cases = [(f"{name} {prec}", name, prec) for prec in ("fp32", "bf16") for name in ("dynamic", "roomy")]
    for key, name, prec in cases:
        past = engine.kv_cache(model, 5) if name == "roomy" else None
        a, p, steps = attn, pos, []
        with torch.no_grad(), engine.autocast(prec, torch.device("cpu")):
            out = model(input_ids=ids, attention_mask=a, position_ids=p, past_key_values=past, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
            steps.append(out.logits[:, -1])
            if name == "roomy":
                buf = cache.layers[0].k_buf.data_ptr()
            for step in range(4):
                if step == 2:  # the second row leaves the batch
                    cache.batch_select_indices(torch.tensor([0]))
                    a, p, nxt = a[:1], p[:1], nxt[:1]
                    if name == "roomy":
                        buf = cache.layers[0].k_buf.data_ptr()  # selecting rows is the one copy
                a, p = torch.cat([a, torch.ones_like(a[:, :1])], 1), p[:, -1:] + 1
                out = model(input_ids=nxt[:, None], attention_mask=a, position_ids=p, past_key_values=cache,
                            use_cache=True)
                cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
                steps.append(out.logits[:, -1])
                if name == "roomy":
                    assert cache.layers[0].k_buf.data_ptr() == buf and cache.get_seq_length() == L + step + 1
        logits[key] = steps
    assert isinstance(cache.layers[0], engine.RoomyLayer) and cache.layers[0].k_buf.shape[2] == L + 5
    # under bf16 autocast the keys are stored as the attention reads them (it casts them to bf16 itself)
    assert cache.layers[0].k_buf.dtype == cache.layers[0].v_buf.dtype == torch.bfloat16
    for prec in ("fp32", "bf16"):
        for d, r in zip(logits[f"dynamic {prec}"], logits[f"roomy {prec}"]):
            assert torch.equal(d, r)
    # a model that is not a transformers model builds its own cache
    assert engine.kv_cache(torch.nn.Linear(2, 2), 5) is None

# Stop strings across token boundaries, EOS and rows leaving the batch at different steps: tests/test_engine.py,
# on a constructed model whose continuations are known by hand (a random model's need not suit the test).


class Forced(torch.nn.Module):
    """The tiny model, but the i-th call's next token is forced to script[i] (same for every row)."""

    def __init__(self, model, script):
        super().__init__()
        self.inner, self.script, self.calls = model, script, 0
        self.generation_config = model.generation_config

    def forward(self, **kw):
        out = self.inner(**kw)
        forced = torch.full_like(out.logits[:, -1], -1e9)
        forced[:, self.script[self.calls]] = 0.0
        out.logits[:, -1] = forced
        self.calls += 1
        return out


@pytest.mark.parametrize("pieces", [
    [" ok", " </", "search", ">\n\n", " more", " text"],        # the usual tokenization, tag + newlines in one token
    [" ok", "</", "search", ">", " more", " text"],
    [" ok", "</", "se", "arch", ">", "more"],                   # an unusual split
])
def test_stop_string_whatever_its_tokenization(tiny, pieces):
    model, tok = tiny
    script = [i for piece in pieces for i in enc(tok, piece)]
    assert all(len(enc(tok, piece)) == 1 for piece in pieces)  # each piece is one token
    n_stop = pieces.index(">\n\n" if ">\n\n" in pieces else ">") + 1
    gens, why = engine.generate_turn(Forced(model, script), tok, [[1, 2, 3]], [20], ["</search>", "</answer>"],
                                   set(), 0.0, None)
    assert gens == [script[:n_stop]] and why == ["</search>"]


def test_engine_rollouts_equal_scripted_rollouts(tiny, retriever):
    # the real engine (generate_rollouts without turn_fn) forced to write two turns, against the same texts run
    # through scripted_turns: the same ids and roles, position by position, for two prompts of different lengths
    model, tok = tiny
    turns = ["<search> Berlin </search>", "<think>ok</think> <answer> Berlin </answer>"]
    script = enc(tok, turns[0]) + enc(tok, turns[1])
    questions = [QUESTION, {"id": "q1", "question": "Capital of Germany, the country east of France?",
                            "golden_answers": ["Berlin"]}]
    real = grpo.generate_rollouts(Forced(model, script), tok, questions, [0, 1], retriever, max_turns=2,
                                  temperature=0.0)
    scripted = run_scripts(tok, retriever, [turns, turns], questions=questions, groups=[0, 1], max_turns=2)
    for r, s in zip(real, scripted):
        assert r.ids == s.ids and r.roles == s.roles
        assert r.answer == "Berlin" and [x["query_span"] for x in r.searches] == [x["query_span"] for x in s.searches]
    assert len(real[0].ids) != len(real[1].ids)


def test_sampling_is_reproducible_with_a_seeded_generator(shaped_tiny, two_prompts):
    model, tok = shaped_tiny
    short, long, _, _ = two_prompts
    runs = [engine.generate_turn(model, tok, [short, long], [3, 3], [], set(), 1.0, torch.Generator().manual_seed(s))[0]
            for s in (0, 0, 1)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


# ----------------------------------------------------------------------------------------------------
# 3. The loss (METHOD §3.3), against numbers worked out by hand

MASK = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]])             # 5 policy tokens: 3 in row 0, 2 in row 1
ADV = torch.tensor([[5.0, 1.0, 1.0, 1.0], [7.0, -2.0, -2.0, 9.0]])  # non-zero off the mask: must be ignored
LOGP = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.7, -1.5, -2.5, -0.1]])


def test_loss_ratio_one():
    # ratio 1: pg = -A; token-mean = -(1 + 1 + 1 - 2 - 2) / 5; seq-mean = mean(-3/3, 4/2)
    loss, st = grpo.grpo_loss(LOGP, LOGP.clone(), None, ADV, MASK)
    assert loss.item() == pytest.approx(0.2, abs=1e-6)
    assert st == {"kl": 0.0, "clip_frac": 0.0, "dual_clip_frac": 0.0, "n_tokens": 5.0}
    loss, _ = grpo.grpo_loss(LOGP, LOGP.clone(), None, ADV, MASK, agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx(0.5, abs=1e-6)


# ratios per policy token: row 0 (A = +1): 1.5, 0.5, 1.1; row 1 (A = -2): 0.5, 1.5
RATIO = torch.tensor([[1.0, 1.5, 0.5, 1.1], [1.0, 0.5, 1.5, 2.0]])
# pg = -min(r A, clip(r, 0.8, 1.2) A):
#   row 0:  r=1.5 -> -min(1.5, 1.2) = -1.2   r=0.5 -> -min(0.5, 0.8) = -0.5   r=1.1 -> -1.1
#   row 1:  r=0.5 -> -min(-1.0, -1.6) = 1.6  r=1.5 -> -min(-3.0, -2.4) = 3.0


def test_loss_with_clipping():
    logp_old = LOGP - torch.log(RATIO)
    loss, st = grpo.grpo_loss(LOGP, logp_old, None, ADV, MASK)
    assert loss.item() == pytest.approx((-1.2 - 0.5 - 1.1 + 1.6 + 3.0) / 5, abs=1e-5)
    # clip_frac counts the policy tokens on which the clip binds (verl's pg_clipfrac, TRL's clip ratio):
    # r = 1.5 with A > 0 (row 0) and r = 0.5 with A < 0 (row 1). r = 0.5 with A > 0 and r = 1.5 with A < 0
    # are outside [0.8, 1.2] too, but their unclipped term is the one taken (they keep their gradient)
    assert st["clip_frac"] == pytest.approx(2 / 5)
    loss, _ = grpo.grpo_loss(LOGP, logp_old, None, ADV, MASK, agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx(((-1.2 - 0.5 - 1.1) / 3 + (1.6 + 3.0) / 2) / 2, abs=1e-5)
    # a wider clip range: every ratio is inside [0.4, 1.6] -> pg = -r A everywhere
    loss, st = grpo.grpo_loss(LOGP, logp_old, None, ADV, MASK, clip_eps=0.6)
    assert loss.item() == pytest.approx((-1.5 - 0.5 - 1.1 + 1.0 + 3.0) / 5, abs=1e-5)
    assert st["clip_frac"] == 0.0


def test_loss_gradient_where_clipping_binds():
    # d loss / d logp = -r A / n where the unclipped term is the min, 0 where the clipped one is
    logp = LOGP.clone().requires_grad_()
    loss, _ = grpo.grpo_loss(logp, LOGP - torch.log(RATIO), None, ADV, MASK)
    loss.backward()
    expected = torch.tensor([[0.0, 0.0, -0.5 * 1 / 5, -1.1 * 1 / 5], [0.0, 0.0, -1.5 * -2 / 5, 0.0]])
    assert torch.allclose(logp.grad, expected, atol=1e-6)


def test_clip_frac_ignores_tokens_with_zero_advantage():
    # ratio 1.5 everywhere; A = +1, 0, -1 on three tokens: only A > 0 is clipped (verl counts pg2 > pg1)
    logp, mask = torch.zeros(1, 3), torch.ones(1, 3)
    _, st = grpo.grpo_loss(logp, logp - math.log(1.5), None, torch.tensor([[1.0, 0.0, -1.0]]), mask)
    assert st["clip_frac"] == pytest.approx(1 / 3)


# dual clip (verl's clip_ratio_c, c = 3): row 1 (A = -2) has ratios 0.5 and 4.0
DUAL_RATIO = torch.tensor([[1.0, 1.5, 0.5, 1.1], [1.0, 0.5, 4.0, 2.0]])
#   row 1, r = 4.0:  -min(r A, clip(r) A) = -min(-8, -2.4) = 8;  the cap -A c = 6 is lower -> 6 (gradient 0)
#   row 1, r = 0.5:  1.6 as above (below the cap);  row 0 (A > 0): never capped: -1.2, -0.5, -1.1


def test_dual_clip_by_hand():
    logp_old = LOGP - torch.log(DUAL_RATIO)
    off, st_off = grpo.grpo_loss(LOGP, logp_old, None, ADV, MASK)
    assert off.item() == pytest.approx((-1.2 - 0.5 - 1.1 + 1.6 + 8.0) / 5, abs=1e-5)
    assert st_off["dual_clip_frac"] == 0.0
    logp = LOGP.clone().requires_grad_()
    on, st = grpo.grpo_loss(logp, logp_old, None, ADV, MASK, clip_ratio_c=3.0)
    assert on.item() == pytest.approx((-1.2 - 0.5 - 1.1 + 1.6 + 6.0) / 5, abs=1e-5)
    assert st["dual_clip_frac"] == pytest.approx(1 / 5) and st["clip_frac"] == pytest.approx(2 / 5)
    on.backward()
    # d/d logp of -r A is -r A: row 0 r = 0.5 -> -0.5, r = 1.1 -> -1.1; r = 1.5 clipped and r = 4 capped -> 0
    expected = torch.tensor([[0.0, 0.0, -0.5 / 5, -1.1 / 5], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(logp.grad, expected, atol=1e-6)
    # a cap above every token's loss changes nothing
    high, _ = grpo.grpo_loss(LOGP, logp_old, None, ADV, MASK, clip_ratio_c=10.0)
    assert high.item() == pytest.approx(off.item(), abs=1e-6)


def test_dual_clip_leaves_positive_advantages_and_its_boundary_alone():
    # token 0: A = 0.5 > 0, r = 2: never capped, loss -min(2 * 0.5, 1.2 * 0.5) = -0.6 (a cap of -A c = -1.5
    # there would change it). token 1: A = -1 and r exactly c: the loss r equals the cap, and like verl's
    # pg_clipfrac_lower (a strict >) the dual clip is not counted as binding. token 2: A = -1, r = 0.5: 0.8.
    d = torch.tensor([[math.log(2.0), 1.2, math.log(0.5)]])
    c = float(torch.exp(d[0, 1]))                 # the ratio as computed, so that loss and cap are equal floats
    A = torch.tensor([[0.5, -1.0, -1.0]])
    loss, st = grpo.grpo_loss(d, torch.zeros_like(d), None, A, torch.ones_like(d), clip_ratio_c=c)
    assert loss.item() == pytest.approx((-0.6 + c + 0.8) / 3, abs=1e-6)
    assert st["dual_clip_frac"] == 0.0


def test_seq_mean_counts_a_row_without_policy_tokens():
    # row 1 has no policy token: it adds 0 and still counts in the divisor (2 rows), as verl's agg_loss
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 0]])
    loss, st = grpo.grpo_loss(LOGP, LOGP.clone(), None, ADV, mask, agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx((-3 / 3 + 0.0) / 2, abs=1e-6) and st["n_tokens"] == 3.0
    # a row with a single policy token is its own mean: (-A[0, 2] / 1 + 0) / 2 rows
    loss, _ = grpo.grpo_loss(LOGP, LOGP.clone(), None, ADV, torch.tensor([[0, 0, 1, 0], [0, 0, 0, 0]]),
                             agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx(-1.0 / 2, abs=1e-6)


def test_loss_with_kl():
    d = torch.tensor([[3.0, 0.5, -0.5, 0.0], [4.0, 1.0, 0.0, 5.0]])  # d = logp_ref - logp
    k3 = [math.exp(x) - x - 1 for x in (0.5, -0.5, 0.0, 1.0, 0.0)]     # the five policy tokens
    beta = 0.1
    loss, st = grpo.grpo_loss(LOGP, LOGP.clone(), LOGP + d, ADV, MASK, beta_kl=beta)
    assert loss.item() == pytest.approx(0.2 + beta * sum(k3) / 5, abs=1e-6)
    assert st["kl"] == pytest.approx(sum(k3) / 5, abs=1e-6)
    loss, _ = grpo.grpo_loss(LOGP, LOGP.clone(), LOGP + d, ADV, MASK, beta_kl=beta, agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx(0.5 + beta * ((k3[0] + k3[1] + k3[2]) / 3 + (k3[3] + k3[4]) / 2) / 2, abs=1e-6)
    # the KL gradient: d/dlogp [exp(ref - logp) - (ref - logp) - 1] = 1 - exp(d), times beta / n
    logp = LOGP.clone().requires_grad_()
    zero = torch.zeros_like(ADV)
    grpo.grpo_loss(logp, LOGP.clone(), LOGP + d, zero, MASK, beta_kl=beta)[0].backward()
    expected = MASK * (1 - torch.exp(d)) * beta / 5
    assert torch.allclose(logp.grad, expected, atol=1e-6)
    # beta = 0: no KL in the loss or the stats, and no reference needed
    loss, st = grpo.grpo_loss(LOGP, LOGP.clone(), LOGP + d, ADV, MASK, beta_kl=0.0)
    assert loss.item() == pytest.approx(0.2, abs=1e-6) and st["kl"] == 0.0


def test_kl_is_clamped():
    d = torch.tensor([[0.0, 20.0, 0.0, 0.0]])  # exp(20) - 21 is about 4.9e8: clamped to 10
    loss, st = grpo.grpo_loss(torch.zeros(1, 4), torch.zeros(1, 4), d, torch.zeros(1, 4),
                              torch.tensor([[0, 1, 0, 0]]), beta_kl=1.0)
    assert loss.item() == pytest.approx(10.0) and st["kl"] == pytest.approx(10.0)


@pytest.mark.parametrize("agg, norm", [("token-mean", 5), ("seq-mean-token-mean", 2)])
def test_micro_batch_losses_add_up_to_the_batch_loss(agg, norm):
    logp_old = LOGP - torch.log(RATIO)
    ref = LOGP + 0.3
    full, _ = grpo.grpo_loss(LOGP, logp_old, ref, ADV, MASK, beta_kl=0.05, agg=agg)
    parts = [grpo.grpo_loss(LOGP[s], logp_old[s], ref[s], ADV[s], MASK[s], beta_kl=0.05, agg=agg, norm=norm)[0]
             for s in (slice(0, 1), slice(1, 2))]
    assert (parts[0] + parts[1]).item() == pytest.approx(full.item(), abs=1e-6)
    # without norm, each micro-batch would be normalized by its own size: a different (wrong) sum
    alone = [grpo.grpo_loss(LOGP[s], logp_old[s], ref[s], ADV[s], MASK[s], beta_kl=0.05, agg=agg)[0]
             for s in (slice(0, 1), slice(1, 2))]
    assert (alone[0] + alone[1]).item() != pytest.approx(full.item(), abs=1e-3)


def test_unknown_aggregation_is_refused():
    with pytest.raises(ValueError, match="aggregation"):
        grpo.grpo_loss(LOGP, LOGP, None, ADV, MASK, agg="sum")


# ----------------------------------------------------------------------------------------------------
# 4. Group advantages (METHOD §3.1)

def test_group_advantages_by_hand():
    # group 0: R = 1, 0, 0 -> mean 1/3, unbiased std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3)
    # group 1: R = 0.2, 1.4 -> mean 0.8, std sqrt(2 * 0.6^2 / 1) = 0.6 sqrt(2)
    adv = grpo.group_advantages([1.0, 0.0, 0.0, 0.2, 1.4], [0, 0, 0, 1, 1])
    s0, s1 = math.sqrt(1 / 3), 0.6 * math.sqrt(2)
    expected = [(2 / 3) / (s0 + 1e-6), (-1 / 3) / (s0 + 1e-6), (-1 / 3) / (s0 + 1e-6), -0.6 / (s1 + 1e-6), 0.6 / (s1 + 1e-6)]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    # eps is in the denominator: R = 0, 2e-6 -> std = sqrt(2) 1e-6, A = +-1e-6 / (sqrt(2) 1e-6 + 1e-6)
    adv = grpo.group_advantages([0.0, 2e-6], [0, 0])
    assert adv.tolist() == pytest.approx([-1 / (math.sqrt(2) + 1), 1 / (math.sqrt(2) + 1)], rel=1e-3)


def test_all_equal_group_gets_exactly_zero_advantage():
    adv = grpo.group_advantages([0.0, 0.0, 0.0, 0.7, 0.7, 1.0], [0, 0, 0, 1, 1, 2])  # group 2 has one rollout
    assert adv.tolist() == [0.0] * 6 and not torch.isnan(adv).any()
    # six equal float32 rewards whose float32 mean is one ulp off (0.88166535 * 6 / 6 != 0.88166535): computing
    # (R - mean) / (std + eps) anyway would give about 0.056 to each, a gradient from no signal at all
    r = torch.tensor([0.8816653490066528] * 6)
    assert (r - r.mean()).abs().max() > 0  # the premise
    assert grpo.group_advantages(r, [0] * 6).tolist() == [0.0] * 6


def test_groups_never_mix(tok, retriever):
    # the same question in two groups (two different group ids): each group is normalized on its own
    rs = run_scripts(tok, retriever, [["<answer> Paris </answer>"], ["<answer> Lyon </answer>"],
                                      ["<answer> Paris </answer>"], ["<answer> Paris </answer>"]],
                     questions=[QUESTION] * 4, groups=[0, 0, 1, 1])
    R = [rewards.exact_match(r.answer, r.question["golden_answers"]) for r in rs]
    assert R == [1.0, 0.0, 1.0, 1.0] and [r.group for r in rs] == [0, 0, 1, 1]
    adv = grpo.group_advantages(R, [r.group for r in rs])
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert adv.tolist() == pytest.approx([a, -a, 0.0, 0.0], abs=1e-6)   # pooled, all four would be non-zero
    # interleaved group ids are matched by id, not by position
    adv = grpo.group_advantages([1.0, 1.0, 0.0, 1.0], [0, 1, 0, 1])
    assert adv.tolist() == pytest.approx([a, 0.0, -a, 0.0], abs=1e-6)


# ----------------------------------------------------------------------------------------------------
# 5. Per-token advantages (METHOD §3.2)

def test_token_advantages_element_by_element(tok, retriever):
    rs = run_scripts(tok, retriever, [[TURN0, TURN2], ["hmm", "<answer> Lyon </answer>"], ["<answer> Paris </answer>"]],
                     max_turns=2)
    batch = grpo.collate(rs, tok.pad_token_id)
    adv = torch.tensor([0.75, -1.5, 0.0])
    A = grpo.token_advantages(adv, batch.roles)
    assert A.shape == batch.ids.shape
    roles = set()
    for b in range(A.shape[0]):
        for k in range(A.shape[1]):
            role = batch.roles[b, k].item()
            roles.add(role)
            assert A[b, k].item() == (adv[b].item() if role == POLICY else 0.0), (b, k, role)
    assert roles == {PAD, PROMPT, POLICY, OBS}


# ----------------------------------------------------------------------------------------------------
# 6. Gradients on the tiny model (METHOD §3.3, §3.4)

@pytest.fixture
def scripted_batch(tok, retriever):
    """One group of two rollouts with prompt, policy, observation and padding positions."""
    rs = run_scripts(tok, retriever, [[TURN0, TURN2], ["hmm", "<answer> Lyon </answer>"]], max_turns=2)
    return rs, grpo.collate(rs, tok.pad_token_id)


def advantages_of(rewards, batch):
    """A [B, T] of one group with these rewards (METHOD §3.1, §3.2)."""
    return grpo.token_advantages(grpo.group_advantages(rewards, [0] * len(rewards)), batch.roles)


def test_equal_rewards_give_exactly_zero_gradient(tiny, scripted_batch):
    model = copy.deepcopy(tiny[0])
    _, batch = scripted_batch
    _, grads = loss_and_grads(model, batch, advantages_of([1.0, 1.0], batch))
    assert len(grads) > 10
    for name, g in grads.items():
        assert g is not None and torch.count_nonzero(g) == 0, name
    # different rewards: a gradient, and on the layers too, not just the embedding
    _, grads = loss_and_grads(model, batch, advantages_of([1.0, 0.0], batch))
    nonzero = [n for n, g in grads.items() if torch.count_nonzero(g) > 0]
    assert len(nonzero) == len(grads)


def test_equal_rewards_leave_the_weights_unchanged_through_update_policy(tiny, scripted_batch):
    model = copy.deepcopy(tiny[0])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, batch = scripted_batch
    cfg = igsearch.Config(lr=1e-2, beta_kl=0.0, token_budget=1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    A = grpo.token_advantages(grpo.group_advantages([0.0, 0.0], [0, 0]), batch.roles)
    stats = igsearch.update_policy(model, None, opt, batch, A, cfg)
    assert stats["grad_norm"] == 0.0 and stats["loss"] == 0.0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    A = grpo.token_advantages(grpo.group_advantages([1.0, 0.0], [0, 0]), batch.roles)
    stats = igsearch.update_policy(model, None, opt, batch, A, cfg)
    assert stats["grad_norm"] > 0 and not all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batching_does_not_change_the_update(tiny, tok, retriever, agg):
    # three rollouts with different numbers of policy tokens: a micro-batch normalized by its own token count
    # (instead of the batch's) would weigh them differently. Plain SGD, no clipping: the step is -lr * gradient.
    rs = run_scripts(tok, retriever, [[TURN0, TURN2], ["hmm", "<answer> Lyon </answer>"], ["<answer> Paris </answer>"]],
                     max_turns=2)
    batch = grpo.collate(rs, tok.pad_token_id)
    A = grpo.token_advantages(torch.tensor([1.0, -0.4, -0.6]), batch.roles)
    results = []
    longest = int(batch.attention_mask.sum(-1).max())
    for budget in (1, 2 * longest, 10 ** 9):  # a row a micro-batch, two, all three
        model = copy.deepcopy(tiny[0])
        ref = copy.deepcopy(tiny[0])
        with torch.no_grad():
            ref.model.norm.weight.mul_(1.5)  # a reference that differs, so the KL term has a gradient too
        cfg = igsearch.Config(beta_kl=0.1, token_budget=budget, grad_clip=1e9, loss_agg=agg)
        stats = igsearch.update_policy(model, ref, torch.optim.SGD(model.parameters(), lr=1.0), batch, A, cfg)
        results.append((stats, {n: p.detach() for n, p in model.named_parameters()}))
    (s1, w1), *others = results
    assert s1["kl"] > 0 and s1["grad_norm"] > 0
    for s, w in others:
        assert s["loss"] == pytest.approx(s1["loss"], abs=1e-6)
        assert s["kl"] == pytest.approx(s1["kl"], rel=1e-5)
        assert s["grad_norm"] == pytest.approx(s1["grad_norm"], rel=1e-4)
        for n in w1:
            assert torch.allclose(w[n], w1[n], atol=1e-6), n



@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_update_policy_loss_is_the_whole_batch_mean(tiny, tok, retriever, agg):
    # one row a micro-batch; with one epoch the ratio is 1, so the loss is -A averaged the METHOD §3.3 way over the
    # whole batch: over its policy tokens (token-mean), or per row and then over the 3 rows (seq-mean)
    rs = run_scripts(tok, retriever, [[TURN0, TURN2], ["hmm", "<answer> Lyon </answer>"], ["<answer> Paris </answer>"]],
                     max_turns=2)
    batch = grpo.collate(rs, tok.pad_token_id)
    n = batch.policy_mask.sum(-1).tolist()                                     # policy tokens per row
    assert len(set(n)) == 3
    adv = [1.0, -0.4, -0.2]
    A = grpo.token_advantages(torch.tensor(adv), batch.roles)
    cfg = igsearch.Config(beta_kl=0.0, token_budget=1, grad_clip=1e9, loss_agg=agg)
    model = copy.deepcopy(tiny[0])
    stats = igsearch.update_policy(model, None, torch.optim.SGD(model.parameters(), lr=0.0), batch, A, cfg)
    expected = (-sum(a * k for a, k in zip(adv, n)) / sum(n) if agg == "token-mean" else -sum(adv) / 3)
    assert stats["loss"] == pytest.approx(expected, abs=1e-6)

@pytest.mark.parametrize("beta_kl", [0.0, 0.5])
def test_gradient_reaches_only_policy_positions(tiny, scripted_batch, beta_kl):
    model, _ = tiny
    _, batch = scripted_batch
    mask = batch.policy_mask
    with torch.no_grad():
        lp = grpo.token_logprobs(model, batch.ids, batch.attention_mask, mask)
    logp = lp.detach().requires_grad_()  # a leaf: d loss / d logp per position
    # a non-zero advantage and log-prob everywhere, also where the mask is off: the mask alone must cut them
    A = torch.full(lp.shape, 0.7)
    A[1] = -1.3
    logp_ref = lp + 0.2
    loss, _ = grpo.grpo_loss(logp, lp.clone() + 0.01, logp_ref, A, mask, beta_kl=beta_kl)
    loss.backward()
    g = logp.grad
    assert torch.count_nonzero(g[~mask]) == 0
    assert torch.count_nonzero(g[mask]) == int(mask.sum())
    # by hand: ratio = exp(logp - logp_old) = exp(-0.01) is inside the clip range, so d pg / d logp = -ratio A;
    # d k3 / d logp = 1 - exp(d) with d = logp_ref - logp = 0.2; all divided by the n policy tokens
    n = int(mask.sum())
    r = math.exp(-0.01)
    expected = (-r * A + beta_kl * (1 - math.exp(0.2))) / n
    assert torch.allclose(g[mask], expected[mask], atol=1e-6)
    # the batch has prompt, observation and padding positions, and the mask is exactly its policy positions
    assert set(batch.roles[mask].tolist()) == {POLICY}
    assert (batch.roles[~mask] != POLICY).all() and (batch.roles == OBS).any()


# ----------------------------------------------------------------------------------------------------
# 7. token_logprobs equals a plain full forward pass

def test_token_logprobs_matches_a_full_forward(shaped_tiny):
    model, tok = shaped_tiny
    texts = ["The Seine flows through Paris and into the English Channel at Le Havre.",
             "<search> capital of France </search>",
             "Hi",
             "<answer> Paris </answer> is the answer to the question"]
    seqs = [enc(tok, t) for t in texts]
    lens = [len(s) for s in seqs]
    assert len(set(lens)) == 4  # right padding of different amounts
    T = max(lens)
    ids = torch.full((4, T), tok.pad_token_id)
    attn = torch.zeros((4, T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)], attn[b, :len(s)] = torch.tensor(s), 1
    # two masks: every real position after the first; and a sparse pattern (row 2 has no masked position)
    dense = attn.bool().clone()
    dense[:, 0] = False
    sparse = dense & (torch.arange(T) % 3 == 1)
    sparse[2] = False
    with torch.no_grad():
        # log pi(token k | tokens < k) at every position, one unpadded sequence at a time
        full = torch.zeros(ids.shape)
        for b, s in enumerate(seqs):
            seq = torch.tensor(s)
            lsm = model(input_ids=seq[None]).logits[0].float().log_softmax(-1)  # [n, V]
            full[b, 1:len(s)] = lsm[:-1].gather(-1, seq[1:, None]).squeeze(-1)
        for mask in (dense, sparse):
            expected = torch.where(mask, full, torch.zeros(()))
            for budget in (1, 3 * T):  # a row a forward; three rows, then one
                got = grpo.token_logprobs(model, ids, attn, mask, budget)
                assert got.shape == ids.shape
                assert torch.count_nonzero(got[~mask]) == 0
                assert torch.allclose(got, expected, atol=2e-5), (budget, (got - expected).abs().max())
                assert (got[mask] < 0).all()
        # the forward takes right padding as causal attention alone: a left-padded mask is refused, not misread
        with pytest.raises(ValueError, match="right-padded"):
            grpo.token_logprobs(model, ids, attn.flip(-1), dense)


# ----------------------------------------------------------------------------------------------------
# 8. A learning check: the update moves the policy toward reward (a flipped sign would move it away)

def _toy_task(tiny, sign, steps=4, G=8):
    """Prompt "Answer:"; one sampled token; reward 1 when it is the target (the initial most likely token).
    The final norm is scaled so that the random model has a peaked next-token distribution (p(target) 0.36)."""
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    with torch.no_grad():
        model.model.norm.weight.fill_(25.0)
    prompt = enc(tok, "Answer:")

    def p_target():
        with torch.no_grad():
            probs = model(input_ids=torch.tensor([prompt])).logits[0, -1].float().softmax(-1)
        return probs

    probs = p_target()
    target = int(probs.argmax())
    p0 = probs[target].item()
    cfg = igsearch.Config(lr=3e-5, beta_kl=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    hits = []
    for _ in range(steps):
        gens, why = engine.generate_turn(model, tok, [prompt] * G, [1] * G, [], set(), 1.0, gen)
        assert all(len(g) == 1 for g in gens) and why == ["length"] * G
        R = [float(g[0] == target) for g in gens]
        hits.append(int(sum(R)))
        adv = grpo.group_advantages(R, [0] * G)
        batch = grpo.Batch(torch.tensor([prompt + g for g in gens]),
                           torch.tensor([[PROMPT] * len(prompt) + [POLICY]] * G))
        A = sign * grpo.token_advantages(adv, batch.roles)
        igsearch.update_policy(model, None, opt, batch, A, cfg)
    return p0, p_target()[target].item(), hits


def test_policy_learns_the_rewarded_token(tiny):
    p0, p1, hits = _toy_task(tiny, +1)
    assert 0.2 < p0 < 0.5 and 0 < hits[0] < 8    # the reward is informative from the first step
    assert p1 > 2 * p0, (p0, p1, hits)


def test_flipped_advantage_unlearns_it(tiny):
    p0, p1, hits = _toy_task(tiny, -1)
    assert p1 < p0 / 4, (p0, p1, hits)


# ----------------------------------------------------------------------------------------------------
# 9. Seeded runs repeat exactly (igsearch.train on the tiny random model, a hand-made corpus and QA file)

QA = [("What is the capital of France?", "Paris"), ("Which river flows through Paris?", "Seine"),
      ("What is the capital of Germany?", "Berlin"), ("Which river flows through Vienna?", "Danube"),
      ("What is the capital of Japan?", "Tokyo"), ("Where does the Seine flow?", "Paris"),
      ("Which city is the largest of France?", "Paris"), ("Which river flows through Budapest?", "Danube"),
      ("Which country has Berlin as its capital?", "Germany"), ("Which country has Tokyo as its capital?", "Japan")]


@pytest.fixture
def qa_files(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": q, "golden_answers": [a]}) + "\n"
                            for i, (q, a) in enumerate(QA)))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d["id"], "contents": f'"{d["title"]}"\n{d["text"]}'}) + "\n"
                              for d in DOCS))
    return data, corpus


_LOAD_MODEL, _TRAIN_STEP = runs.load_model, igsearch.train_step


def _run(monkeypatch, tmp_path, data, corpus, seed, name, steps=2):
    """One train() call; returns (metrics lines, sampled ids per step, final weights)."""
    models, sampled = [], []
    load_model, train_step = _LOAD_MODEL, _TRAIN_STEP  # the originals, not an earlier run's wrappers

    def capture_model(*a, **kw):
        out = load_model(*a, **kw)
        models.append(out[0])
        return out

    def capture_step(*a, **kw):
        metrics, rollouts, A = train_step(*a, **kw)
        sampled.append([r.ids for r in rollouts])
        return metrics, rollouts, A

    def parity_reward(rollouts):
        # a random model never answers, so EM is always 0 and nothing is learnt; reward the parity of the first
        # sampled token instead, so that the groups have different rewards and the weights do change
        em = [float(r.ids[r.roles.index(POLICY)] % 2) for r in rollouts]
        return em, em

    monkeypatch.setattr(runs, "load_model", capture_model)
    monkeypatch.setattr(igsearch, "train_step", capture_step)
    monkeypatch.setattr(igsearch, "score_outcome", parity_reward)
    cfg = igsearch.Config(model="tiny-random", corpus=f"jsonl:{corpus}", data=str(data), seed=seed,
                          out=str(tmp_path / name), device="cpu", steps=steps, questions_per_step=2, group_size=3,
                          max_turns=1, max_turn_tokens=4, max_response_tokens=40, eval_questions=1, lr=1e-4,
                          save_every=100, show_every=0)
    result = igsearch.train(cfg)
    lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    lines = [{k: v for k, v in line.items() if not k.startswith("time_")} for line in lines]
    weights = {n: p.detach().clone() for n, p in models[0].named_parameters()}
    return result, lines, sampled, weights


def test_seeded_runs_repeat_exactly(monkeypatch, tmp_path, qa_files):
    data, corpus = qa_files
    res_a, lines_a, ids_a, w_a = _run(monkeypatch, tmp_path, data, corpus, 0, "a")
    res_b, lines_b, ids_b, w_b = _run(monkeypatch, tmp_path, data, corpus, 0, "b")
    assert len(lines_a) == 2 and [line["step"] for line in lines_a] == [0, 1]
    assert lines_a == lines_b and ids_a == ids_b
    assert res_a["before"] == res_b["before"] and res_a["after"] == res_b["after"]
    assert w_a.keys() == w_b.keys() and all(torch.equal(w_a[n], w_b[n]) for n in w_a)
    # the run did learn something (otherwise equal weights would prove nothing)
    assert any(line["grad_norm"] > 0 for line in lines_a)
    init = dict(runs.tiny_random_model(0)[0].named_parameters())
    assert not all(torch.equal(w_a[n], init[n]) for n in w_a)
    # another seed samples other rollouts
    _, lines_c, ids_c, _ = _run(monkeypatch, tmp_path, data, corpus, 1, "c", steps=1)
    assert ids_c[0] != ids_a[0] and lines_c[0] != lines_a[0]


# ----------------------------------------------------------------------------------------------------
# 10. The defaults against METHOD (Config, the presets, the formula functions) and the command line

def test_config_defaults_follow_method():
    c = igsearch.Config()
    # §1: k = 3 documents, at most 4 searches; §3: G = 5 at temperature 1.0, ε = 0.2, β_kl = 0.001 (k3),
    # μ = 1, grad clip 1.0, token-mean; §6: lr 1e-6
    assert (c.topk, c.max_turns, c.group_size, c.temperature) == (3, 4, 5, 1.0)
    assert (c.clip_eps, c.beta_kl, c.ppo_epochs, c.grad_clip, c.loss_agg, c.lr) == \
        (0.2, 0.001, 1, 1.0, "token-mean", 1e-6)
    # §4: α = 0.5, δ = 0.05, ρ = 0.5, c = 2, N = 3 from the batch, w = 3 on the first 3 gold tokens
    assert (c.ig_alpha, c.ig_delta, c.ig_rho, c.ig_clip, c.ig_samples, c.ig_baseline) == \
        (0.5, 0.05, 0.5, 2.0, 3, "batch")
    assert (c.ig_head_tokens, c.ig_head_weight) == (3, 3.0)
    # §5: K = 10 at temperature 1.0, at most 32 new tokens, the prob estimator, λ = 0.6, ε = 1e-3, no NLI
    assert (c.ir_samples, c.ir_temperature, c.ir_max_tokens, c.ir_estimator, c.ir_lambda, c.nli_model) == \
        (10, 1.0, 32, "prob", 0.6, "")
    assert rewards.IR_EPS == 1e-3


def test_tiny_preset():
    # §1: max_turns 2 for --tiny; README: 2 questions x G = 4 per step, 4 steps
    cfg, _ = igsearch.parse_args(["--tiny"])
    assert (cfg.max_turns, cfg.questions_per_step, cfg.group_size, cfg.steps, cfg.topk) == (2, 2, 4, 4, 3)
    # everything the preset does not set keeps METHOD's values
    assert (cfg.clip_eps, cfg.beta_kl, cfg.ig_alpha, cfg.ig_samples, cfg.ir_samples, cfg.ir_lambda) == \
        (0.2, 0.001, 0.5, 3, 10, 0.6)
    # a flag still wins over the preset
    assert igsearch.parse_args(["--tiny", "--max-turns", "3"])[0].max_turns == 3


def test_cpu_preset():
    # README, the learning experiment: 10 steps of 4 questions x G = 4, max_turns 2 (§1), top-3 documents
    cfg, _ = igsearch.parse_args(["--preset", "cpu"])
    assert (cfg.max_turns, cfg.questions_per_step, cfg.group_size, cfg.steps, cfg.topk) == (2, 4, 4, 10, 3)
    assert (cfg.clip_eps, cfg.beta_kl, cfg.ig_alpha, cfg.ig_samples, cfg.ir_samples, cfg.ir_lambda) == \
        (0.2, 0.001, 0.5, 3, 10, 0.6)


def test_hotpot_preset_is_the_recorded_experiments_settings():
    # docs/hotpot-cpu holds the HotpotQA experiment's records: every arm must keep running with them, so the
    # preset is read back from a recorded arm's config.json, field by field
    recorded = json.loads((Path(__file__).resolve().parents[1] / "docs/hotpot-cpu/outcome-s0/config.json").read_text())
    cfg, _ = igsearch.parse_args(["--preset", "hotpot"])
    preset = igsearch.PRESETS["hotpot"]
    assert {k: getattr(cfg, k) for k in preset if k != "warmup_steps"} == \
        {k: recorded[k] for k in preset if k != "warmup_steps"}  # an arm starts from the warm-up: 0 steps of its own
    assert (cfg.steps, cfg.questions_per_step, cfg.group_size, cfg.max_turns, cfg.topk, cfg.warmup_steps) == \
        (8, 4, 4, 2, 3, 30)


def defaults(fn, *names):
    """The defaults of the named parameters (a parameter added later does not break the check)."""
    params = inspect.signature(fn).parameters
    return {k: params[k].default for k in names}


def test_formula_function_defaults_follow_method():
    assert defaults(grpo.group_advantages, "eps") == {"eps": 1e-6}                                   # §3.1
    assert defaults(grpo.grpo_loss, "clip_eps", "beta_kl", "agg") == {"clip_eps": 0.2, "beta_kl": 0.0,
                                                                       "agg": "token-mean"}        # §3.3
    assert defaults(grpo.ig_gate, "delta", "rho", "clip") == {"delta": 0.05, "rho": 0.5, "clip": 2.0}  # §4.3
    assert defaults(grpo.add_query_bonus, "alpha", "delta", "rho", "clip") == \
        {"alpha": 0.5, "delta": 0.05, "rho": 0.5, "clip": 2.0}
    assert defaults(rewards.head_weights, "head_tokens", "head_weight") == {"head_tokens": 3, "head_weight": 3.0}
    assert defaults(rewards.gold_scorer, "head_tokens", "head_weight") == \
        {"head_tokens": 3, "head_weight": 3.0}                                                       # §4.1
    assert defaults(rewards.igsearch_information_gain, "n_samples", "baseline", "max_context") == \
        {"n_samples": 3, "baseline": "batch", "max_context": 2048}                                   # §4.2
    assert defaults(rewards.information_gain, "estimator", "eps") == {"estimator": "prob", "eps": 1e-3}  # §5.3
    assert defaults(rewards.smoothed_p_gold, "eps") == {"eps": 1e-3}


@pytest.mark.parametrize("args, words", [
    (["--reward", "bogus"], "--reward"),
    (["--group-size", "1"], "--group-size"),
    (["--loss-agg", "sum"], "--loss-agg"),
])
def test_cli_refuses_bad_settings(capsys, args, words):
    assert igsearch.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err


def test_cli_missing_data_file(capsys, tmp_path, qa_files):
    _, corpus = qa_files
    missing = tmp_path / "nowhere" / "qa.jsonl"
    assert igsearch.main(["--model", "tiny-random", "--corpus", f"jsonl:{corpus}", "--data", str(missing),
                          "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(missing) in err


def test_cli_tiny_random_runs_offline(capsys, monkeypatch, tmp_path, qa_files):
    data, corpus = qa_files
    attempts = []

    def no_network(*a, **kw):
        attempts.append(a)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: no_network(*a))
    monkeypatch.setattr(runs, "hub_reachable", lambda *a, **kw: attempts.append("hub_reachable") or False)
    out = tmp_path / "run"
    rc = igsearch.main(["--model", "tiny-random", "--corpus", f"jsonl:{corpus}", "--data", str(data),
                        "--steps", "1", "--questions-per-step", "1", "--group-size", "2", "--max-turns", "1",
                        "--max-turn-tokens", "4", "--max-response-tokens", "32", "--eval-questions", "1", "--show-every", "0",
                        "--device", "cpu", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert attempts == []
    assert "SMOKE RUN" in captured.out
    assert json.loads((out / "config.json").read_text())["model"] == "tiny-random"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_boolean_settings_are_switches():
    assert igsearch.parse_args([])[0].stopwords is False
    assert igsearch.parse_args(["--tiny"])[0].stopwords is False
    cfg, _ = igsearch.parse_args(["--tiny", "--stopwords"])
    assert cfg.stopwords is True and cfg.steps == igsearch.PRESETS["tiny"]["steps"]
