"""Rollouts with search, per-token advantages and the GRPO loss.

Read top to bottom, this is the algorithm box of one training step: the calls igsearch.train_step and
update_policy make, module names left out (rewards.py scores EM and the information gains, engine.py cuts the
token budgets; tests/test_layout.py holds each call to its function's signature):

    rollouts = generate_rollouts(model, tok, batch_q, groups, retriever,
                                 **rollout_kwargs(cfg, cfg.temperature, generator))      # METHOD §1
    em, f1   = score_outcome(rollouts)                                                   # §2, EM and F1 each
    ig, _    = igsearch_information_gain(scorer, tok, rollouts, retriever, cfg.ig_samples, cfg.ig_baseline, rng,
                                         cfg.ig_max_context, range(lo, hi))              # IG-Search only, §4.1-4.2
    adv      = group_advantages(R, groups)                                               # §3.1, [B]
    batch    = collate(rollouts, tok.pad_token_id)                                       # ids, roles [B, T]
    A        = token_advantages(adv, batch.roles)                                        # §3.2, [B, T]
    A        = add_query_bonus(A, rollouts, ig, cfg.ig_alpha, cfg.ig_delta, cfg.ig_rho, cfg.ig_clip)  # IG-Search, §4.3
    micro    = token_chunks(attn.sum(-1).tolist(), cfg.token_budget)                     # update_policy: row slices
    ref      = token_logprobs(reference, ids, attn, mask, cfg.forward_budget)            # [B, T], no grad
    logp     = token_logprobs(model, ids[sl], attn[sl], mask[sl])                        # [b, T], micro-batch sl
    loss, st = grpo_loss(logp, logp_old, ref[sl], A[sl], mask[sl], cfg.clip_eps, cfg.beta_kl, cfg.loss_agg, norm,
                         cfg.clip_ratio_c)                                               # §3.3

batch_q repeats each question G times and groups[i] names rollout i's question. R is em (InfoReasoner: em plus
λ times its information gain, §5.4). ids, attn and mask are the batch's ids, attention_mask and policy_mask; the
policy's log-probs come from ranks.PolicyLogprobs (the data-parallel forward under torchrun), the reference's
from the frozen copy (engine.frozen_copy), and logp_old is logp detached when ppo_epochs is 1.

A trajectory is a list of token ids with a role per position. The ids are kept exactly as sampled and
observations are appended as ids, so the positions the loss trains on are exactly the tokens the model chose.
How the forwards run (batched generation, bf16, the token budgets, memory) is engine.py.
"""
from dataclasses import dataclass, field

import torch

import engine
from retrieve import format_docs

# Roles of positions in a trajectory: what put the token there.
PAD, PROMPT, POLICY, OBS = 0, 1, 2, 3
ROLE_NAMES = {PAD: "pad", PROMPT: "prompt", POLICY: "policy", OBS: "obs"}


# ----------------------------------------------------------------------------------------------------
# A trajectory and a batch of them

@dataclass
class Rollout:
    question: dict
    group: int                      # index of the question in the step's batch: a group never mixes questions
    ids: list                       # token ids: prompt, then sampled tokens and inserted observations
    roles: list                     # one role per id (PROMPT, POLICY, OBS)
    searches: list = field(default_factory=list)  # per search step: query, docs, query_span, info_span
    answer: str = None              # parsed from the last policy turn; None = no answer
    truncated: bool = False         # hit the total token cap: no answer, reward 0
    invalid_turns: int = 0
    reward: float = 0.0

    @property
    def n_policy(self):
        return sum(r == POLICY for r in self.roles)


def show_rollout(r, tok):
    """The trajectory as text, each stretch of one role tagged, e.g. [prompt]...[policy]...[obs]..."""
    out, start = [], 0
    for k in range(1, len(r.ids) + 1):
        if k == len(r.ids) or r.roles[k] != r.roles[start]:
            out.append(f"[{ROLE_NAMES[r.roles[start]]}]{tok.decode(r.ids[start:k])}")
            start = k
    return "".join(out) + f"\n[answer={r.answer!r} reward={r.reward:.3f} searches={len(r.searches)}]"


@dataclass
class Batch:
    ids: torch.Tensor    # [B, T] right-padded
    roles: torch.Tensor  # [B, T]

    @property
    def attention_mask(self):
        return (self.roles != PAD).long()

    @property
    def policy_mask(self):
        """METHOD §3.3: only sampled tokens enter the loss; prompt, observations and padding never do."""
        return self.roles == POLICY

    def __getitem__(self, rows):
        """The batch of some rows: batch[lo:hi] (under torchrun, a rank's share of the step)."""
        return Batch(self.ids[rows], self.roles[rows])


def collate(rollouts, pad_id):
    T = max(len(r.ids) for r in rollouts)
    ids = torch.full((len(rollouts), T), pad_id, dtype=torch.long)
    roles = torch.full((len(rollouts), T), PAD, dtype=torch.long)
    for b, r in enumerate(rollouts):
        ids[b, :len(r.ids)] = torch.tensor(r.ids)
        roles[b, :len(r.roles)] = torch.tensor(r.roles)
    return Batch(ids, roles)


# ----------------------------------------------------------------------------------------------------
# Advantages (METHOD §3.1, §3.2)

def group_advantages(rewards, groups, eps=1e-6):
    """METHOD §3.1: Â_i = (R_i - mean) / (std + eps) within each group; std unbiased; an all-equal group -> 0.

    >>> group_advantages([1., 0., 0., 5., 5.], [0, 0, 0, 1, 1])
    tensor([ 1.1547, -0.5773, -0.5773,  0.0000,  0.0000])
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    groups = torch.as_tensor(groups)
    adv = torch.zeros_like(rewards)
    for g in groups.unique():
        m = groups == g
        r = rewards[m]
        if not torch.all(r == r[0]):  # all equal (one rollout too): no signal, and std = 0 (or NaN) would divide
            adv[m] = (r - r.mean()) / (r.std(unbiased=True) + eps)
    return adv


def token_advantages(adv, roles):
    """METHOD §3.2: A[i, k] = Â_i at policy positions, 0 elsewhere. # [B, T]"""
    return adv[:, None] * (roles == POLICY).float()


# ----------------------------------------------------------------------------------------------------
# The loss (METHOD §3.3) and the warm-up's (METHOD §6)

def token_logprobs(model, ids, attention_mask, mask, token_budget=None):
    """log π(ids[b, k] | ids[b, <k]) where mask[b, k], 0 elsewhere. # [B, T]

    One forward per chunk of rows of at most token_budget tokens (engine.token_chunks over the rows' real
    lengths; None: all rows in one forward). The vocabulary projection is applied only at the masked positions:
    with a 150k-token vocabulary the full logits of a batch would take gigabytes for nothing (the loss only reads
    policy tokens).

    Rows are right-padded (collate), so the forward needs no attention mask: causal attention alone keeps a
    row's tokens from the padding after them, and the attention kernel then skips the masked half instead of
    reading an explicit [b, n, n] mask."""
    head = model.get_output_embeddings()
    out = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)      # [B, T]
    lengths = attention_mask.sum(-1)                                           # [B]
    if not torch.equal(attention_mask.bool(), torch.arange(ids.shape[1], device=ids.device) < lengths[:, None]):
        raise ValueError("token_logprobs takes right-padded rows: each row's attention mask must be 1s then 0s")
    for sl in engine.token_chunks(lengths.tolist(), token_budget):
        n = int(lengths[sl].max())                         # cut the chunk's own tail of padding
        i, m = ids[sl, :n], mask[sl, :n]
        h = model.base_model(input_ids=i).last_hidden_state  # [b, n, H] causal; positions 0..n-1
        target = m[:, 1:]                                  # token k is predicted at position k - 1
        lp = engine.head_logprobs(head, h[:, :-1][target], i[:, 1:][target])  # [n_target]
        out[sl, 1:n][target] = lp
    return out


def grpo_loss(logp, logp_old, logp_ref, A, mask, clip_eps=0.2, beta_kl=0.0, agg="token-mean", norm=None,
              clip_ratio_c=0.0):
    """METHOD §3.3: PPO-clip on per-token advantages plus a k3 KL to the reference, masked mean.

    All inputs [B, T]; logp_ref may be None when beta_kl = 0. agg = "token-mean" (every policy token of
    the batch weighs the same) or "seq-mean-token-mean" (mean per sequence, then over sequences; a row with
    no policy token adds 0 and still counts in the divisor, the number of rows, as in verl's agg_loss). When
    this is one micro-batch of a larger batch, `norm` is the batch's divisor (its policy-token count, or its
    number of sequences), so that the micro-batch losses add up to the batch loss.

    clip_ratio_c > 1 turns on verl's dual clip (Ye et al. 2020): where A < 0 the token loss is also capped at
    -A * c, so a ratio far above 1 + eps cannot make one bad token's loss unbounded; 0 (the default) = off.

    Returns (loss, stats). stats["clip_frac"] is the fraction of policy tokens on which the clip binds, i.e.
    the clipped term is the one taken: ratio > 1 + eps with A > 0, or ratio < 1 - eps with A < 0. This is
    verl's pg_clipfrac and TRL's clip ratio; a token outside [1 - eps, 1 + eps] on the other side (or with
    A = 0) keeps its gradient and is not counted. stats["dual_clip_frac"]: tokens where the dual clip binds
    (verl's pg_clipfrac_lower)."""
    mask = mask.float()
    ratio = torch.exp(logp - logp_old)
    unclipped = -ratio * A
    clipped = -torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * A
    pg = torch.maximum(unclipped, clipped)                       # = -min(r A, clip(r) A)
    dual = torch.zeros_like(pg, dtype=torch.bool)
    if clip_ratio_c > 0:
        cap = -A * clip_ratio_c
        dual = (A < 0) & (pg > cap)
        pg = torch.where(A < 0, torch.minimum(pg, cap), pg)
    loss_tok = pg
    kl = torch.zeros_like(logp)
    if beta_kl > 0:
        d = logp_ref - logp
        kl = torch.clamp(torch.exp(d) - d - 1, -10, 10)
        loss_tok = pg + beta_kl * kl
    if agg == "token-mean":
        loss = (loss_tok * mask).sum() / (norm if norm is not None else mask.sum().clamp(min=1))
    elif agg == "seq-mean-token-mean":
        per_seq = (loss_tok * mask).sum(-1) / mask.sum(-1).clamp(min=1)   # a row without policy tokens: 0
        loss = per_seq.sum() / (norm if norm is not None else mask.shape[0])
    else:
        raise ValueError(f"unknown loss aggregation {agg!r}; use token-mean or seq-mean-token-mean")
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        binds = (clipped > unclipped).float()                    # the clip binds: its term is the max
        stats = {"kl": float((kl * mask).sum() / n), "clip_frac": float((binds * mask).sum() / n),
                 "dual_clip_frac": float((dual.float() * mask).sum() / n), "n_tokens": float(mask.sum())}
    return loss, stats


def warmup_loss(logp, mask, norm=None):
    """METHOD §6: L_warm = -(1 / |P|) Σ_{(i,k) ∈ P} log π(y_ik | y_i,<k), P = the policy positions: the
    model's own turns are imitated, while the prompt, the retrieved observations and the padding never count.
    logp, mask [B, T]; `norm` is the whole batch's policy-token count when this is one micro-batch of it.

    >>> warmup_loss(torch.tensor([[0., -1., -2., -4.]]), torch.tensor([[False, True, False, True]]))
    tensor(2.5000)
    """
    mask = mask.float()
    return -(logp * mask).sum() / (norm if norm is not None else mask.sum().clamp(min=1))


# ----------------------------------------------------------------------------------------------------
# IG-Search: the information gain of a search step goes onto that step's query tokens (METHOD §4.3)

def ig_gate(x, delta=0.05, rho=0.5, clip=2.0):
    """g(): clip to [-clip, clip], then a dead zone |x| < delta -> 0, positives as they are, negatives * rho.

    >>> [ig_gate(x) for x in (0.03, 0.4, -0.4, -5.0)]
    [0.0, 0.4, -0.2, -1.0]
    """
    x = max(-clip, min(clip, x))
    if abs(x) < delta:
        return 0.0
    return x if x > 0 else rho * x


def add_query_bonus(A, rollouts, ig, alpha=0.5, delta=0.05, rho=0.5, clip=2.0):
    """A[i, k] += alpha * g(IG_{i,t}) for k in the query span of step t (`<search> ... </search>`, tags
    included). Additive, so the query tokens get a gradient even when the group advantage Â_i is 0.
    ig[i] lists the IG of rollout i's search steps. Returns a new [B, T] tensor."""
    A = A.clone()
    for b, r in enumerate(rollouts):
        for step, gain in zip(r.searches, ig[b]):
            s, e = step["query_span"]
            A[b, s:e] += alpha * ig_gate(gain, delta, rho, clip)
    return A


# ----------------------------------------------------------------------------------------------------
# The agent loop (METHOD §1)

# METHOD §1: the instruction, in this project's words. The question comes last.
INSTRUCTION = (
    "Answer the question below. Reason inside <think> and </think> each time you get new information. "
    "When you lack a fact, search Wikipedia by writing <search> your query </search>; the top results will "
    "come back between <information> and </information>. Search as many times as you need. When you know the "
    "answer, give it, as short as possible, inside <answer> and </answer>, for example <answer> Paris </answer>."
    "\n\nQuestion: "
)
INVALID_ACTION = ("\nThat was neither a search nor an answer. Write <search> query </search> to search, "
                  "or <answer> short answer </answer> to answer.\n")


def extract_answer(response):
    """The last complete <answer>...</answer> of the response, stripped; None when there is none.

    Pass the response only: the prompt holds an example answer (METHOD §1).
    >>> extract_answer("<answer>Lyon</answer> no, <answer> Paris </answer><answer>unfinished")
    'Paris'
    """
    end = response.rfind("</answer>")
    if end < 0:
        return None
    start = response.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return response[start + len("<answer>"):end].strip()


def information_block(docs):
    """The observation appended after a search (METHOD §1)."""
    return information_text(format_docs(docs))


def information_text(formatted):
    """Documents already formatted (retrieve.format_docs) between the information tags."""
    return f"\n\n<information>{formatted}</information>\n\n"


def prompt_ids(tok, question):
    """The policy's prompt: one user turn through the tokenizer's chat template."""
    messages = [{"role": "user", "content": INSTRUCTION + question.strip()}]
    if tok.chat_template:
        return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    return tok.encode(messages[0]["content"] + "\n", add_special_tokens=True)  # a base model without a template


def _char_to_token(tok, gen, char_pos):
    """Index of the token of `gen` that holds character `char_pos` of decode(gen)."""
    lo, hi = 0, len(gen)  # the largest j with len(decode(gen[:j])) <= char_pos
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tok.decode(gen[:mid])) <= char_pos:
            lo = mid
        else:
            hi = mid - 1
    return min(lo, len(gen) - 1)


def _append(r, ids, role):
    start = len(r.ids)
    r.ids.extend(ids)
    r.roles.extend([role] * len(ids))
    return start, len(r.ids)


def generate_rollouts(model, tok, questions, groups, retriever, *, max_turns=4, topk=3, max_turn_tokens=256,
                      max_response_tokens=1024, temperature=1.0, generator=None, token_budget=None, turn_fn=None):
    """Run the search agent on each question (one rollout per entry; repeat a question G times for a group).

    Each turn: batched generation for every unfinished rollout; a `<search> q </search>` turn gets the top-k
    documents as an `<information>` block (one retrieval call for all queries of the turn); an `<answer>`
    turn ends the episode; anything else gets INVALID_ACTION. After max_turns searches, one last turn is
    answer-only (a search there is not executed). max_response_tokens caps all tokens after the prompt;
    a rollout that reaches it is truncated (no answer, reward 0). Each turn's generation runs in batches of at
    most token_budget tokens of KV cache (engine.generate_turn).

    turn_fn(active, seqs, budget, stops) -> (new ids, stop reasons) replaces the model (see scripted_turns),
    so that tests and demos run scripted texts through exactly this bookkeeping."""
    if turn_fn is None:
        eos_ids = engine.stop_ids(tok, model)
        turn_fn = lambda active, seqs, budget, stops: engine.generate_turn(model, tok, seqs, budget, stops, eos_ids,
                                                                           temperature, generator, token_budget)
    rollouts = []
    for q, g in zip(questions, groups):
        p = prompt_ids(tok, q["question"])
        rollouts.append(Rollout(question=q, group=g, ids=list(p), roles=[PROMPT] * len(p)))
    prompt_len = [len(r.ids) for r in rollouts]
    done = [False] * len(rollouts)
    # a search turn and an invalid turn each use one of the max_turns; the last turn may only answer
    for turn in range(max_turns + 1):
        active = [i for i in range(len(rollouts)) if not done[i]]
        if not active:
            break
        answer_only = turn == max_turns
        stops = ["</answer>"] if answer_only else ["</search>", "</answer>"]
        budget = [min(max_turn_tokens, max_response_tokens - (len(rollouts[i].ids) - prompt_len[i])) for i in active]
        gens, why = turn_fn(active, [rollouts[i].ids for i in active], budget, stops)
        pending = []  # (rollout index, query) to retrieve for, all in one call
        for i, gen, w, room in zip(active, gens, why, budget):
            r = rollouts[i]
            start, _ = _append(r, gen, POLICY)
            text = tok.decode(gen)
            answer = extract_answer(text)
            if w == "</answer>" or answer is not None:
                r.answer, done[i] = answer, True
            elif w == "</search>" and "<search>" in text:
                q_char = text.rfind("<search>", 0, text.rfind("</search>"))
                query = text[q_char + len("<search>"):text.rfind("</search>")].strip()
                span = (start + _char_to_token(tok, gen, q_char), len(r.ids))  # tags included
                pending.append((i, query, span))
            elif w == "length" and room < max_turn_tokens:  # the total cap, not just this turn's
                r.truncated, done[i] = True, True
            elif answer_only:
                done[i] = True  # no answer in the last turn
            else:
                r.invalid_turns += 1
                _append(r, tok.encode(INVALID_ACTION, add_special_tokens=False), OBS)
        if pending:
            results = retriever.search([q for _, q, _ in pending], topk)
            for (i, query, span), docs in zip(pending, results):
                r = rollouts[i]
                obs = tok.encode(information_block(docs), add_special_tokens=False)
                info_span = _append(r, obs, OBS)
                r.searches.append({"query": query, "docs": docs, "query_span": span, "info_span": info_span})
        for i in active:  # an observation can overflow the cap too
            if not done[i] and len(rollouts[i].ids) - prompt_len[i] >= max_response_tokens:
                rollouts[i].truncated, rollouts[i].answer, done[i] = True, None, True
    return rollouts


def scripted_turns(tok, scripts):
    """A turn_fn that plays fixed texts: scripts[i] is the list of turn texts of rollout i. Each text is
    tokenized and cut after the first stop string exactly as the engine would stop; the stop reason is that
    string, "length" when the budget cuts it, else "eos". For one rollout that searches, then answers:

        turns = scripted_turns(tok, [["<search> capital of France </search>", "<answer> Paris </answer>"]])
        rollouts = generate_rollouts(None, tok, [question], [0], retriever, turn_fn=turns)
    """
    turn_no = [0] * len(scripts)

    def turn_fn(active, seqs, budget, stops):
        gens, why = [], []
        for i, room in zip(active, budget):
            text = scripts[i][min(turn_no[i], len(scripts[i]) - 1)]
            turn_no[i] += 1
            ids, w = tok.encode(text, add_special_tokens=False), "eos"
            for k in range(1, len(ids) + 1):  # the token that completes a stop string ends the turn
                hit = [s for s in stops if s in tok.decode(ids[:k])]
                if hit:
                    ids, w = ids[:k], hit[0]
                    break
            if len(ids) > room:
                ids, w = ids[:room], "length"
            gens.append(ids)
            why.append(w)
        return gens, why
    return turn_fn
