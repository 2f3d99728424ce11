"""The format warm-up (METHOD §6): the loss by hand on a scripted trajectory, the oracle scripts, and that no
dev or test question reaches it. Expectations come from a plain forward pass and written-out sums."""
import dataclasses
import json
import random
import weakref

import pytest
import torch

import engine
import grpo
import igsearch
import retrieve
import runs
import warmup
from grpo import OBS, POLICY, PROMPT

DOCS = [
    {"id": "d0", "title": "Paris", "text": "Paris is the capital and largest city of France."},
    {"id": "d1", "title": "Seine", "text": "The Seine is the river that flows through Paris."},
    {"id": "d2", "title": "Berlin", "text": "Berlin is the capital of Germany."},
    {"id": "d3", "title": "Danube", "text": "The Danube flows through Vienna and Budapest."},
    {"id": "d4", "title": "France", "text": "France is a country in Western Europe."},
]
QUESTION = {"id": "q0", "question": "What is the capital of France?", "golden_answers": ["Paris"]}


# bit-level comparisons below: one thread, one summation order, for the module fixtures (the tiny model) too
pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture
def retriever(tmp_path):
    return retrieve.Retriever(DOCS, cache_dir=tmp_path)


def scripted(tok, retriever, scripts, questions=None):
    questions = questions or [QUESTION] * len(scripts)
    return grpo.generate_rollouts(None, tok, questions, list(range(len(scripts))), retriever, max_turns=2, topk=2,
                                  turn_fn=grpo.scripted_turns(tok, scripts))


def test_warmup_loss_by_hand_on_a_table():
    logp = torch.tensor([[-0.5, -1.0, -2.0, -3.0],
                         [-9.0, -4.0, -0.25, 0.0]])
    mask = torch.tensor([[False, True, False, True],
                         [False, True, True, False]])
    # policy positions: -1, -3, -4, -0.25 -> -(−8.25) / 4; the -0.5, -2, -9 elsewhere never count
    assert grpo.warmup_loss(logp, mask).item() == pytest.approx(8.25 / 4)
    # micro-batches with the batch's divisor add up to the batch loss
    parts = [grpo.warmup_loss(logp[i:i + 1], mask[i:i + 1], norm=mask.sum()) for i in range(2)]
    assert float(sum(parts)) == pytest.approx(8.25 / 4)
    assert grpo.warmup_loss(logp, torch.zeros_like(mask)).item() == 0.0  # no policy token: 0, not NaN


def test_warmup_loss_on_a_scripted_trajectory_counts_policy_tokens_only(tiny, retriever):
    model, tok = tiny
    r, = scripted(tok, retriever, [["<think> look </think>\n<search> capital of France </search>",
                                    "<answer> Paris </answer>"]])
    assert r.roles.count(OBS) > 20 and r.roles.count(POLICY) > 5    # a real observation between two turns
    batch = grpo.collate([r], tok.pad_token_id)
    mask = batch.policy_mask
    with torch.no_grad():
        lsm = model(input_ids=torch.tensor([r.ids])).logits[0].float().log_softmax(-1)   # [T, V], one plain pass
    # written-out sum over the positions whose token the policy wrote
    terms = [float(lsm[k - 1, r.ids[k]]) for k in range(1, len(r.ids)) if r.roles[k] == POLICY]
    expected = -sum(terms) / len(terms)
    with torch.no_grad():
        logp = grpo.token_logprobs(model, batch.ids, batch.attention_mask, mask)
        got = grpo.warmup_loss(logp, mask).item()
    assert got == pytest.approx(expected, abs=1e-5)
    # the same sum over observation or prompt positions is a different number: they are left out, not diluted
    obs = [float(lsm[k - 1, r.ids[k]]) for k in range(1, len(r.ids)) if r.roles[k] in (OBS, PROMPT)]
    assert abs(-(sum(terms) + sum(obs)) / (len(terms) + len(obs)) - expected) > 1e-3


def test_warmup_gradient_is_minus_one_over_P_at_policy_positions_and_zero_elsewhere(tiny, retriever):
    _, tok = tiny
    r, = scripted(tok, retriever, [["<search> capital of France </search>", "<answer> Paris </answer>"]])
    batch = grpo.collate([r, r], tok.pad_token_id)
    batch.roles[1, -3:] = grpo.PAD                                   # a shorter second row: padding too
    logp = torch.randn(batch.ids.shape).requires_grad_(True)         # any values: the loss is linear in them
    grpo.warmup_loss(logp, batch.policy_mask).backward()
    n_policy = int((batch.roles == POLICY).sum())
    for b in range(2):
        for k in range(batch.ids.shape[1]):
            expected = -1.0 / n_policy if batch.roles[b, k] == POLICY else 0.0
            assert float(logp.grad[b, k]) == pytest.approx(expected, abs=1e-9), (b, k, int(batch.roles[b, k]))


def test_micro_batches_add_up_to_the_whole_batchs_gradient_from_zero(tiny, retriever):
    # the warm-up's (and the update's) accumulation loop: two micro-batches of one row each, each loss normalized
    # by the whole batch's policy tokens, give the gradient of one backward over the whole batch; a gradient left
    # from before is dropped, not added to
    import copy
    from types import SimpleNamespace
    import ranks
    model, tok = tiny
    model = copy.deepcopy(model)
    rs = scripted(tok, retriever, [["<search> capital of France </search>", "<answer> Paris </answer>"],
                                   ["<answer> Lyon </answer>"]])
    batch = grpo.collate(rs, tok.pad_token_id)
    ids, attn, mask = batch.ids, batch.attention_mask, batch.policy_mask
    norm = mask.sum()
    whole = copy.deepcopy(model)
    grpo.warmup_loss(grpo.token_logprobs(whole, ids, attn, mask), mask).backward()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)                              # a stale gradient
    cfg = SimpleNamespace(precision="fp32", grad_checkpointing=False)
    parts = ranks.accumulate_gradients(model, [slice(0, 1), slice(1, 2)],
                                       lambda sl: grpo.token_logprobs(model, ids[sl], attn[sl], mask[sl]),
                                       lambda logp, sl: (grpo.warmup_loss(logp, mask[sl], norm), None), cfg)
    assert len(parts) == 2 and all(v > 0 for v, _ in parts)
    for (name, a), b in zip(whole.named_parameters(), model.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_oracle_scripts_strong_weak_and_bridge(retriever):
    strong = warmup.oracle_script(QUESTION, retriever, random.Random(0), topk=2, max_turns=2, weak_frac=0.0)
    assert strong == [f"{warmup.THINK_FIRST}<search> What is the capital of France </search>",
                      f"{warmup.THINK_ANSWER}<answer> Paris </answer>"]
    # a weak query that misses the answer's document is followed by a search with the question
    rng = random.Random(0)
    for _ in range(30):
        turns = warmup.oracle_script(QUESTION, retriever, rng, topk=1, max_turns=2, weak_frac=1.0)
        query = turns[0].split("<search>")[1].split("</search>")[0].strip()
        assert 2 <= len(query.split()) <= 4 and query in "What is the capital of France"
        hit = retriever.search([query], 1)[0]
        if "Paris" in hit[0]["title"] + hit[0]["text"]:
            assert len(turns) == 2
        else:
            assert turns[1] == f"{warmup.THINK_AGAIN}<search> What is the capital of France </search>"
    # two supporting articles: the one that is not the answer is searched for by its title
    bridge = {**QUESTION, "supporting_titles": ["Seine", "Paris"]}
    turns = warmup.oracle_script(bridge, retriever, random.Random(0), topk=2, max_turns=2, weak_frac=0.0)
    assert turns[1] == warmup.THINK_BRIDGE.format("Seine") + "<search> Seine </search>"
    assert turns[-1].endswith("<answer> Paris </answer>") and len(turns) == 3
    # max_turns bounds the searches
    turns = warmup.oracle_script(bridge, retriever, random.Random(0), topk=2, max_turns=1, weak_frac=0.0)
    assert len(turns) == 2


def test_hotpotqa_oracle_searches_the_supporting_paragraph_the_first_search_missed(retriever):
    # METHOD §6: the question is asked first; the second search names the supporting title it did not bring back
    hq = {**QUESTION, "dataset": "hotpotqa", "type": "bridge", "supporting_titles": ["Paris", "Seine"]}
    first = retriever.search(["What is the capital of France"], 1)[0]
    assert [d["title"] for d in first] == ["Paris"]                       # top-1: Paris, not Seine
    turns = warmup.oracle_script(hq, retriever, random.Random(0), topk=1, max_turns=2, weak_frac=0.0)
    assert turns == [f"{warmup.THINK_FIRST}<search> What is the capital of France </search>",
                     warmup.THINK_BRIDGE.format("Seine") + "<search> Seine </search>",
                     f"{warmup.THINK_ANSWER}<answer> Paris </answer>"]
    # a supporting title that is the answer is still searched for when it was missed (unlike the tiny set)
    hq2 = {**hq, "supporting_titles": ["Seine", "Paris"], "question": "Which river flows through Paris?",
           "golden_answers": ["Seine"]}
    assert [d["title"] for d in retriever.search(["Which river flows through Paris"], 1)[0]] == ["Seine"]
    turns = warmup.oracle_script(hq2, retriever, random.Random(0), topk=1, max_turns=2, weak_frac=0.0)
    assert turns[1] == warmup.THINK_BRIDGE.format("Paris") + "<search> Paris </search>"
    # both supporting paragraphs in the first search's documents: no second search
    turns = warmup.oracle_script(hq, retriever, random.Random(0), topk=5, max_turns=2, weak_frac=0.0)
    assert len(turns) == 2 and turns[1] == f"{warmup.THINK_ANSWER}<answer> Paris </answer>"
    # one search allowed: the answer follows the first
    assert len(warmup.oracle_script(hq, retriever, random.Random(0), topk=1, max_turns=1, weak_frac=0.0)) == 2


def test_hotpotqa_oracle_on_the_real_file(tmp_path):
    # on HotpotQA's own paragraphs, a second search happens exactly when the first missed a supporting
    # paragraph, and then it retrieves that paragraph (its title is the query); only train questions are used
    from conftest import shared_file
    spec = f"hotpotqa:{shared_file('hotpotqa_dev_distractor_886.jsonl')}"
    docs = retrieve.load_corpus(spec)
    r = retrieve.Retriever(docs, cache_dir=tmp_path)
    train = retrieve.load_data(spec)["train"][:40]
    rng, seconds, found = random.Random(0), 0, 0
    for q in train:
        turns = warmup.oracle_script(q, r, rng, topk=3, max_turns=2)
        query = turns[0].split("<search>")[1].split("</search>")[0].strip()
        missed = [t for t in q["supporting_titles"] if t not in {d["title"] for d in r.search([query], 3)[0]}]
        assert len(turns) == (3 if missed else 2)
        if missed:
            seconds += 1
            assert turns[1].endswith(f"<search> {missed[0]} </search>")
            found += missed[0] in [d["title"] for d in r.search([missed[0]], 3)[0]]
        assert turns[-1].endswith(f"<answer> {q['golden_answers'][0].strip()} </answer>")
    assert 0 < seconds < len(train)          # most need the second search, some do not
    # BM25 ranks a title's own paragraph in the top 3 for most (a longer namesake can outrank it)
    assert found >= 0.8 * seconds


def test_oracle_rollouts_go_through_the_agent_loop(tiny, retriever):
    _, tok = tiny
    bridge = {**QUESTION, "supporting_titles": ["Seine", "Paris"]}
    rs = warmup.warmup_rollouts(tok, retriever, [QUESTION, bridge], random.Random(0), max_turns=2, topk=2,
                                max_turn_tokens=64, max_response_tokens=400)
    assert [len(r.searches) for r in rs] == [1, 2] and [r.answer for r in rs] == ["Paris", "Paris"]
    assert rs[1].searches[1]["query"] == "Seine" and rs[1].searches[1]["docs"][0]["title"] == "Seine"
    # the observation is the real retrieved block, as ids with the OBS role
    s, e = rs[0].searches[0]["info_span"]
    assert tok.decode(rs[0].ids[s:e]) == grpo.information_block(rs[0].searches[0]["docs"])
    assert set(rs[0].roles[s:e]) == {OBS}
    # a trajectory cut by the token budget has no answer and is dropped
    assert warmup.warmup_rollouts(tok, retriever, [bridge], random.Random(0), max_turns=2, topk=2,
                                  max_turn_tokens=64, max_response_tokens=60) == []


# ----------------------------------------------------------------------------------------------------
# The warm-up inside a run: train split only, saved with save_pretrained, RL starts from it

QA = [(f"Which document number {i} names the capital of France?", "Paris") for i in range(20)]


@pytest.fixture
def qa_files(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": q, "golden_answers": [a]}) + "\n"
                            for i, (q, a) in enumerate(QA)))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d["id"], "contents": f'"{d["title"]}"\n{d["text"]}'}) + "\n"
                              for d in DOCS))
    return data, corpus


def test_no_dev_or_test_question_reaches_the_warmup(monkeypatch, tmp_path, qa_files):
    data, corpus = qa_files
    seen = []
    real = warmup.warmup_rollouts

    def recording(tok, retriever, questions, rng, **kw):
        seen.extend(q["id"] for q in questions)
        return real(tok, retriever, questions, rng, **kw)

    monkeypatch.setattr(warmup, "warmup_rollouts", recording)
    cfg = igsearch.Config(model="tiny-random", corpus=f"jsonl:{corpus}", data=str(data), out=str(tmp_path / "run"),
                          device="cpu", steps=1, questions_per_step=1, group_size=2, max_turns=1, max_turn_tokens=48,
                          max_response_tokens=200, eval_questions=2, show_every=0, warmup_steps=3, warmup_batch=8)
    result = igsearch.train(cfg)
    splits = retrieve.load_data(cfg.data, cfg.split)
    train_ids = {q["id"] for q in splits["train"]}
    held_out = {q["id"] for s in ("dev", "test") for q in splits[s]}
    assert len(seen) == 3 * 8 and set(seen) <= train_ids and not set(seen) & held_out and held_out
    # the warmed-up model was saved as a loadable model directory, and the run reports the three evaluations
    assert (tmp_path / "run" / "warmup" / "model" / "config.json").is_file()
    assert {"before", "warm-up", "after"} <= set(result)
    done = json.loads((tmp_path / "run" / "warmup" / "done.json").read_text())
    assert len(done["losses"]) == 3 and all(x > 0 for x in done["losses"])


def test_rl_starts_from_the_warmed_model_and_a_resume_skips_the_warmup(monkeypatch, tmp_path, qa_files):
    data, corpus = qa_files
    loaded, calls, no_grads, warm_models, warm_alive = [], [], [], [], []
    real_load, real_warmup = runs.load_model, warmup.warmup

    def spy_load(name, *a, **kw):
        loaded.append(name)
        warm_alive.append(any(r() is not None for r in warm_models))
        return real_load(name, *a, **kw)

    def spy_warmup(model, *a, **kw):
        calls.append(1)
        losses = real_warmup(model, *a, **kw)
        no_grads.append(all(p.grad is None for p in model.parameters()))
        warm_models.append(weakref.ref(model))
        return losses

    monkeypatch.setattr(runs, "load_model", spy_load)
    monkeypatch.setattr(warmup, "warmup", spy_warmup)
    cfg = igsearch.Config(model="tiny-random", corpus=f"jsonl:{corpus}", data=str(data), out=str(tmp_path / "run"),
                          device="cpu", steps=1, questions_per_step=1, group_size=2, max_turns=1, max_turn_tokens=48,
                          max_response_tokens=200, eval_questions=1, show_every=0, warmup_steps=1, warmup_batch=2)
    igsearch.train(cfg)
    warm = str(tmp_path / "run" / "warmup" / "model")
    assert loaded == ["tiny-random", warm] and calls == [1]
    # memory: the warm-up keeps no gradients, and its model is freed before RL loads the saved one
    assert no_grads == [True] and warm_alive == [False, False]
    # the RL start (and so the reference) holds the warmed weights, not the initial ones
    init = runs.tiny_random_model(0)[0].state_dict()
    warmed = real_load(warm, torch.device("cpu"))[0].state_dict()
    assert any(not torch.equal(init[k], warmed[k]) for k in init if k in warmed)
    igsearch.train(dataclasses.replace(cfg, steps=2), resume=True)
    assert loaded[2:] == [warm] and calls == [1]


def test_the_last_evaluation_holds_no_optimizer_and_no_reference(monkeypatch, tmp_path, qa_files):
    # memory: AdamW's two moments and the frozen reference are freed before the evaluation after GRPO
    data, corpus = qa_files
    held, alive = [], []
    real_adamw, real_copy, real_eval = engine.adamw, engine.frozen_copy, igsearch.evaluate

    def keep(x):
        held.append(weakref.ref(x))
        return x

    def spy_eval(*a, **kw):
        alive.append([r() is not None for r in held])
        return real_eval(*a, **kw)

    monkeypatch.setattr(engine, "adamw", lambda *a, **kw: keep(real_adamw(*a, **kw)))
    monkeypatch.setattr(engine, "frozen_copy", lambda *a, **kw: keep(real_copy(*a, **kw)))
    monkeypatch.setattr(igsearch, "evaluate", spy_eval)
    cfg = igsearch.Config(model="tiny-random", corpus=f"jsonl:{corpus}", data=str(data), out=str(tmp_path / "run"),
                          device="cpu", steps=1, questions_per_step=1, group_size=2, max_turns=1, max_turn_tokens=16,
                          max_response_tokens=200, eval_questions=1, show_every=0, beta_kl=0.001)
    igsearch.train(cfg)
    assert alive == [[True, True], [False, False]]  # before GRPO: the reference and AdamW; after: neither


def test_freed_memory_is_handed_back_between_the_phases(monkeypatch, tmp_path, qa_files):
    # the warm-up's AdamW state before the warmed-up model's evaluation, the warm-up's model before RL loads its
    # own, the last phase's freed tensors as sampling, scoring and the update each start, the GRPO optimizer and
    # reference before the last evaluation
    data, corpus = qa_files
    events, autocast = [], []
    real_eval, real_warmup, real_release = igsearch.evaluate, warmup.warmup, runs.release_memory

    def log(name, f):  # and whether a bf16 context is open around the call, once it has returned
        return lambda *a, **kw: (events.append(name), f(*a, **kw), events.append(f"{name} done"),
                                 autocast.append(torch.is_autocast_enabled("cpu")))[1]

    monkeypatch.setattr(igsearch, "evaluate", lambda *a, **kw: (events.append("eval"), real_eval(*a, **kw))[1])
    monkeypatch.setattr(warmup, "warmup", lambda *a, **kw: (events.append("warm-up"), real_warmup(*a, **kw))[1])
    real_generate, sampling = grpo.generate_rollouts, []

    def generate(*a, **kw):  # bf16 while the GRPO step samples
        if "sample_rollouts" in events and "sample_rollouts done" not in events:
            sampling.append(torch.is_autocast_enabled("cpu"))
        return real_generate(*a, **kw)

    monkeypatch.setattr(grpo, "generate_rollouts", generate)
    for name in ("sample_rollouts", "step_rewards", "update_policy"):
        monkeypatch.setattr(igsearch, name, log(name, getattr(igsearch, name)))
    monkeypatch.setattr(runs, "release_memory", lambda: (events.append("release"), real_release()))
    cfg = igsearch.Config(model="tiny-random", corpus=f"jsonl:{corpus}", data=str(data), out=str(tmp_path / "run"),
                          device="cpu", steps=1, questions_per_step=1, group_size=2, max_turns=1, max_turn_tokens=16,
                          max_response_tokens=200, eval_questions=1, show_every=0, warmup_steps=1, warmup_batch=2,
                          precision="bf16")
    igsearch.train(cfg)
    assert events == ["eval", "warm-up", "release", "eval", "release",
                      "sample_rollouts", "release", "sample_rollouts done", "step_rewards", "release",
                      "step_rewards done", "update_policy", "release", "update_policy done", "release", "eval"]
    # sampling ran in bf16 and its context, which caches a bf16 copy of every weight, ended when it returned;
    # scoring has a context of its own (open when step_rewards returns), the update too (closed)
    assert sampling == [True] and autocast == [False, True, False]


def test_a_run_cut_while_evaluating_the_warmup_keeps_it(monkeypatch, tmp_path, qa_files):
    data, corpus = qa_files
    calls, evals = [], []
    real_warmup, real_eval = warmup.warmup, igsearch.evaluate
    monkeypatch.setattr(warmup, "warmup", lambda *a, **kw: calls.append(1) or real_warmup(*a, **kw))

    def cut_second(*a, **kw):  # the evaluations run: before, warm-up (cut here), then again on resume
        evals.append(1)
        if len(evals) == 2:
            raise KeyboardInterrupt
        return real_eval(*a, **kw)

    monkeypatch.setattr(igsearch, "evaluate", cut_second)
    cfg = igsearch.Config(model="tiny-random", corpus=f"jsonl:{corpus}", data=str(data), out=str(tmp_path / "run"),
                          device="cpu", steps=1, questions_per_step=1, group_size=2, max_turns=1, max_turn_tokens=48,
                          max_response_tokens=200, eval_questions=1, show_every=0, warmup_steps=1, warmup_batch=2)
    with pytest.raises(KeyboardInterrupt):
        igsearch.train(cfg)
    done = tmp_path / "run" / "warmup" / "done.json"
    saved = json.loads(done.read_text())
    assert saved["warm-up"] is None and len(saved["losses"]) == 1 and calls == [1]
    result = igsearch.train(cfg, resume=True)
    saved = json.loads(done.read_text())
    assert calls == [1], "the saved warm-up was trained again"
    assert saved["warm-up"] == result["warm-up"] and saved["warm-up"]["n"] == 1
