"""METHOD §3.3 in the training loop: PPO epochs μ > 1 against stored old log-probs, gradient clipping, the
statistics of an update, and the reference model: a frozen copy of the initial policy, which InfoReasoner's
beliefs are sampled from (§5.1).

The updates are checked against PPO written out in this file on a plain forward pass of the model (no
padding, the full logits), with plain SGD so that a step is exactly -lr · (clipped) gradient."""
import copy
import json
import math
import random

import pytest
import torch

import engine
import grpo
import igsearch
import retrieve
import rewards
import runs
from grpo import OBS, PAD, POLICY, PROMPT


def small_lm(seed=0):
    """A 1-layer Qwen3 with a 32-token vocabulary: the real architecture, fast."""
    from transformers import AutoModelForCausalLM, Qwen3Config
    config = Qwen3Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


ROLES = [[PROMPT] * 3 + [POLICY] * 2 + [OBS] * 2 + [POLICY] * 3,
         [PROMPT] * 2 + [POLICY] * 4 + [PAD] * 4,
         [PROMPT] * 4 + [POLICY, POLICY, OBS, POLICY] + [PAD] * 2]


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    roles = torch.tensor(ROLES)
    ids = torch.randint(1, 32, roles.shape, generator=g).masked_fill(roles == PAD, 0)
    A = torch.randn(roles.shape, generator=g) * 2     # off the policy positions too: the mask must cut them
    return grpo.Batch(ids, roles), A


def logprobs_by_hand(model, batch):
    """log π(ids[b, k] | ids[b, <k]) at the policy positions, 0 elsewhere: one unpadded row at a time. [B, T]"""
    rows = []
    for b in range(batch.ids.shape[0]):
        n = int((batch.roles[b] != PAD).sum())
        lsm = model(input_ids=batch.ids[b:b + 1, :n]).logits[0].float().log_softmax(-1)
        rows.append(torch.stack([lsm[k - 1, batch.ids[b, k]] if k and k < n and batch.roles[b, k] == POLICY
                                 else torch.zeros(()) for k in range(batch.ids.shape[1])]))
    return torch.stack(rows)


def ppo_by_hand(model, ref, batch, A, epochs, lr, eps=0.2, beta=0.0, max_norm=1e9):
    """METHOD §3.3 written out: μ epochs, each one full-batch SGD step on
    loss = Σ_mask [-min(r A, clip(r, 1-ε, 1+ε) A) + β k3] / Σ mask,  r = exp(logp - logp_old), k3 in [-10, 10],
    logp_old stored before the first epoch; the gradient scaled by min(1, max_norm / (‖g‖ + 1e-6)).
    Returns the per-epoch (loss, kl, clip fraction, gradient norm before clipping)."""
    mask = (batch.roles == POLICY).float()
    n = mask.sum()
    with torch.no_grad():
        old = logprobs_by_hand(model, batch)
        lp_ref = logprobs_by_hand(ref, batch) if beta else None
    stats = []
    for _ in range(epochs):
        model.zero_grad(set_to_none=True)
        new = logprobs_by_hand(model, batch)
        r = torch.exp(new - old)
        pg = -torch.minimum(r * A, r.clamp(1 - eps, 1 + eps) * A)
        kl = (torch.exp(lp_ref - new) - (lp_ref - new) - 1).clamp(-10, 10) if beta else torch.zeros_like(new)
        loss = ((pg + beta * kl) * mask).sum() / n
        loss.backward()
        norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))
        scale = min(1.0, max_norm / (norm + 1e-6))
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= lr * scale * p.grad
        binds = ((A > 0) & (r > 1 + eps)) | ((A < 0) & (r < 1 - eps))   # where the clip binds (verl, TRL)
        clipped = ((binds.float()) * mask).sum() / n
        stats.append((loss.item(), float((kl.detach() * mask).sum() / n), float(clipped), norm))
    model.zero_grad(set_to_none=True)
    return stats


def run_update_policy(model, ref, batch, A, lr, **cfg):
    cfg = igsearch.Config(**{**dict(token_budget=20, grad_clip=1e9), **cfg})  # rows of 10, 6, 8 tokens: 2 + 1
    return igsearch.update_policy(model, ref, torch.optim.SGD(model.parameters(), lr=lr), batch, A, cfg)


def same_weights(a, b, atol):
    return all(torch.allclose(p, q, atol=atol) for p, q in zip(a.parameters(), b.parameters()))


def test_ppo_epochs_use_the_stored_old_logprobs(batch):
    batch, A = batch
    lr = 1.0
    model, by_hand = small_lm(), small_lm()
    ref = small_lm(seed=5)
    got = run_update_policy(model, ref, batch, A, lr, ppo_epochs=2, beta_kl=0.1)
    stats = ppo_by_hand(by_hand, ref, batch, A, epochs=2, lr=lr, beta=0.1)
    # the second epoch sees a ratio other than 1: some tokens leave [0.8, 1.2] (none can in the first)
    assert stats[0][2] == 0.0 and stats[1][2] > 0.2
    assert same_weights(model, by_hand, atol=1e-5)
    # the statistics are the means over the μ epochs
    mean = [sum(s[i] for s in stats) / 2 for i in range(4)]
    assert got["loss"] == pytest.approx(mean[0], abs=1e-5)
    assert got["kl"] == pytest.approx(mean[1], rel=1e-4)
    assert got["clip_frac"] == pytest.approx(mean[2], abs=1e-6)
    assert got["grad_norm"] == pytest.approx(mean[3], rel=1e-4)
    # one epoch is not two
    one = small_lm()
    run_update_policy(one, ref, batch, A, lr, ppo_epochs=1, beta_kl=0.1)
    assert not same_weights(one, model, atol=1e-3)


def test_gradient_clipping_scales_the_step(batch):
    batch, A = batch
    free, clipped, by_hand = small_lm(), small_lm(), small_lm()
    unclipped = run_update_policy(free, None, batch, A, 1.0, beta_kl=0.0)
    norm = unclipped["grad_norm"]
    assert norm > 0.1
    got = run_update_policy(clipped, None, batch, A, 1.0, beta_kl=0.0, grad_clip=norm / 10)
    stats = ppo_by_hand(by_hand, None, batch, A, epochs=1, lr=1.0, max_norm=norm / 10)
    assert got["grad_norm"] == pytest.approx(stats[0][3], rel=1e-4)     # reported before clipping
    assert same_weights(clipped, by_hand, atol=1e-6)
    # the clipped step is a tenth of the free one
    start = small_lm()
    for p0, pf, pc in zip(start.parameters(), free.parameters(), clipped.parameters()):
        assert torch.allclose(pc - p0, (pf - p0) / 10, atol=1e-6)
    # the default clip is 1.0 (METHOD §3.3)
    default = small_lm()
    igsearch.update_policy(default, None, torch.optim.SGD(default.parameters(), lr=1.0), batch, A,
                           igsearch.Config(beta_kl=0.0, token_budget=20))
    for p0, pf, pd in zip(start.parameters(), free.parameters(), default.parameters()):
        assert torch.allclose(pd - p0, (pf - p0) * min(1.0, 1.0 / (norm + 1e-6)), atol=1e-6)


def test_a_batch_with_one_policy_token(batch):
    # the normalizations divide by the batch's policy tokens: here 1 (and 2 sequences, one with none)
    batch, A = batch
    roles = batch.roles.clone()[:2]
    roles[roles == POLICY] = OBS
    roles[0, 4] = POLICY
    one = grpo.Batch(batch.ids[:2], roles)
    model, by_hand = small_lm(), small_lm()
    got = run_update_policy(model, small_lm(seed=5), one, A[:2], 1.0, beta_kl=0.1, token_budget=1)
    stats = ppo_by_hand(by_hand, small_lm(seed=5), one, A[:2], epochs=1, lr=1.0, beta=0.1)
    assert same_weights(model, by_hand, atol=1e-6)
    assert got["loss"] == pytest.approx(stats[0][0], abs=1e-6) and got["kl"] == pytest.approx(stats[0][1], rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# The reference model

DOCS = [{"id": f"d{i}", "title": f"Town{i}", "text": f"Town{i} lies on river R{i}."} for i in range(4)]
QA = [{"id": f"q{i}", "question": f"Which river runs through Town{i}?", "golden_answers": [f"R{i}"]} for i in range(10)]


@pytest.fixture
def files(tmp_path):
    data, corpus = tmp_path / "qa.jsonl", tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QA))
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    return data, corpus


@pytest.mark.parametrize("reward, beta_kl, has_ref", [
    ("outcome", 0.001, True), ("igsearch", 0.001, True),
    ("inforeasoner", 0.0, True),      # InfoReasoner samples its beliefs from the reference, KL or not (§5.1)
    ("outcome", 0.0, False), ("igsearch", 0.0, False),     # β_kl = 0 loads no reference model (§3.3)
])
def test_train_builds_the_reference_as_a_frozen_copy_of_the_initial_policy(tmp_path, files, monkeypatch, reward,
                                                                           beta_kl, has_ref):
    data, corpus = files
    seen = []

    def step(model, ref_model, opt, tok, retriever, questions, cfg, generator, rng, rollouts=None, dp=None):
        seen.append((model, ref_model))
        with torch.no_grad():                       # the policy moves at every step
            for p in model.parameters():
                p.add_(0.01)
        return {"loss": 0.0}, [], None
    monkeypatch.setattr(igsearch, "train_step", step)
    cfg = igsearch.Config(model="tiny-random", corpus=f"jsonl:{corpus}", data=str(data), out=str(tmp_path / "run"),
                          device="cpu", steps=2, questions_per_step=1, group_size=2, eval_questions=0,
                          save_every=100, show_every=0, reward=reward, beta_kl=beta_kl)
    igsearch.train(cfg)
    assert len(seen) == 2
    (model, ref), (model2, ref2) = seen
    assert model2 is model and ref2 is ref
    if not has_ref:
        assert ref is None
        return
    assert ref is not model and not ref.training
    assert all(not p.requires_grad for p in ref.parameters())
    initial = dict(runs.tiny_random_model(0)[0].named_parameters())
    assert all(torch.equal(p, initial[n]) for n, p in ref.named_parameters())           # the initial weights
    assert not any(torch.equal(p, initial[n]) for n, p in model.named_parameters())     # while the policy moved
    assert {p.data_ptr() for p in ref.parameters()}.isdisjoint(p.data_ptr() for p in model.parameters())


@pytest.mark.parametrize("belief_kind", ["agent", "plain"])
def test_inforeasoner_beliefs_come_from_the_reference_not_the_policy(monkeypatch, belief_kind):
    model, tok = runs.tiny_random_model(0)
    policy, ref = model, copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        ref.model.norm.weight.mul_(3.0)             # a reference that differs from the policy
    used = []
    real_logprobs = rewards.sample_logprobs

    def fake_turn(model_, tok_, seqs, *a):
        used.append(model_)
        return [tok.encode("Paris\n", add_special_tokens=False) for _ in seqs], ["\n"] * len(seqs)

    def spy_logprobs(model_, *a, **kw):
        used.append(model_)
        return real_logprobs(model_, *a, **kw)
    monkeypatch.setattr(engine, "generate_turn", fake_turn)
    monkeypatch.setattr(rewards, "sample_logprobs", spy_logprobs)
    q = {"question": "What is the capital of France?", "golden_answers": ["Paris"]}
    p = grpo.prompt_ids(tok, q["question"])
    r = grpo.Rollout(question=q, group=0, ids=list(p), roles=[PROMPT] * len(p))
    s = grpo._append(r, tok.encode("<search> France </search>", add_special_tokens=False), POLICY)
    info = grpo._append(r, tok.encode(grpo.information_block(DOCS[:1]), add_special_tokens=False), OBS)
    r.searches.append({"query": "France", "docs": DOCS[:1], "query_span": s, "info_span": info})
    rollouts = [r, copy.deepcopy(r)]
    cfg = igsearch.Config(reward="inforeasoner", ir_samples=2, ir_max_tokens=4, beta_kl=0.0, lr=0.0,
                          ir_belief=belief_kind)
    igsearch.train_step(policy, ref, torch.optim.SGD(policy.parameters(), lr=0.0), tok, None, None, cfg,
                        torch.Generator().manual_seed(0), random.Random(0), rollouts=rollouts)
    assert len(used) == 4 and all(m is ref for m in used)     # 2 sampling phases, each sampled and scored


def test_evaluate_keeps_every_question_and_reports_hotpotqa_types_apart(tiny, monkeypatch):
    # scripted greedy rollouts on three HotpotQA-like questions: the summary's per-question values are the
    # records docs/ keeps (answer, EM, F1, answered, searches, type), and bridge and comparison are summarized apart
    model, tok = tiny
    qs = [{"id": "b1", "question": "Where is Town0?", "golden_answers": ["River R0"], "type": "bridge", "hops": 2},
          {"id": "b2", "question": "Where is Town1?", "golden_answers": ["R1"], "type": "bridge", "hops": 2},
          {"id": "c1", "question": "Is Town2 older than Town3?", "golden_answers": ["yes"], "type": "comparison",
           "hops": 2}]
    scripts = [["<search> Town0 </search>", "<answer> river R0 </answer>"], ["<answer> R1 lies </answer>"],
               ["<search> Town2 </search>", "<search> Town3 </search>", "I do not know"]]
    original = grpo.generate_rollouts
    monkeypatch.setattr(grpo, "generate_rollouts", lambda m, t, questions, groups, r, **kw: original(
        m, t, questions, groups, r, **{**kw, "turn_fn": grpo.scripted_turns(t, scripts)}))
    cfg = igsearch.Config(max_turns=2, topk=1, max_turn_tokens=32, max_response_tokens=256)
    summary, _ = igsearch.evaluate(model, tok, retrieve.Retriever(DOCS), qs, cfg)
    each = summary["each"]
    assert each["id"] == ["b1", "b2", "c1"] and each["type"] == ["bridge", "bridge", "comparison"]
    assert each["answer"] == ["river R0", "R1 lies", None] and each["em"] == [1.0, 0.0, 0.0]
    assert each["f1"] == [1.0, pytest.approx(2 / 3), 0.0]     # "r1 lies" vs "r1": precision 1/2, recall 1
    assert each["answered"] == [1.0, 1.0, 0.0] and each["searches"] == [1, 0, 2] and each["hops"] == [2, 2, 2]
    assert set(summary["by_type"]) == {"bridge", "comparison"} and "by_hops" not in summary  # one hop count
    assert summary["by_type"]["bridge"]["n"] == 2 and summary["by_type"]["bridge"]["em"] == 0.5
    assert summary["by_type"]["comparison"]["n"] == 1 and summary["by_type"]["comparison"]["searches"] == 2.0
