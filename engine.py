"""The engine under the algorithm: batched generation with a KV cache, the token budgets, and the precision
and memory plumbing of every forward pass and update.

grpo.py says what a training step computes; this file says how its forward passes run fast and fit in memory
while computing that: one turn of every active rollout sampled at once (generate_turn), batches cut by tokens
rather than rows (token_chunks), bf16 matmuls around an fp32 vocabulary head (autocast, head_logprobs), and the
buffers that keep memory flat from step to step (frozen_copy, adamw, flat_grads). It is a module of its own so
that grpo.py reads as the method alone; each piece here is checked against the plain computation it stands in
for (tests/test_engine.py, tests/test_precision.py, tests/test_budget.py).

Reading note: none of this is needed to follow METHOD.md. Read grpo.py first and come here for what one of its
calls does underneath. This module imports torch and transformers only: grpo and the modules above it import
it, never the other way. What each choice costs and saves is measured in docs/PERFORMANCE.md, not here.
"""
import contextlib
import copy
import ctypes

import torch
import torch.utils.checkpoint
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer


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
# Precision: bf16 forwards where the hardware computes them natively, an fp32 vocabulary head

def autocast(precision, device, cache=True):
    """The forward passes' precision: "bf16" autocasts matmuls to bfloat16, "fp32" runs them in float32, "auto"
    takes bf16 where the hardware computes it natively (a GPU with bf16, a CPU with AVX-512 or AMX) and fp32
    elsewhere. Weights, optimizer state, log-softmax and losses stay fp32 in every case (see head_logprobs).

    cache=False: no bf16 copy of a weight outlives the op that used it. Generation reads every weight once per
    token and wants the cache; a training forward reads each weight once, so there the cache only keeps a bf16
    copy of every linear layer alive until the context exits, on top of the gradients (ranks.accumulate_gradients)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_forwards(precision, device),
                          cache_enabled=cache)


def bf16_forwards(precision, device):
    """Whether `precision` (auto | bf16 | fp32) runs the forwards in bf16 on `device`."""
    return precision == "bf16" or (precision == "auto" and bf16_native(device))


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

    HEAD_CHUNK states at a time, and under autograd through HeadLogprobs, which keeps no logits for the
    backward: the fp32 logits of a micro-batch's policy tokens, and their log-softmax, would take gigabytes
    (3,072 tokens × a 152k vocabulary × 4 bytes = 1.9 GB, twice), more than the rest of the update together."""
    out = []
    for s in range(0, max(h.shape[0], 1), HEAD_CHUNK):  # no state: one empty chunk, still in the graph
        hs, ts = h[s:s + HEAD_CHUNK], tokens[s:s + HEAD_CHUNK]
        if torch.is_grad_enabled() and (hs.requires_grad or head.weight.requires_grad):
            out.append(HeadLogprobs.apply(hs, ts, head, head.weight, head.bias))
        else:
            out.append(_chunk_logprobs(head, hs, ts))
    return torch.cat(out)


def _chunk_logprobs(head, h, tokens):
    """log_softmax(h W^T + b) at the tokens, x_t − m − log Σ_v exp(x_v − m) with m = max x, computed in the
    logits' own buffer: log_softmax would return a second [n, V] tensor only for one entry a row to be read."""
    x = head_logits(head, h)                                    # [n, V] fp32
    m = x.amax(-1, keepdim=True)                                # [n, 1]
    x_t = x.gather(-1, tokens[:, None])                         # [n, 1]
    return (x_t - m - x.sub_(m).exp_().sum(-1, keepdim=True).log()).squeeze(-1)


class HeadLogprobs(torch.autograd.Function):
    """One chunk's log-probs with a backward written out, in one [n, V] buffer. With x = h W^T + b the logits of
    a state and t its token, d(x_t − logsumexp x)/dx = onehot(t) − softmax(x): the backward recomputes x, turns
    it into softmax(x) in place, then into the logits' gradient g·(onehot(t) − softmax(x)) in place. Autograd's
    own backward (log_softmax, gather, the matmul) would hold three or four [n, V] tensors at once, and return
    the head's weight gradient as a transposed view, which the tied input embedding's gradient cannot be added
    into in place. Checked against autograd on the written-out formula (tests/test_precision.py).

    >>> head = torch.nn.Linear(2, 3, bias=False); _ = head.weight.data.zero_()  # logits 0: uniform over 3
    >>> lp = HeadLogprobs.apply(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), head, head.weight, None)
    >>> lp.backward(); lp.detach(), head.weight.grad[:, 0]  # log 1/3; (onehot − 1/3) times h's first entry
    (tensor([-1.0986]), tensor([ 0.6667, -0.3333, -0.3333]))"""

    @staticmethod
    def forward(ctx, h, tokens, head, weight, bias):  # weight, bias: head's own, for autograd to route their gradients
        ctx.head = head
        ctx.save_for_backward(h, tokens, weight)  # the states, not the logits: those are [n, V]
        return _chunk_logprobs(head, h, tokens)

    @staticmethod
    def backward(ctx, g):                                       # g [n]: d loss / d log-prob
        h, tokens, weight = ctx.saved_tensors
        x = head_logits(ctx.head, h)                            # [n, V] fp32, the one buffer
        x.sub_(x.amax(-1, keepdim=True)).exp_()
        x.div_(x.sum(-1, keepdim=True))                         # softmax(x)
        x.mul_(-g[:, None].float())
        x[torch.arange(len(tokens), device=x.device), tokens] += g.float()  # g·(onehot(t) − softmax(x))
        x = x.to(weight.dtype)
        grad_h = (x @ weight).to(h.dtype) if ctx.needs_input_grad[0] else None      # [n, H]
        grad_w = x.t().mm(h.to(weight.dtype)) if ctx.needs_input_grad[3] else None  # [V, H], contiguous
        grad_b = x.sum(0) if ctx.needs_input_grad[4] else None                       # [V]
        return grad_h, None, None, grad_w, grad_b


# ----------------------------------------------------------------------------------------------------
# Memory: recomputed activations, a bf16 reference, and the buffers that keep the heap flat

def trim_heap():
    """Hand the heap's free pages back to the operating system (glibc's malloc_trim). Tensors under the mmap
    threshold (runs.steady_heap) come from the heap, and the pages they freed stay in the process until a trim;
    a no-op where libc has no malloc_trim."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
