"""What tests/test_ranks.py runs in each of 2 processes under torchrun (gloo, CPU), and in one process to
compare with:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ranks_worker.py OUT '[JOB, ...]'

Jobs, in order, in the same processes (each process takes ~10 s to import transformers and build the model):
["step"]: one train_step of IG-Search on scripted rollouts, with DDP then FSDP, once more with FSDP where the
token budget cuts the ranks' rows into unequal numbers of micro-batches, one of InfoReasoner, and with DDP and
FSDP once more with low-rank adapters (lora.py); each rank
writes what it saw to OUT/step_rank{r}.pt. ["main", ARGV]: igsearch.main(ARGV), with a reward that
depends on the sampled tokens (a random model never answers right, so EM alone would never move the weights).
["compare", ARGV]: experiments.main(["compare", *ARGV]), with the same reward."""
import copy
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import engine  # noqa: E402
import experiments  # noqa: E402
import grpo  # noqa: E402
import igsearch  # noqa: E402
import lora  # noqa: E402
import ranks  # noqa: E402
import rewards  # noqa: E402
import runs  # noqa: E402
from retrieve import Retriever  # noqa: E402

DOCS = [{"id": f"d{i}", "title": f"Person {i}", "text": f"Person {i} was born in City{i} and worked as a "
         f"{['baker', 'painter', 'pilot'][i % 3]}."} for i in range(12)]
QUESTIONS = [{"id": f"q{i}", "question": f"Where was Person {i} born?", "golden_answers": [f"City{i}"]}
             for i in (1, 4, 7, 10)]


def scripted_generation(G):
    """grpo.generate_rollouts with scripted turns: in each group the first rollout searches its question and
    answers right, the second searches the wrong person and answers wrong (different rewards, IG and blocks)."""
    real = grpo.generate_rollouts

    def generate(model, tok, questions, groups, retriever, **kw):
        scripts = []
        for k, q in enumerate(questions):
            n = int(q["id"][1:])
            if k % G == 0:
                scripts.append([f"<search> {q['question']} </search>", f"<answer> City{n} </answer>"])
            else:
                scripts.append([f"<search> Person {n + 1} painter </search>", f"<answer> City{n + 1} </answer>"])
        return real(None, tok, questions, groups, retriever, max_turns=kw["max_turns"], topk=kw["topk"],
                    turn_fn=grpo.scripted_turns(tok, scripts))
    return generate


_TINY, _BUILD = {}, runs.tiny_random_model  # the builder itself: main jobs replace runs.tiny_random_model


def tiny_model(seed=0):
    """A copy of the tiny random Qwen3 (built once per process: the tokenizer takes seconds to load)."""
    if seed not in _TINY:
        _TINY[seed] = _BUILD(seed)
    model, tok = _TINY[seed]
    return copy.deepcopy(model), tok


# The rollouts take 152 to 164 tokens. 330: two rows a micro-batch, in one process as on each rank, so that the
# comparison sees the ranks alone (micro-batches made of other rows sum in another order, which AdamW's first
# steps amplify to ~3e-6 on near-zero gradients). 316: rank 0's rows (158, 155, 158, 155) make 2 micro-batches,
# rank 1's (158, 155, 164, 161) 3, which ranks.same_count must even out.
EVEN, UNEVEN = 330, 316


def step_config(**kw):
    base = dict(model="tiny-random", reward="igsearch", questions_per_step=4, group_size=2, max_turns=1, topk=1,
                max_turn_tokens=32, max_response_tokens=256, token_budget=EVEN, ppo_epochs=2, beta_kl=0.01, lr=1e-3,
                ig_samples=2, ig_delta=0.0, ir_samples=2, ir_max_tokens=4, precision="fp32")
    return igsearch.Config(**{**base, **kw})


def whole(t):
    """A tensor as one process holds it (an FSDP shard is gathered: every rank must call this)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def one_step(cache_dir, parallel=None, **kw):
    """One train_step from the tiny random model on QUESTIONS with scripted rollouts, in this process's world:
    (metrics, A, grads, weights, optimizer state, the shared rng's next draw, pools, rollouts' questions).
    pools[i] = the questions whose information blocks were in the IG baseline pool of rollout i, for the
    rollouts this rank scored."""
    cfg = step_config(**kw)
    model, tok = tiny_model(0)
    lora.adapt(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)  # as igsearch._train (rank 0: nothing)
    ref_model = lora.Reference(model) if cfg.lora_rank else copy.deepcopy(model).eval().requires_grad_(False)
    dp = ranks.data_parallel(model, parallel) if parallel else None
    opt = engine.adamw(model.parameters(), cfg.lr)
    step_grads = {}  # the gradients the optimizer steps on (update_policy drops them after the step)
    opt.register_step_pre_hook(lambda *a: step_grads.update(
        {n: whole(p.grad).detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    retriever = Retriever(DOCS, cache_dir=cache_dir)
    rng = random.Random(5)
    seen, pool_of, sampled_for, micro = [], rewards.batch_pool, [], []

    def recording_pool(rollouts, i):
        pool = pool_of(rollouts, i)
        seen.append((i, [tuple(b) for b in pool]))
        return pool

    def recording_beliefs(model_, tok_, rollouts, *a, **k):
        sampled_for.extend(r.question["id"] for r in rollouts)
        return beliefs_of(model_, tok_, rollouts, *a, **k)

    def recording_count(chunks):
        out = same_count(chunks)
        micro.append((len(chunks), len(out)))
        return out

    generate, beliefs_of, same_count = grpo.generate_rollouts, rewards.inforeasoner_beliefs, ranks.same_count
    grpo.generate_rollouts = scripted_generation(cfg.group_size)
    rewards.batch_pool, rewards.inforeasoner_beliefs = recording_pool, recording_beliefs
    ranks.same_count = recording_count
    try:
        metrics, rollouts, A = igsearch.train_step(model, ref_model, opt, tok, retriever, QUESTIONS, cfg,
                                                   torch.Generator().manual_seed(ranks.rank_seed(0)), rng, dp=dp)
    finally:
        grpo.generate_rollouts, rewards.batch_pool, rewards.inforeasoner_beliefs = generate, pool_of, beliefs_of
        ranks.same_count = same_count
    block_question = {tuple(r.ids[slice(*s["info_span"])]): r.question["id"] for r in rollouts for s in r.searches}
    lo, hi = ranks.span(len(rollouts))
    pools = {i: sorted({block_question[b] for b in pool}) for i, pool in seen if lo <= i < hi}
    grads = step_grads
    weights = {n: whole(p).detach().clone() for n, p in model.named_parameters()}
    opt_state = ranks.full_state(model, opt, dp)[1] or opt.state_dict()
    return {"metrics": {k: v for k, v in metrics.items() if not k.startswith("time_")}, "A": A, "grads": grads,
            "weights": weights, "opt_state": copy.deepcopy(opt_state), "next_draw": rng.random(), "pools": pools,
            "questions": [r.question["id"] for r in rollouts], "sampled_for": sampled_for, "mine": (lo, hi),
            "micro_batches": micro,
            "model": model, "opt": opt, "dp": dp, "tok": tok}


def fsdp_checkpoint_roundtrip(step, out):
    """An FSDP checkpoint, written by rank 0 in the one-process format, loaded back into fresh shards."""
    model, opt, dp, generator = step["model"], step["opt"], step["dp"], torch.Generator()
    ranks.on_main(runs.save_checkpoint, out, 1, model, step["tok"], opt, generator, random.Random(0),
                  **ranks.checkpoint_state(model, opt, dp, generator))  # as igsearch._train writes one
    fresh, _ = tiny_model(1)  # other weights: the load must replace them
    fresh_dp = ranks.data_parallel(fresh, "fsdp")
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3, weight_decay=0.0)
    _, w, o, _ = runs.last_checkpoint(out)
    ranks.load_full_state(fresh, fresh_opt, fresh_dp, w, o)
    loaded = {n: whole(p).detach().clone() for n, p in fresh.named_parameters()}
    return {"weights": loaded, "opt_state": copy.deepcopy(ranks.full_state(fresh, fresh_opt, fresh_dp)[1])}


def strip(step):
    return {k: v for k, v in step.items() if k not in ("model", "opt", "dp", "tok")}


def varied_reward(rollouts):
    """EM 1 for the first rollout of each group, 0 for the others: every group has a reward spread, whatever was
    sampled (the sampled ids differ between CPU kinds, and a step without spread would train nothing)."""
    seen, em = set(), []
    for r in rollouts:
        em.append(float(r.group not in seen))
        seen.add(r.group)
    return em, em


def main(argv):
    out, jobs = Path(argv[0]), json.loads(argv[1])
    ranks.init()
    for job in jobs:
        if job[0] == "step":
            cache = out / "bm25"  # shared, as in a run: the index is written atomically
            result = {"world": ranks.world(), "rank": ranks.rank()}
            result["ddp"] = strip(one_step(cache, "ddp"))
            fsdp = one_step(cache, "fsdp")
            result["fsdp"] = strip(fsdp)
            result["fsdp_roundtrip"] = fsdp_checkpoint_roundtrip(fsdp, out / "fsdp-run")
            result["fsdp_uneven"] = strip(one_step(cache, "fsdp", token_budget=UNEVEN))
            result["inforeasoner"] = strip(one_step(cache, "ddp", reward="inforeasoner"))
            for parallel in ("ddp", "fsdp"):  # low-rank adapters: the reference is the policy, adapters off
                result[f"{parallel}_lora"] = strip(one_step(cache, parallel, lora_rank=4))
            torch.save(result, out / f"step_rank{ranks.rank()}.pt")
        else:
            igsearch.score_outcome = varied_reward
            runs.tiny_random_model = tiny_model  # the same weights, built once per process
            assert (igsearch.main(job[1]) if job[0] == "main" else experiments.main(["compare", *job[1]])) == 0
    ranks.finish()


if __name__ == "__main__":
    main(sys.argv[1:])
