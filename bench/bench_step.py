"""One GRPO step, phase by phase, for each reward variant on the same rollouts; and the rollout engine
against plain model.generate. Everything is measured side by side in one run and printed as ratios.

    python bench/bench_step.py                                    # tiny random Qwen3 (smoke model)
    python bench/bench_step.py --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf
    python bench/bench_step.py --rewards outcome,igsearch --repeats 2
    python bench/bench_step.py --model ... --force-search          # the model writes queries in every turn
    python bench/bench_step.py --model ... --scripted-searches 2   # scripted texts: no sampling cost at all
    python bench/bench_step.py --model ... --lora-rank 0,16        # each reward with and without adapters

The rollouts of a step are sampled once (seeded) and every variant scores and updates from the same weights
on those same rollouts, so the ratio "step time / outcome step time" isolates what the variant adds.
"""
import argparse
import copy
import dataclasses
import random
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402
import grpo  # noqa: E402
import igsearch  # noqa: E402
import lora  # noqa: E402
import retrieve  # noqa: E402
import rewards  # noqa: E402
import runs  # noqa: E402
from roofline import Positions, body_params, matmul_rate, mlp_sizes  # noqa: E402


def time_variant(model, ref_model, tok, retriever, rollouts, cfg, reward, seed, lora_rank=0):
    """Scoring + update time of one variant on fixed rollouts, from the same weights. Returns (times, metrics);
    times["flops"] is the work of the step's forwards and backwards (roofline.Positions on the policy and the
    reference): for the outcome reward, which scores without a model, the update's. lora_rank > 0: the copy
    gets adapters as a run's model does (lora.adapt_run) and its reference is itself with them off."""
    cfg = dataclasses.replace(cfg, reward=reward, lora_rank=lora_rank)
    m = copy.deepcopy(model)
    adapters = None
    if lora_rank:
        lora.adapt_run(m, cfg, next(m.parameters()).device)
        ref_model = lora.Reference(m)
        adapters = sum(p.numel() for p in m.parameters() if p.requires_grad)
    opt = engine.adamw(m.parameters(), cfg.lr)  # as a run makes it (fused, moments in one buffer)
    counted = [Positions(m)] + ([Positions(ref_model)] if not lora_rank else [])  # adapters off: m's forwards
    t = time.perf_counter()
    metrics, _, _ = igsearch.train_step(m, ref_model, opt, tok, retriever, [], cfg, torch.Generator().manual_seed(seed),
                                        random.Random(seed), rollouts=copy.deepcopy(rollouts))
    total = time.perf_counter() - t
    for c in counted:
        c.remove()
    flops = sum(c.flops(body_params(model), adapters) for c in counted)
    times = {"scoring": metrics["time_scoring"], "update": metrics["time_update"], "total": total, "flops": flops}
    return times, metrics


def ig_prefix_sharing(model, tok, retriever, rollouts, cfg, seed):
    """IG-Search scoring time with the shared prefix cache (rewards.gold_scorer) against scoring each of a
    step's 1 + N contexts whole, as written in METHOD §4.1; same blocks drawn (same seed), same IG up to float
    error. Returns (shared s, whole s, max |IG difference|, the shared scoring's FLOPs: roofline.Positions)."""
    shared = lambda prefix: rewards.gold_scorer(model, prefix, cfg.ig_head_tokens, cfg.ig_head_weight,
                                                cfg.forward_budget)
    whole_scores = lambda prefix: lambda suffixes, golds: rewards.gold_scorer(
        model, [], cfg.ig_head_tokens, cfg.ig_head_weight, cfg.forward_budget)([prefix + s for s in suffixes], golds)
    out, positions = [], Positions(model)
    for scorer in (shared, whole_scores):
        t = time.perf_counter()
        ig, _ = rewards.igsearch_information_gain(scorer, tok, rollouts, retriever, cfg.ig_samples, cfg.ig_baseline,
                                                  random.Random(seed), cfg.ig_max_context)
        out.append((time.perf_counter() - t, [g for gains in ig for g in gains]))
        if scorer is shared:
            positions.remove()
    diff = max((abs(a - b) for a, b in zip(out[0][1], out[1][1])), default=0.0)
    return out[0][0], out[1][0], diff, positions.flops(body_params(model))


# ----------------------------------------------------------------------------------------------------
# Roofline (bench/roofline.py): each phase's achieved rate against the machine's dense matmul rate

def engine_vs_generate(model, tok, prompts, new_tokens, seed):
    """Tokens/s of engine.generate_turn against model.generate on the same prompts, same number of new tokens
    (no stop strings, EOS ignored on both sides so both produce exactly new_tokens per row), and the engine's
    FLOP/s (roofline.Positions: 2·P per prompt and generated token, the head once per row and step)."""
    engine.generate_turn(model, tok, prompts, [4] * len(prompts), [], set(), 1.0, torch.Generator())  # warm-up
    gen, positions = torch.Generator().manual_seed(seed), Positions(model)
    t = time.perf_counter()
    outs, _ = engine.generate_turn(model, tok, prompts, [new_tokens] * len(prompts), [], set(), 1.0, gen)
    ours_s = time.perf_counter() - t
    positions.remove()
    ours = sum(len(o) for o in outs) / ours_s

    device = next(model.parameters()).device
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):], attn[b, L - len(p):] = torch.tensor(p), 1
    torch.manual_seed(seed)
    t = time.perf_counter()
    out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=True, temperature=1.0,
                         top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         pad_token_id=tok.pad_token_id)
    theirs = (out.shape[1] - L) * len(prompts) / (time.perf_counter() - t)
    return ours, theirs, positions.flops(body_params(model)) / ours_s


def tokens_past_stop(rollouts, tok):
    """Policy tokens kept after the token that completed one of that turn's stop tags, summed over all turns
    (must be 0). `</answer>` always stops a turn; `</search>` stops every turn but the last, answer-only one
    (search disabled there, so text may go on), i.e. the turns that an observation follows."""
    past = 0
    for r in rollouts:
        k = 0
        while k < len(r.ids):
            e = k
            while e < len(r.ids) and r.roles[e] == r.roles[k]:
                e += 1
            if r.roles[k] == grpo.POLICY:
                stops = ["</answer>"] + (["</search>"] if e < len(r.ids) else [])
                turn = r.ids[k:e]
                for j in range(1, len(turn) + 1):
                    if any(s in tok.decode(turn[:j]) for s in stops):
                        past += len(turn) - j
                        break
            k = e
    return past


def scripted_rollouts(tok, questions, groups, retriever, cfg, n_searches):
    """Rollouts that search n_searches times (the question, then its first half as a query) and then answer,
    run through the real bookkeeping: the cost of the IG variants when the policy does search."""
    scripts = []
    for q in questions:
        words = q["question"].split()
        queries = [q["question"], " ".join(words[: max(1, len(words) // 2)])][:n_searches]
        scripts.append([f"<think>I should look this up.</think>\n<search> {x} </search>" for x in queries]
                       + ["<think>I am not sure.</think>\n<answer> unknown </answer>"])
    return grpo.generate_rollouts(None, tok, questions, groups, retriever, max_turns=cfg.max_turns, topk=cfg.topk,
                                  max_response_tokens=cfg.max_response_tokens,
                                  turn_fn=grpo.scripted_turns(tok, scripts))


def forced_search_turns(model, tok, cfg, generator):
    """A turn_fn in which the policy searches in every turn but the last, answer-only one: the engine writes
    "<search>" to open the turn, the model writes the query (and its answer in the last turn), and a query that
    the turn budget or EOS cuts off is closed with " </search>" (a turn that answers keeps its answer).
    Sampling then costs what it costs for a policy that searches, which untrained SmolLM2 never does alone."""
    opener = tok.encode("<search>", add_special_tokens=False)
    closer = tok.encode(" </search>", add_special_tokens=False)
    eos_ids = engine.stop_ids(tok, model)

    def turn_fn(active, seqs, budget, stops):
        if "</search>" not in stops:  # the answer-only turn: the model alone
            return engine.generate_turn(model, tok, seqs, budget, stops, eos_ids, cfg.temperature, generator,
                                      cfg.forward_budget)
        room = [max(1, b - len(opener) - len(closer)) for b in budget]
        gens, why = engine.generate_turn(model, tok, [s + opener for s in seqs], room, stops, eos_ids,
                                       cfg.temperature, generator, cfg.forward_budget)
        gens = [opener + g + (closer if w not in stops else []) for g, w in zip(gens, why)]
        return gens, [w if w in stops else "</search>" for w in why]  # an answer still ends the episode
    return turn_fn


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--rewards", default="outcome,igsearch,inforeasoner")
    p.add_argument("--repeats", type=int, default=3, help="steps measured (fresh rollouts each)")
    p.add_argument("--scripted-searches", type=int, default=0,
                   help="replace sampled rollouts by scripted ones with this many searches (1 or 2)")
    p.add_argument("--force-search", action="store_true",
                   help="sampled rollouts that search in every turn but the last (the engine opens the tag)")
    p.add_argument("--ig-whole", action=argparse.BooleanOptionalAction, default=True,
                   help="also time IG-Search scoring without the shared prefix cache, for the ratio")
    p.add_argument("--lora-rank", default="0", help="comma-separated adapter ranks: every reward is timed once "
                   "per rank, on the same rollouts (0 = full fine-tuning)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    cfg = dataclasses.replace(igsearch.Config(), **igsearch.PRESETS["tiny"], model=args.model, seed=args.seed)
    runs.steady_heap()  # the heap and oneDNN's kernel cache as a run sets them (runs.cli)
    runs.bounded_kernel_cache()
    device = runs.pick_device(args.device)
    runs.seed_everything(args.seed)
    retriever = retrieve.Retriever(retrieve.load_vital_articles())
    from data.prepare import load_tiny_qa
    train_q = load_tiny_qa()["train"]
    t = time.perf_counter()
    model, tok, smoke = runs.load_model(args.model, device, args.seed)
    load_s = time.perf_counter() - t
    ref_model = engine.frozen_copy(model, cfg.precision)
    ranks_ = [int(r) for r in args.lora_rank.split(",") if r.strip()]
    # a variant: a reward on full fine-tuning ("igsearch") or with adapters of rank r ("igsearch lora16")
    plan = {(v if r == 0 else f"{v} lora{r}"): (v, r) for r in ranks_ for v in args.rewards.split(",") if v}
    variants = list(plan)
    print(f"model {args.model} ({sum(q.numel() for q in model.parameters()) / 1e6:.1f}M params, loaded in "
          f"{load_s:.1f} s) on {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; --tiny preset: "
          f"{cfg.questions_per_step} questions x G={cfg.group_size}, max_turns {cfg.max_turns}")

    rng = random.Random(args.seed)
    fast = lambda: engine.autocast(cfg.precision, device)  # noqa: E731
    # warm-up (allocator, kernels, lazy init), untimed: otherwise whichever variant runs first pays for it
    warm = grpo.generate_rollouts(model, tok, train_q[:2], [0, 1], retriever,
                                  **igsearch.rollout_kwargs(cfg, cfg.temperature, torch.Generator().manual_seed(0)))
    time_variant(model, ref_model, tok, retriever, warm, cfg, "outcome", args.seed)
    rows = {v: {"scoring": 0.0, "update": 0.0, "flops": 0.0} for v in variants}
    sample_s = retrieval_s = 0.0
    searches = n_roll = past = extra_tok = 0
    share = [0.0, 0.0, 0.0, 0.0]  # IG scoring: shared prefix s, whole contexts s, max |IG difference|, FLOPs
    for rep in range(args.repeats):
        questions = rng.sample(train_q, cfg.questions_per_step)
        batch_q = [q for q in questions for _ in range(cfg.group_size)]
        groups = [i for i in range(len(questions)) for _ in range(cfg.group_size)]
        retriever.seconds = 0.0
        t = time.perf_counter()
        gen = torch.Generator().manual_seed(args.seed + rep)
        if args.scripted_searches:
            rollouts = scripted_rollouts(tok, batch_q, groups, retriever, cfg, args.scripted_searches)
        else:
            with fast():  # the precision train_step samples in
                rollouts = grpo.generate_rollouts(model, tok, batch_q, groups, retriever,
                                                  **igsearch.rollout_kwargs(cfg, cfg.temperature, gen),
                                                  turn_fn=forced_search_turns(model, tok, cfg, gen)
                                                  if args.force_search else None)
        sample_s += time.perf_counter() - t - retriever.seconds
        retrieval_s += retriever.seconds
        searches += sum(len(r.searches) for r in rollouts)
        n_roll += len(rollouts)
        past += tokens_past_stop(rollouts, tok)
        for v in variants[rep % len(variants):] + variants[:rep % len(variants)]:  # rotate: no variant always first
            reward, rank = plan[v]
            times, metrics = time_variant(model, ref_model, tok, retriever, rollouts, cfg, reward, args.seed, rank)
            rows[v]["scoring"] += times["scoring"]
            rows[v]["update"] += times["update"]
            rows[v]["flops"] += times["flops"]
            if v == "inforeasoner":  # full fine-tuning's
                extra_tok += metrics.get("ir_extra_tokens", 0.0)
        if "igsearch" in variants and args.ig_whole:
            with fast():
                a, b, d, f = ig_prefix_sharing(model, tok, retriever, rollouts, cfg, args.seed)
            share = [share[0] + a, share[1] + b, max(share[2], d), share[3] + f]

    shared = sample_s + retrieval_s
    base = shared + rows[variants[0]]["scoring"] + rows[variants[0]]["update"]
    kind = (f"scripted, {args.scripted_searches} searches each" if args.scripted_searches
            else "sampled, searches forced" if args.force_search else "sampled")
    print(f"\nPer step, mean of {args.repeats} (same {kind} rollouts for every variant; {searches / n_roll:.2f} searches "
          f"per rollout; rollout sampling {sample_s / args.repeats:.2f} s, retrieval {retrieval_s / args.repeats:.3f} s)")
    print(f"{'reward':<22}{'rollout s':>10}{'retrieval s':>12}{'scoring s':>10}{'update s':>10}{'step s':>9}"
          f"{'ratio vs ' + variants[0]:>18}")
    for v in variants:
        step = shared + rows[v]["scoring"] + rows[v]["update"]
        print(f"{v:<22}{sample_s / args.repeats:>10.2f}{retrieval_s / args.repeats:>12.3f}"
              f"{rows[v]['scoring'] / args.repeats:>10.2f}{rows[v]['update'] / args.repeats:>10.2f}"
              f"{step / args.repeats:>9.2f}{step / base:>18.3f}")
    if "inforeasoner" in variants:
        print(f"inforeasoner extra generated tokens per rollout: {extra_tok / args.repeats:.1f}")
    print(f"tokens kept past a stop tag: {past} (must be 0)")
    if "igsearch" in variants and args.ig_whole and searches:
        print(f"IG-Search scoring with the shared prefix cache {share[0] / args.repeats:.2f} s vs each context whole "
              f"{share[1] / args.repeats:.2f} s: ratio {share[0] / share[1]:.2f} (max |IG difference| {share[2]:.1e})")

    prompts = [grpo.prompt_ids(tok, q["question"]) for q in train_q[:8]]
    with fast():
        ours, theirs, gen_flops = engine_vs_generate(model, tok, prompts, 64, args.seed)
    print(f"\nrollout engine {ours:.0f} tok/s vs model.generate {theirs:.0f} tok/s on the same 8 prompts x 64 new "
          f"tokens: ratio {ours / theirs:.2f}")

    # roofline: every rate against a plain matmul at the model's sizes, measured here, now
    P, bf16 = body_params(model), engine.bf16_forwards(cfg.precision, device)
    mm = {dt: matmul_rate(*mlp_sizes(model), dt, device) for dt in (torch.bfloat16, torch.float32)}
    peak = mm[torch.bfloat16 if bf16 else torch.float32]
    print(f"\nroofline: torch.mm [2048 x {model.config.hidden_size}] @ [{model.config.hidden_size} x "
          f"{getattr(model.config, 'intermediate_size', 0)}] runs at {mm[torch.bfloat16] / 1e9:.1f} GFLOP/s in bf16, "
          f"{mm[torch.float32] / 1e9:.1f} in fp32; the forwards run in {'bf16' if bf16 else 'fp32'}; "
          f"P = {P / 1e6:.1f}M matmul parameters and a {model.get_output_embeddings().weight.numel() / 1e6:.1f}M head, "
          f"counted where it projects (roofline.py)")
    print(f"{'phase':<46}{'GFLOP/s':>9}{'of matmul':>11}")
    # the update's work is the outcome step's (its scoring runs no model); 6·P a position with a backward, 2·P
    # without; with adapters 4·P with a backward (the frozen base needs no weight gradients)
    upd_s, upd_flops = (rows["outcome"]["update"], rows["outcome"]["flops"]) if "outcome" in rows else (0.0, 0.0)
    phases = [("update (policy fwd+bwd, reference fwd)", upd_flops / upd_s if upd_s else None)]
    phases += [(f"update, adapters of rank {plan[v][1]}", rows[v]["flops"] / rows[v]["update"])
               for v in variants if plan[v][0] == "outcome" and plan[v][1] and rows[v]["update"]]
    phases += [("IG scoring (forwards, shared prefix)", share[3] / share[0] if share[0] else None),
               ("generation (prefill and decode)", gen_flops)]
    for name, rate in phases:
        if rate:
            print(f"{name:<46}{rate / 1e9:>9.1f}{rate / peak:>10.0%}")
    if "igsearch" in variants and share[0] and upd_s:
        out_step = (shared + upd_s) / args.repeats  # the outcome step: sampling, retrieval, update
        predicted = (out_step + share[3] / args.repeats / (upd_flops / upd_s)) / out_step
        measured = (shared + rows["igsearch"]["scoring"] + rows["igsearch"]["update"]) / (out_step * args.repeats)
        print(f"igsearch / outcome step: measured {measured:.2f}; predicted {predicted:.2f} from the FLOP count "
              f"(IG scoring's FLOPs at the update's achieved rate)")
    print(f"peak memory: {peak_memory_mb(device):.0f} MiB ({'GPU allocated' if device.type == 'cuda' else 'process RSS'})")
    if smoke:
        print("(smoke model: random weights; give --model for meaningful rollouts)")


if __name__ == "__main__":
    main()
