"""Rollouts with search, per-token advantages and the GRPO loss.

Read top to bottom, this is the algorithm box of one training step (igsearch.train_step and update_policy
make these calls; rewards.py scores EM and the information gains):

    rollouts = generate_rollouts(model, tok, batch_q, groups, retriever, max_turns=..., ...)          # METHOD §1
    R        = [exact_match(r.answer, r.question["golden_answers"]) for r in rollouts]            # §2
    adv      = group_advantages(R, groups)                                                        # §3.1, [B]
    batch    = collate(rollouts, tok.pad_token_id)                                                # ids, roles [B, T]
    A        = token_advantages(adv, batch.roles)                                                 # §3.2, [B, T]
    A        = add_query_bonus(A, rollouts, ig, alpha, delta, rho, clip)    (IG-Search only)       # §4.3
    logp     = token_logprobs(model, batch.ids, batch.attention_mask, batch.policy_mask)          # [B, T]
    loss, st = grpo_loss(logp, logp_old, logp_ref, A, batch.policy_mask, clip_eps, beta_kl)       # §3.3

batch_q repeats each question G times and groups[i] names rollout i's question; logp_ref is token_logprobs of
the frozen reference (frozen_copy), logp_old the sampling policy's (logp detached when ppo_epochs is 1).

A trajectory is a list of token ids with a role per position. The ids are kept exactly as sampled and
observations are appended as ids, so the positions the loss trains on are exactly the tokens the model chose.
"""
import contextlib
import copy
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer

from retrieve import format_docs

# Roles of positions in a trajectory: what put the token there.
PAD, PROMPT, POLICY, OBS = 0, 1, 2, 3
ROLE_NAMES = {PAD: "pad", PROMPT: "prompt", POLICY: "policy", OBS: "obs"}

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


# ----------------------------------------------------------------------------------------------------
# A trajectory

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


# ----------------------------------------------------------------------------------------------------
# The token budget: every batched forward (generation, scoring, log-probs, the update) is cut by it

def token_chunks(lengths, budget):
    """Consecutive rows cut into chunks of at most `budget` tokens, counted as a padded batch costs them: rows ×
    the chunk's longest row. Order is kept; a row longer than the budget gets a chunk of its own; budget None is
    one chunk. Returns row slices. A row count would bound memory badly: 2 rows of 1,000 tokens cost 20× 2 of 50.

    >>> token_chunks([3, 3, 5, 9, 2], 10)       # 2 × 3; then 2 × 5 would be 10 but 3 × 5 is 15; 9 alone; 2
    [slice(0, 2, None), slice(2, 3, None), slice(3, 4, None), slice(4, 5, None)]
    """
    chunks, start, longest = [], 0, 0
    for i, n in enumerate(lengths):
        longest = max(longest, int(n))
        if budget is not None and i > start and (i + 1 - start) * longest > budget:  # row i opens the next chunk
            chunks.append(slice(start, i))
            start, longest = i, int(n)
    return chunks + [slice(start, len(lengths))] if len(lengths) else []


# ----------------------------------------------------------------------------------------------------
# The generation engine: one turn for every active rollout, batched, with the KV cache

def stop_ids(tok, model):
    """Token ids that end a turn: EOS and the chat template's end-of-turn tokens."""
    ids = {tok.eos_token_id}
    eos = model.generation_config.eos_token_id
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return {i for i in ids if i is not None}


def _stopped_at(tok, gen, stop_strings):
    """The stop string that the newest token completed, if any. Tags are matched on text, so they are
    found whatever their tokenization (' </', 'search', '>\\n\\n' or '</search>'). Only a short tail is
    decoded: checked after every token, a stop string first appears in the tail ending at the newest one."""
    tail = tok.decode(gen[-12:])
    for s in stop_strings:
        if s in tail:
            return s
    return None


def generate_turn(model, tok, seqs, max_new, stop_strings, eos_ids, temperature, generator, token_budget=None):
    """Sample one turn for each sequence of `seqs` (lists of ids), in left-padded batches of at most
    token_budget tokens of KV cache (token_chunks; None: one batch).

    A row stops at the token that completes a stop string, at EOS, or after max_new[b] tokens; nothing is
    generated for it after that (finished rows leave the batch and the KV cache). Returns, per row, the new
    ids and why it stopped: a stop string, "eos" or "length". temperature 0 is greedy.

    A row's cache grows to its length plus the call's largest max_new (left padding gives every row of a batch
    the longest one's length), and each turn starts a new cache, so that is the row's length in the budget.
    Rows that need more than one batch are cut shortest first, so that a batch pads its rows to a length near
    their own (a later turn's rows can differ by hundreds of tokens, and cut in their given order much of the
    prefill would be padding). The batches sample one after the other from `generator`: which numbers a row
    draws, hence its samples, depend on how the rows are cut, as on the seed (rows that fit one batch keep
    their order, and draw as with no budget)."""
    grow = max(max_new, default=0)
    lengths = [len(s) + grow for s in seqs]
    order = list(range(len(seqs)))
    if len(token_chunks(lengths, token_budget)) > 1:
        order.sort(key=lambda b: lengths[b])  # stable: a repeated prompt's rows stay together
    gens, why = [None] * len(seqs), [None] * len(seqs)
    for sl in token_chunks([lengths[b] for b in order], token_budget):
        rows = order[sl]
        g, w = _generate_batch(model, tok, [seqs[b] for b in rows], [max_new[b] for b in rows], stop_strings,
                               eos_ids, temperature, generator)
        for b, gb, wb in zip(rows, g, w):
            gens[b], why[b] = gb, wb
    return gens, why


class RoomyLayer(DynamicLayer):
    """One layer's KV cache with room for `room` tokens past its prefill, written in place. transformers'
    DynamicLayer appends each token with torch.cat, which allocates and copies the whole cache at every step
    (timings in docs/PERFORMANCE.md). Under autocast both are stored in its dtype: RoPE leaves the keys fp32,
    and the attention would cast the whole cache of keys to bf16 again at every step. Attention reads views of
    the filled part, so it computes what DynamicLayer computes, to the bit."""

    def __init__(self, room):
        super().__init__()
        self.room = room

    def update(self, keys, values, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
            B, H, n, _ = keys.shape
            kind = keys.device.type
            dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
            self.k_buf = keys.new_empty(B, H, n + self.room, keys.shape[-1], dtype=dtype or keys.dtype)  # [B, H, n + room, D]
            self.v_buf = values.new_empty(B, H, n + self.room, values.shape[-1], dtype=dtype or values.dtype)
        n0 = self.get_seq_length()
        n1 = n0 + keys.shape[-2]
        self.k_buf[:, :, n0:n1], self.v_buf[:, :, n0:n1] = keys, values
        self.keys, self.values = self.k_buf[:, :, :n1], self.v_buf[:, :, :n1]
        return self.keys, self.values

    def batch_select_indices(self, indices):
        n = self.get_seq_length()
        self.k_buf, self.v_buf = self.k_buf[indices], self.v_buf[indices]
        self.keys, self.values = self.k_buf[:, :, :n], self.v_buf[:, :, :n]


def kv_cache(model, room):
    """A KV cache for a transformers model that will generate up to `room` tokens past its prefill (RoomyLayer);
    None for any other model, which then builds its own (the constructed models of tests/test_engine.py)."""
    if not isinstance(model, PreTrainedModel):
        return None
    cache = DynamicCache(config=model.config)
    cache.layers = [RoomyLayer(room) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def sample_tokens(probs, generator):
    """One token per row of probs [b, V] -> [b], by inverting each row's cumulative distribution at a uniform
    draw: token i is drawn when cdf[i-1] <= u·cdf[V-1] < cdf[i], a chance of exactly probs[i] (a token of
    probability 0 never). E.g. probs [0.2, 0, 0.5, 0.3], cdf [0.2, 0.2, 0.7, 1.0]: u = 0.1 -> 0, u = 0.2 -> 2,
    u = 0.7 -> 3. The sums are float64, so the last of 152k fp32 probabilities is not rounded away.

    torch.multinomial draws one exponential number per vocabulary entry (a log each) and takes an argmax; one
    cumulative sum and a binary search per row cost a fraction of that (docs/PERFORMANCE.md)."""
    cdf = probs.cumsum(-1, dtype=torch.float64)  # [b, V]
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64) * cdf[:, -1:]  # [b, 1]
    # u·total can round up to the total itself (a chance of about 2^-53), past every cdf entry: the last token
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def _generate_batch(model, tok, seqs, max_new, stop_strings, eos_ids, temperature, generator):
    """generate_turn on one batch: every row of `seqs` in one left-padded batch and one KV cache."""
    device = next(model.parameters()).device
    B, L = len(seqs), max(len(s) for s in seqs)
    cache = kv_cache(model, max(max_new))
    # rows that repeat a prompt (InfoReasoner's K samples of one belief) share one prefill, then a copy of its cache
    first = {}
    src = [first.setdefault(tuple(s), len(first)) for s in seqs] if cache is not None else list(range(B))
    uniq = list(first) if cache is not None else seqs
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(uniq), L), pad, dtype=torch.long)
    attn = torch.zeros((len(uniq), L), dtype=torch.long)
    for b, s in enumerate(uniq):  # left padding: every row's next token goes at the same column
        ids[b, L - len(s):] = torch.tensor(s)
        attn[b, L - len(s):] = 1
    ids, attn = ids.to(device), attn.to(device)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # [U, L] positions that ignore the padding
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    cache, logits = out.past_key_values, out.logits[:, -1].float()  # [U, V]
    if len(uniq) < B:  # one row per sequence again: [U, ...] -> [B, ...]
        sel = torch.tensor(src, device=device)
        cache.batch_select_indices(sel)
        logits, attn, pos = logits[sel], attn[sel], pos[sel]
    rows = list(range(B))  # original row of each row still in the batch
    gens, why = [[] for _ in range(B)], [None] * B
    while rows:
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1).cpu()  # drawn on CPU: reproducible
            nxt = sample_tokens(probs, generator)  # [b]
        else:
            nxt = logits.argmax(-1).cpu()
        keep = []
        for j, b in enumerate(rows):
            t = int(nxt[j])
            gens[b].append(t)
            if t in eos_ids:
                why[b] = "eos"
            else:
                why[b] = _stopped_at(tok, gens[b], stop_strings)
                if why[b] is None and len(gens[b]) >= max_new[b]:
                    why[b] = "length"
            if why[b] is None:
                keep.append(j)
        if not keep:
            break
        if len(keep) < len(rows):  # drop finished rows from the batch and the cache
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            attn, pos, nxt = attn[sel], pos[sel], nxt[keep]
            rows = [rows[j] for j in keep]
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None].to(device), attention_mask=attn, position_ids=pos,
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1].float()
    return gens, why


# ----------------------------------------------------------------------------------------------------
# The agent loop (METHOD §1)

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
    most token_budget tokens of KV cache (generate_turn).

    turn_fn(active, seqs, budget, stops) -> (new ids, stop reasons) replaces the model (see scripted_turns),
    so that tests and demos run scripted texts through exactly this bookkeeping."""
    if turn_fn is None:
        eos_ids = stop_ids(tok, model)
        turn_fn = lambda active, seqs, budget, stops: generate_turn(model, tok, seqs, budget, stops, eos_ids,
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


# ----------------------------------------------------------------------------------------------------
# Batching, advantages and the loss (METHOD §3)

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


def autocast(precision, device):
    """The forward passes' precision: "bf16" autocasts matmuls to bfloat16, "fp32" runs them in float32, "auto"
    takes bf16 where the hardware computes it natively (a GPU with bf16, a CPU with AVX-512 or AMX) and fp32
    elsewhere. Weights, optimizer state, log-softmax and losses stay fp32 in every case (see head_logprobs)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_forwards(precision, device))


def bf16_forwards(precision, device):
    """Whether `precision` (auto | bf16 | fp32) runs the forwards in bf16 on `device`."""
    return precision == "bf16" or (precision == "auto" and bf16_native(device))


@contextlib.contextmanager
def recompute(model, on=True):
    """Gradient checkpointing for the forward passes inside: each decoder layer keeps only its input and
    recomputes the rest in the backward, so a micro-batch's activations take about 1/L of the memory for about
    a third more update compute. transformers checkpoints in train mode only: the model is in train mode
    inside and back in eval mode after (so rollouts and no-grad forwards never recompute). The models used
    here have no dropout (rate 0), so the numbers do not change (tests/test_precision.py)."""
    if not on or not getattr(model, "supports_gradient_checkpointing", False):
        yield
        return
    if not model.is_activation_checkpointing:  # once: it stays set, and acts in train mode only
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.disable_input_require_grads()  # a hook for frozen embeddings; the weights here all train
    model.train()
    try:
        yield
    finally:
        model.eval()


def frozen_copy(model, precision):
    """The frozen reference (METHOD §3.2): a copy of the policy that takes no gradient. Where the forwards run in
    bf16, its linear layers are kept in bf16, which is exactly what autocast casts them to in every forward:
    the same log-probs for half the memory. The vocabulary head stays fp32 (head_logits), and with it the
    input embedding where the two are tied, as do the norms.

    The bf16 weights are made first and handed to deepcopy (its memo), so the copy never holds them in fp32:
    copied whole and then cast, the freed fp32 linears (each under the mmap threshold of runs.steady_heap)
    would stay in the heap, and the copy would cost nearly as much memory as an fp32 one (docs/PERFORMANCE.md)."""
    device = next(model.parameters()).device
    memo = {}
    if bf16_forwards(precision, device):
        head = model.get_output_embeddings()
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m is not head:
                for p in m.parameters(recurse=False):
                    memo[id(p)] = torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
    return copy.deepcopy(model, memo).eval().requires_grad_(False)


def adamw(params, lr):
    """AdamW without weight decay, fused (one kernel over all parameters) where torch has it for the device: the
    default for-each version allocates temporaries the size of the model in every step, which is slower and
    raises the update's peak memory (docs/PERFORMANCE.md)."""
    params = [p for p in params if p.requires_grad]  # frozen weights (a LoRA base) hold no moments
    try:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or tensor type without the fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # the two moments made now, in two buffers (flat_zeros), rather than by the first step, one small tensor a
    # parameter on the heap among that step's activations; the state the fused step would make, else
    exp_avg, exp_avg_sq = flat_zeros(params), flat_zeros(params)
    if exp_avg is not None:
        for p, m, v in zip(params, exp_avg, exp_avg_sq):
            opt.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device), "exp_avg": m,
                            "exp_avg_sq": v}
    return opt


def flat_zeros(tensors):
    """Zeros shaped as each of `tensors`, as views into one buffer; None where they are not plain tensors of one
    dtype and device (FSDP's sharded parameters). For what lives a whole step or run, AdamW's moments and the
    gradients: one buffer is one mapping, handed back whole when freed. As one tensor per parameter, most
    under glibc's mmap threshold (runs.steady_heap), they would sit on the heap between the activations freed
    around them, and the heap would grow from step to step (measured in docs/PERFORMANCE.md).

    >>> a, b = flat_zeros([torch.ones(2, 3), torch.ones(4)])
    >>> a.shape, b.shape, a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    (torch.Size([2, 3]), torch.Size([4]), True)"""
    tensors = list(tensors)
    if (not tensors or any(type(t.data) is not torch.Tensor for t in tensors)
            or len({(t.dtype, t.device) for t in tensors}) > 1):
        return None
    buf = torch.zeros(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
    return [v.view_as(t) for v, t in zip(buf.split([t.numel() for t in tensors]), tensors)]


def flat_grads(params):
    """Zero gradients for the parameters that train, as views into one buffer (flat_zeros), for the backwards
    of a step to add into in place; the gradients before are dropped first, so that two never coexist. Plain
    zero_grad(set_to_none=True) where the parameters cannot share a buffer."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.grad = None
    for p, g in zip(params, flat_zeros(params) or [None] * len(params)):
        p.grad = g


def bf16_native(device):
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:  # oneDNN's own check: bf16 instructions (or AVX-512 fast paths) on this CPU
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def head_logits(head, h):
    """The vocabulary projection of states h [n, H] -> logits [n, V], in the head's own precision (fp32 master
    weights) even inside a bf16 autocast: a bf16 logit of size 20 is off by up to 0.06, which would leak
    straight into the ratio, the KL and the IG scores. (Sampling reads the model's own logits: a sample only
    needs the distribution roughly, and every log-prob that enters the loss is recomputed here.)"""
    with torch.autocast(h.device.type, enabled=False):
        return head(h.to(head.weight.dtype)).float()


HEAD_CHUNK = 512  # states whose vocabulary logits exist at once (head_logprobs)


def head_logprobs(head, h, tokens):
    """log π(tokens[n] | state h[n]): the vocabulary projection of only the states whose next token is read.
    h [n, H], tokens [n] -> [n]

    HEAD_CHUNK states at a time, and under autograd each chunk's logits are recomputed in the backward rather
    than kept: the fp32 logits of a micro-batch's policy tokens, and their log-softmax, would take gigabytes
    (3,072 tokens × a 152k vocabulary × 4 bytes = 1.9 GB, twice), more than the rest of the update together."""
    out = []
    for s in range(0, max(h.shape[0], 1), HEAD_CHUNK):  # no state: one empty chunk, still in the graph
        hs, ts = h[s:s + HEAD_CHUNK], tokens[s:s + HEAD_CHUNK]
        if torch.is_grad_enabled() and (hs.requires_grad or head.weight.requires_grad):
            out.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, head, hs, ts, use_reentrant=False))
        else:
            out.append(_chunk_logprobs(head, hs, ts))
    return torch.cat(out)


def _chunk_logprobs(head, h, tokens):
    return head_logits(head, h).log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)


def token_logprobs(model, ids, attention_mask, mask, token_budget=None):
    """log π(ids[b, k] | ids[b, <k]) where mask[b, k], 0 elsewhere. # [B, T]

    One forward per chunk of rows of at most token_budget tokens (token_chunks over the rows' real lengths;
    None: all rows in one forward). The vocabulary projection is applied only at the masked positions: with a
    150k-token vocabulary the full logits of a batch would take gigabytes for nothing (the loss only reads
    policy tokens).

    Rows are right-padded (collate), so the forward needs no attention mask: causal attention alone keeps a
    row's tokens from the padding after them, and the attention kernel then skips the masked half instead of
    reading an explicit [b, n, n] mask."""
    head = model.get_output_embeddings()
    out = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)      # [B, T]
    lengths = attention_mask.sum(-1)                                           # [B]
    if not torch.equal(attention_mask.bool(), torch.arange(ids.shape[1], device=ids.device) < lengths[:, None]):
        raise ValueError("token_logprobs takes right-padded rows: each row's attention mask must be 1s then 0s")
    for sl in token_chunks(lengths.tolist(), token_budget):
        n = int(lengths[sl].max())                         # cut the chunk's own tail of padding
        i, m = ids[sl, :n], mask[sl, :n]
        h = model.base_model(input_ids=i).last_hidden_state  # [b, n, H] causal; positions 0..n-1
        target = m[:, 1:]                                  # token k is predicted at position k - 1
        lp = head_logprobs(head, h[:, :-1][target], i[:, 1:][target])  # [n_target]
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
