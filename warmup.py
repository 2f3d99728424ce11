"""Format warm-up (METHOD §6, our addition to the papers): a short supervised cold start before GRPO.

The IG papers start RL from 3B-7B models that already follow the tag format. A 135M chat model does not: it
never writes <search> or <answer>, so every reward is 0, every group's advantage is 0 and nothing learns.
R1-style pipelines call the cure a cold start. Here it is a few steps of next-token loss on the policy
tokens of oracle trajectories, built through the real agent loop (grpo.generate_rollouts with
grpo.scripted_turns), so that their ids, roles and observations are exactly those RL later trains on:

    <think> ... </think> <search> query </search>   [the real BM25 block]   <think> ... </think> <answer> gold </answer>

It teaches the format, not the task. Only train questions are used. The written queries vary in quality so
that RL still has query quality to learn (METHOD §6):
    - half search with the question as asked, half with a weaker query: a few of its words;
    - a first search whose documents miss the answer is followed by a second, with the question;
    - a bridge question (two supporting articles) searches for its bridge article too.

    rollouts = warmup_rollouts(tok, retriever, train_questions, rng, ...)   # scripted, real observations
    losses = warmup(model, tok, retriever, train_questions, cfg, rng)       # grpo.warmup_loss, AdamW
    start, evals = warm_start(cfg, out, retriever, splits, dev, device, evaluate)  # once per run directory
"""
import random
import re

import torch

import engine
import grpo
import lora
import ranks
import rewards
import runs
from retrieve import DataError

THINK_FIRST = "<think> I need to look this up. </think>\n"
THINK_AGAIN = "<think> The documents do not say it yet. </think>\n"
THINK_BRIDGE = "<think> I also need to know about {}. </think>\n"
THINK_ANSWER = "<think> The documents give the answer. </think>\n"
QUERY_WORDS = 24        # a query longer than this many words is cut: a turn has a token budget (presets: 128)


def words(text):
    return re.findall(r"\w+(?:['-]\w+)*", text)


def strong_query(question):
    """The question as asked, as one line of at most QUERY_WORDS words.

    >>> strong_query('What is X, described as "French city", in: "X is on the Seine."?')
    'What is X described as French city in X is on the Seine'
    """
    return " ".join(words(question)[:QUERY_WORDS])


def weak_query(question, rng, n=(2, 4)):
    """A vaguer query: a window of 2-4 consecutive words of the question, which may miss the answer.

    >>> import random; weak_query("Who painted the Mona Lisa in Florence", random.Random(0))
    'Mona Lisa in'
    """
    w = words(question)
    k = min(rng.randint(*n), len(w))
    start = rng.randrange(len(w) - k + 1)
    return " ".join(w[start:start + k])


def mentions_answer(docs, golds):
    """Does a gold alias appear, as whole normalized words, in the title or text of a document?"""
    texts = [" " + rewards.normalize_answer(d["title"] + " " + d["text"]) + " " for d in docs]
    norm = [rewards.normalize_answer(g) for g in golds]
    return any(g and f" {g} " in t for g in norm for t in texts)


def oracle_script(question, retriever, rng, topk=3, max_turns=2, weak_frac=0.5):
    """The turn texts of one oracle trajectory for `question` (a QA dict), for grpo.scripted_turns.

    Retrieval is run here on the same retriever the agent loop will call, so the script knows what each
    search returns (BM25 is deterministic): a first search that misses the answer is followed by a second.
    At most max_turns searches, then the answer turn.

    METHOD §6, per data set. HotpotQA: the second search names a supporting paragraph (its title) that the
    first search did not retrieve, and there is none when both came back. The tiny set: a 2-hop question
    looks up its bridge article, and a first search that missed the answer is followed by the question."""
    golds = question["golden_answers"]
    first = weak_query(question["question"], rng) if rng.random() < weak_frac else strong_query(question["question"])
    turns = [f"{THINK_FIRST}<search> {first} </search>"]
    docs = retriever.search([first], topk)[0]
    if question.get("dataset") == "hotpotqa":
        seen = {d["title"] for d in docs}
        missed = [t for t in question.get("supporting_titles", []) if t not in seen]
        if len(turns) < max_turns and missed:
            turns.append(f"{THINK_BRIDGE.format(missed[0])}<search> {missed[0]} </search>")
        turns.append(f"{THINK_ANSWER}<answer> {golds[0].strip()} </answer>")
        return turns
    found = mentions_answer(docs, golds)
    norm_golds = {rewards.normalize_answer(g) for g in golds}
    bridges = [t for t in question.get("supporting_titles", []) if rewards.normalize_answer(t) not in norm_golds]
    if len(turns) < max_turns and bridges:                      # two hops: look up the bridge article too
        turns.append(f"{THINK_BRIDGE.format(bridges[0])}<search> {bridges[0]} </search>")
    if len(turns) < max_turns and not found and first != strong_query(question["question"]):
        turns.append(f"{THINK_AGAIN}<search> {strong_query(question['question'])} </search>")
    turns.append(f"{THINK_ANSWER}<answer> {golds[0].strip()} </answer>")
    return turns


def warmup_rollouts(tok, retriever, questions, rng, *, max_turns=2, topk=3, max_turn_tokens=128,
                    max_response_tokens=1024, weak_frac=0.5):
    """Oracle trajectories of `questions` through the real agent loop; the ones cut by a token budget (no
    answer) are dropped, since they would teach the model to stop mid-way."""
    scripts = [oracle_script(q, retriever, rng, topk, max_turns, weak_frac) for q in questions]
    rollouts = grpo.generate_rollouts(None, tok, questions, list(range(len(questions))), retriever,
                                      max_turns=max_turns, topk=topk, max_turn_tokens=max_turn_tokens,
                                      max_response_tokens=max_response_tokens,
                                      turn_fn=grpo.scripted_turns(tok, scripts))
    return [r for r in rollouts if r.answer is not None and not r.invalid_turns]


def warmup(model, tok, retriever, questions, cfg, rng, log=print):
    """cfg.warmup_steps AdamW steps of grpo.warmup_loss (METHOD §6) on cfg.warmup_batch oracle trajectories
    each, drawn from `questions` (the train split). Returns the loss of each step."""
    device = next(model.parameters()).device
    opt = engine.adamw(model.parameters(), cfg.warmup_lr)
    losses = []
    for step in range(cfg.warmup_steps):
        qs = rng.sample(questions, min(cfg.warmup_batch, len(questions)))
        rollouts = warmup_rollouts(tok, retriever, qs, rng, max_turns=cfg.max_turns, topk=cfg.topk,
                                   max_turn_tokens=cfg.max_turn_tokens,
                                   max_response_tokens=cfg.max_response_tokens)
        if not rollouts:
            continue
        batch = grpo.collate(rollouts, tok.pad_token_id)
        ids, attn, mask = batch.ids.to(device), batch.attention_mask.to(device), batch.policy_mask.to(device)
        norm = mask.sum().clamp(min=1)                  # the whole batch's policy tokens: micro-batches add up
        micro = engine.token_chunks(attn.sum(-1).tolist(), cfg.token_budget)  # micro-batches within the budget
        forward = lambda sl: grpo.token_logprobs(model, ids[sl], attn[sl], mask[sl])  # [b, T]
        loss_of = lambda logp, sl: (grpo.warmup_loss(logp, mask[sl], norm), None)     # METHOD §6
        parts = ranks.accumulate_gradients(model, micro, forward, loss_of, cfg)
        total = sum(loss for loss, _ in parts)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(total)
        log(f"warm-up step {step + 1}/{cfg.warmup_steps}: loss {total:.4f} over {int(norm)} policy tokens "
            f"of {len(rollouts)} trajectories, {sum(len(r.searches) for r in rollouts) / len(rollouts):.2f} searches each")
    opt.zero_grad(set_to_none=True)  # the last step's gradients (the model's size again) are not kept past the warm-up
    return losses


def warm_start(cfg, out, retriever, splits, dev, device, evaluate, eval_before=True):
    """METHOD §6, once per run directory: evaluate the model as loaded ("before"), warm it up for
    cfg.warmup_steps steps on oracle trajectories of the train split (never dev or test), save it with
    save_pretrained to OUT/warmup/model and evaluate it again ("warm-up"). OUT/warmup/done.json is written as
    soon as the model is saved, and again with the evaluation: a run cut during that evaluation keeps its
    warm-up. eval_before=False skips the first evaluation (compare: a model that does not follow the format
    rambles to every token limit, and the warm-up's own row says where RL starts).
    Returns (the model directory, {"before", "warm-up", "smoke"}); "before" is {} when skipped. Under torchrun
    the warm-up runs on rank 0 (the others wait, then take its weights); the evaluations are shared."""
    wdir = out / "warmup"
    done = wdir / "done.json"
    model = None
    if not ranks.from_main(done.is_file):  # every rank takes rank 0's view of the files it writes
        model, tok, smoke = runs.load_model(cfg.model, device, cfg.seed)
        before = evaluate(model, tok, retriever, dev, cfg)[0] if dev and eval_before else {}
        lora.adapt_run(model, cfg, device)
        print(f"format warm-up: {cfg.warmup_steps} steps of {cfg.warmup_batch} oracle trajectories (METHOD §6)")
        losses = ranks.on_main(warmup, model, tok, retriever, splits["train"], cfg, random.Random(cfg.seed))
        lora.merge(model)  # METHOD §3.5: GRPO's adapters start on the warmed-up base, its reference
        runs.release_memory()  # the warm-up's AdamW state is freed: hand its pages back before evaluating
        ranks.broadcast_weights(model)
        ranks.on_main(runs.save_model, model, tok, wdir / "model")
        ranks.on_main(runs.write_json, done, {"before": before, "warm-up": None, "losses": losses, "smoke": smoke,
                                              "from": cfg.model})
    info = ranks.from_main(runs.read_json, done, "the warm-up's summary")
    wrong = runs.warmup_problem(info)
    if wrong:
        raise DataError(f"{done}: {wrong}, not the summary this program writes; delete {wdir} to warm up again")
    if info.get("from") != cfg.model:  # a warm-up of another model must not start this run
        raise DataError(f"{done}: that warm-up started from {info.get('from')!r}, not from --model {cfg.model}; "
                        f"use another --out, or delete {wdir} to warm up again")
    if info["warm-up"] is None:  # saved, not yet evaluated
        if model is None:
            model, tok, _ = runs.load_model(str(wdir / "model"), device, cfg.seed)
        info["warm-up"] = evaluate(model, tok, retriever, dev, cfg)[0] if dev else {}
        ranks.on_main(runs.write_json, done, info)
    return str(wdir / "model"), {k: info[k] for k in ("before", "warm-up", "smoke")}
