"""The step benchmark's rollout regimes: searches forced on a sampling model must go through the real
bookkeeping like any search (the bench's ratios are only as good as the rollouts they time)."""
import dataclasses
import sys

import torch

import engine
import grpo
import igsearch
import runs
from conftest import ROOT
from retrieve import Retriever

sys.path.insert(0, str(ROOT / "bench"))
import bench_step  # noqa: E402
import roofline  # noqa: E402

DOCS = [{"id": f"d{i}", "title": f"Doc{i}", "text": f"Doc{i} is about topic number {i} and more."} for i in range(8)]
Q = {"id": "q", "question": "What is topic number 3 about?", "golden_answers": ["more"]}


def test_forced_search_turns_search_in_every_turn_but_the_last(tmp_path):
    model, tok = runs.tiny_random_model(seed=0)
    retriever = Retriever(DOCS, cache_dir=tmp_path)
    cfg = dataclasses.replace(igsearch.Config(), max_turns=2, topk=1, max_turn_tokens=12, max_response_tokens=400)
    gen = torch.Generator().manual_seed(0)
    rs = grpo.generate_rollouts(model, tok, [Q] * 3, [0, 0, 0], retriever,
                                **igsearch.rollout_kwargs(cfg, 1.0, gen),
                                turn_fn=bench_step.forced_search_turns(model, tok, cfg, gen))
    for r in rs:
        assert len(r.searches) == 2  # random weights never close the tag: the turn budget does, twice
        for s in r.searches:
            q = tok.decode(r.ids[slice(*s["query_span"])])
            assert q.startswith("<search>") and q.endswith(" </search>")
            assert s["query"] == q[len("<search>"):-len("</search>")].strip()
            assert set(r.roles[slice(*s["query_span"])]) == {grpo.POLICY}  # the opener counts as the policy's
            assert r.ids[slice(*s["info_span"])] == tok.encode(grpo.information_block(s["docs"]),
                                                               add_special_tokens=False)
        # the last turn is the model's alone: no opener
        last = max(k for k, role in enumerate(r.roles) if role != grpo.POLICY) + 1
        assert not tok.decode(r.ids[last:]).startswith("<search>")
    assert bench_step.tokens_past_stop(rs, tok) == 0


def test_roofline_counts_the_decoders_matmul_parameters_and_the_positions_it_computes():
    # P: q, k, v, o and the MLP's gate, up, down in every layer, from the config's sizes; not the head (apart)
    model, tok = runs.tiny_random_model(seed=0)
    c = model.config
    H, I, L, d = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.head_dim
    attn = H * c.num_attention_heads * d * 2 + H * c.num_key_value_heads * d * 2  # q, o; k, v
    assert roofline.body_params(model) == L * (attn + 3 * H * I)
    # positions: real tokens where a mask says which (3 + 5 here), every position of a batch without one
    positions = roofline.Positions(model)
    ids = torch.tensor([[0, 0, 11, 12, 13], [11, 12, 13, 14, 15]])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=(ids != 0).long())
        model(input_ids=ids)
    assert (positions.n, positions.grad) == (8 + 10, 0)
    # a forward that records a graph counts for its backward too; checkpointing's recomputed layers do not
    layer_calls = []
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(lambda *a: layer_calls.append(1))  # inside it
    with engine.recompute(model, True):
        model(input_ids=ids, attention_mask=(ids != 0).long()).logits.sum().backward()
    hook.remove()
    assert len(layer_calls) == 2 and (positions.n, positions.grad) == (26, 8)  # the layer ran twice, counted once
    # the head: every state of a plain forward (10 a batch, padding too), the last one with a graph
    assert (positions.head_n, positions.head_grad) == (30, 10)
    VH = model.get_output_embeddings().weight.numel()
    assert VH == c.vocab_size * H
    assert positions.flops(1000) == 2 * 1000 * 26 + 4 * 1000 * 8 + 2 * VH * 30 + 4 * VH * 10
    # with 50 adapter parameters the frozen base and head need no weight gradients: 2 backward, not 4; the
    # adapters cost 2 a position forward and 4 more back-propagated
    assert positions.flops(1000, adapters=50) == (2 * 1050 * 26 + 2 * 1000 * 8 + 4 * 50 * 8
                                                  + 2 * VH * 30 + 2 * VH * 10)
    # our log-prob forward projects only the 2 + 3 states whose next token is read; its head chunk runs again in
    # the backward (engine.HeadLogprobs), and that recomputation is not counted
    right = torch.tensor([[11, 12, 13, 0, 0], [11, 12, 13, 14, 15]])
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 1, 0]]).bool()
    head_calls = []
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda *a: head_calls.append(a[1][0].shape[0]))
    grpo.token_logprobs(model, right, (right != 0).long(), mask).sum().backward()
    hook.remove()
    assert head_calls == [5, 5] and (positions.head_n, positions.head_grad) == (35, 15)
    positions.remove()


# ----------------------------------------------------------------------------------------------------
# bench_versions: before/after on the same inputs

import bench_versions  # noqa: E402
import pytest  # noqa: E402


def test_versions_scripted_rollouts_give_every_group_a_reward_spread(tmp_path):
    tok = runs.qwen_tokenizer()
    retriever = Retriever(DOCS, cache_dir=tmp_path)
    cfg = dataclasses.replace(igsearch.Config(), group_size=4, max_turns=2, topk=1, max_turn_tokens=64,
                              max_response_tokens=400)
    q2 = {"id": "q2", "question": "What is Doc5?", "golden_answers": ["topic 5"]}
    rs = bench_versions.scripted_rollouts(grpo, tok, retriever, [Q, q2], cfg)
    assert [r.group for r in rs] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [r.answer for r in rs] == ["more", "unknown"] * 2 + ["topic 5", "unknown"] * 2
    assert [igsearch.score_outcome(rs)[0][k] for k in range(8)] == [1.0, 0.0] * 4
    assert all(len(r.searches) == 1 and r.searches[0]["query"] == r.question["question"] for r in rs)


def test_versions_agree_within_the_stated_tolerances():
    a = {"loss": 1.0, "grad_norm": 2.0}
    assert bench_versions.agree(a, {"loss": 1.04, "grad_norm": 2.09}) == "yes"    # 0.04 nats, 4.5%
    assert bench_versions.agree(a, {"loss": 1.06, "grad_norm": 2.0}) == "no"      # the loss is 0.06 off
    assert bench_versions.agree(a, {"loss": 1.0, "grad_norm": 2.11}) == "no"      # the gradient norm 5.5%
    assert bench_versions.agree({"loss": 3.0}, {"loss": 3.01}) == "yes"           # warm-up: a loss alone
    assert bench_versions.agree({"loss": None}, {"loss": 3.0}) is None


def test_versions_unpack_writes_a_commits_tree_and_names_a_bad_one(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tree = bench_versions.unpack("HEAD", tmp_path)
    assert (tree / "igsearch.py").read_text().startswith('"""')
    with pytest.raises(SystemExit, match=r"git archive no-such-rev failed: .* \(give a commit"):
        bench_versions.unpack("no-such-rev", tmp_path)


def test_versions_table_compares_numbers_only_where_the_inputs_are_the_same():
    a = {"seconds": 60.0, "tokens": "612 policy tokens of 4", "loss": 2.0, "peak_rss_gb": 6.0}
    same = dict(a, seconds=20.0, loss=2.01, peak_rss_gb=3.0)
    other = dict(same, tokens="640 policy tokens of 4")
    rows = bench_versions.table([("warmup", a, same), ("warmup", a, other), ("step-sampled", a, same)]).splitlines()
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]
    agree = rows[0].strip("|").split("|").index(" agree ")
    assert [c[3] for c in cells] == ["3.00×"] * 3                # before s / after s
    assert [c[agree] for c in cells] == ["yes", "—", "—"]        # other inputs, or sampled: nothing to compare


def test_versions_bound_table_puts_each_sides_work_at_its_precisions_matmul_rate():
    # before: 600 GFLOP in fp32 at 100 GFLOP/s: 6 s least, in 12 s (50%); after: 400 GFLOP in bf16 at 200: 2 s
    # least, in 4 s (50%); no change that keeps the after side's work can make before faster than 12 / 2 = 6x
    a = {"seconds": 12.0, "flops": 600e9, "bf16": False}
    b = {"seconds": 4.0, "flops": 400e9, "bf16": True}
    rows = bench_versions.bound_table([("step-scripted", a, b), ("warmup", {"error": "exit 1"}, b)],
                                      {False: 100e9, True: 200e9}).splitlines()
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]
    assert cells == [["step-scripted", "before", "fp32", "600", "6.0", "50%", "—"],
                     ["step-scripted", "after", "bf16", "400", "2.0", "50%", "6.00×"]]  # the failed phase: no rows
