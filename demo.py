"""The credit-assignment demo (python igsearch.py --demo): when every rollout of a group fails, outcome-only
GRPO has nothing to learn from, while IG-Search still rewards the query that found the answer (METHOD §4.3).

It runs on the CPU in seconds: a toy policy over two queries, the real bookkeeping, BM25 and A [B, T].
"""
import random

import torch

import grpo
import retrieve
import rewards
from runs import qwen_tokenizer
from views import save_view

DEMO_DOCS = [
    {"id": "d0", "title": "Marie Curie", "text": "Marie Curie discovered polonium and radium with Pierre Curie."},
    {"id": "d1", "title": "Famous scientists", "text": "Famous scientists include Newton, Darwin and Einstein."},
    {"id": "d2", "title": "Isaac Newton", "text": "Isaac Newton was one of the famous scientists of England."},
    {"id": "d3", "title": "Charles Darwin", "text": "Charles Darwin was a famous naturalist and scientist."},
]
DEMO_QUERIES = ["who discovered polonium", "famous scientists"]  # the first retrieves the answer's document


def credit_assignment_demo(reward="igsearch", steps=30, group_size=8, lr=10.0, seed=0, tok=None, cache_dir=None,
                           view_dir=None):
    """Every rollout answers wrong (EM = 0 for all), so outcome-only GRPO has Â = 0 and nothing to learn from.
    A toy policy picks one of two queries: π(query) = softmax(θ), θ = [0, 0]. The rollouts run through the
    real bookkeeping, BM25, IG (METHOD §4.2) and A [B, T] (§4.3); the scorer rates the gold answer -3 unless
    the gold document is in the context (then 0). Returns P(good query) after each step.

    The query's log-prob sits on the first token of its span; every other policy token has a constant
    log-prob, so the gradient reaches θ only through the query span, as in the real loss."""
    tok = tok or qwen_tokenizer()
    retriever = retrieve.Retriever(DEMO_DOCS, cache_dir=cache_dir)
    question = {"id": "demo", "question": "Who discovered polonium?", "golden_answers": ["Marie Curie"]}
    scorer = lambda prefix: lambda suffixes, golds: torch.tensor(
        [0.0 if DEMO_DOCS[0]["text"] in tok.decode(prefix + s) else -3.0 for s in suffixes])

    theta = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=lr)
    gen, rng, curve = torch.Generator().manual_seed(seed), random.Random(seed), []
    for _ in range(steps):
        actions = torch.multinomial(torch.softmax(theta.detach(), -1), group_size, replacement=True, generator=gen)
        scripts = [[f"<search> {DEMO_QUERIES[a]} </search>", "<answer> Pierre Curie </answer>"] for a in actions.tolist()]
        rollouts = grpo.generate_rollouts(None, tok, [question] * group_size, [0] * group_size, retriever,
                                          max_turns=1, turn_fn=grpo.scripted_turns(tok, scripts))
        em = [rewards.exact_match(r.answer, r.question["golden_answers"]) for r in rollouts]  # all 0
        adv = grpo.group_advantages(em, [0] * group_size)                          # all 0
        batch = grpo.collate(rollouts, tok.pad_token_id)
        A = grpo.token_advantages(adv, batch.roles)                                # [B, T], all 0
        if reward == "igsearch":
            # N, α, δ, ρ, c and ε: the functions' defaults (= Config's); baseline blocks from the corpus,
            # since a batch of one question has no other question's blocks to draw (METHOD §4.2)
            ig, _ = rewards.igsearch_information_gain(scorer, tok, rollouts, retriever, baseline="corpus", rng=rng)
            A = grpo.add_query_bonus(A, rollouts, ig)
            for r, gains in zip(rollouts, ig):
                for s, g in zip(r.searches, gains):
                    s["ig"] = g
        if view_dir is not None and not curve:  # the first step's group, as in training's views/
            save_view(view_dir, 0, rollouts, A, tok)
        logp_action = torch.log_softmax(theta, -1)[actions]                       # [B]
        first = torch.zeros(batch.ids.shape, dtype=torch.bool)
        for b, r in enumerate(rollouts):
            first[b, r.searches[0]["query_span"][0]] = True
        logp = torch.zeros(batch.ids.shape).masked_scatter(first, logp_action)   # [B, T]
        loss, _ = grpo.grpo_loss(logp, logp.detach(), None, A, batch.policy_mask, beta_kl=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(float(torch.softmax(theta.detach(), -1)[0]))
    return curve


def demo():
    tok = qwen_tokenizer()
    ig = credit_assignment_demo("igsearch", tok=tok, view_dir="runs/demo")
    out = credit_assignment_demo("outcome", tok=tok)
    print("Credit assignment when every rollout fails (EM = 0 for all): P(the query that finds the answer)")
    print(f"{'step':>4}  {'igsearch':>8}  {'outcome':>8}")
    for k, (a, b) in enumerate(zip(ig, out), 1):
        print(f"{k:>4}  {a:8.3f}  {b:8.3f}")
    print("The first IG-Search group, coloured by A [B, T]: runs/demo/views/step_0.html "
          "(or: python igsearch.py show --run runs/demo --step 0)")

