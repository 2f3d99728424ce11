"""bf16 autocast (engine.autocast): the forward matmuls in bfloat16, the vocabulary projection, log-softmax, loss
and weights in fp32. Losses, log-probs and IG scores agree with fp32 to a stated tolerance on the tiny model."""
import copy
import math

import pytest
import torch

import engine
import grpo
import rewards

CPU = torch.device("cpu")


def batch(tok):
    texts = ["<think> The Seine flows through Paris. </think> <search> river Paris </search>",
             "<answer> Paris </answer> is the capital of France and its largest city by far"]
    seqs = [tok.encode(t, add_special_tokens=False) for t in texts]
    T = max(len(s) for s in seqs)
    ids = torch.full((2, T), tok.pad_token_id)
    attn = torch.zeros((2, T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)], attn[b, :len(s)] = torch.tensor(s), 1
    mask = attn.bool().clone()
    mask[:, 0] = False
    return ids, attn, mask


def test_autocast_choices():
    assert not torch.is_autocast_enabled("cpu")
    with engine.autocast("bf16", CPU):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with engine.autocast("fp32", CPU):
        assert not torch.is_autocast_enabled("cpu")
    with engine.autocast("auto", CPU):   # tests pin "auto" to fp32 (conftest); a run takes bf16 where native
        assert not torch.is_autocast_enabled("cpu")


def test_head_runs_in_fp32_inside_bf16_autocast(tiny):
    model, _ = tiny
    h = torch.randn(5, model.config.hidden_size)
    head = model.get_output_embeddings()
    with torch.no_grad():
        exact = head(h).float()
        with engine.autocast("bf16", CPU):
            got = engine.head_logits(head, h)
            plain = head(h)              # what autocast alone would give: bf16 logits
    assert got.dtype == torch.float32 and torch.equal(got, exact)
    assert plain.dtype == torch.bfloat16 and not torch.equal(plain.float(), exact)


def sizes_saved(sizes, but):
    """Records the size of each tensor that autograd saves for a backward, but `but`'s (the head's weight: a
    parameter that lives anyway, not memory the backward adds)."""
    def pack(t):
        if t.untyped_storage().data_ptr() != but.untyped_storage().data_ptr():
            sizes.append(t.numel())
        return t
    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def test_head_logprobs_by_chunks_keep_no_logits_for_the_backward(tiny, monkeypatch):
    # 10 states in chunks of 4: the same log-probs and gradients as one log-softmax over all of them, written
    # out; and the backward keeps no logits (nothing saved as large as one chunk's [4, V] but the head's own
    # weight): it recomputes them
    model, _ = tiny
    head = model.get_output_embeddings()
    V = head.weight.shape[0]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, model.config.hidden_size, generator=g, requires_grad=True)
    tokens = torch.randint(0, V, (10,), generator=g)
    logits = h @ head.weight.T                                  # [10, V]
    exact = logits[torch.arange(10), tokens] - logits.logsumexp(-1)
    (w_exact, h_exact) = torch.autograd.grad(exact.sum(), (head.weight, h))
    monkeypatch.setattr(engine, "HEAD_CHUNK", 4)
    saved, rows = [], []
    hook = head.register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    with sizes_saved(saved, but=head.weight):
        got = engine.head_logprobs(head, h, tokens)
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)
    (w_got, h_got) = torch.autograd.grad(got.sum(), (head.weight, h))
    hook.remove()
    assert rows[:3] == [4, 4, 2] and sorted(rows[3:]) == [2, 4, 4]  # the chunks; each again in the backward
    torch.testing.assert_close(w_got, w_exact, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(h_got, h_exact, rtol=1e-4, atol=1e-6)
    assert saved and max(saved) < 4 * V
    with torch.no_grad():  # no autograd: plain chunks, the same numbers
        torch.testing.assert_close(engine.head_logprobs(head, h, tokens), exact.detach(), rtol=1e-5, atol=1e-5)


def test_head_logprobs_backward_by_hand_on_a_toy_head_with_a_bias():
    # V = 3, H = 2, two states h = (1, 2) and (0, 0) whose token is 2, each weighted by 0.5 in the loss.
    # W's rows (0, 0), (1, 0), (0, 1); b = (0, 0, ln 2 - 2). Logits x = W h + b:
    #   state 1: (0, 1, ln 2); softmax (1, e, 2) / (3 + e) = (0.17488, 0.47537, 0.34975)
    #   state 2: (0, 0, ln 2 - 2); softmax (1, 1, 2/e²) / (2 + 2/e²) = (0.44040, 0.44040, 0.11920)
    # d_i = 0.5·(onehot(2) − softmax_i): (−0.08744, −0.23768, 0.32512) and (−0.22020, −0.22020, 0.44040);
    # db = d_1 + d_2 (a sum over states, not a mean), dW = Σ_i d_i h_iᵀ = d_1 (1, 2)ᵀ, dh_i = Wᵀ d_i = (d_i1, d_i2)
    head = torch.nn.Linear(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
        head.bias.copy_(torch.tensor([0.0, 0.0, math.log(2.0) - 2.0]))
    h = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    lp = engine.head_logprobs(head, h, torch.tensor([2, 2]))
    e = math.e
    torch.testing.assert_close(lp, torch.tensor([math.log(2 / (3 + e)), math.log((2 / e ** 2) / (2 + 2 / e ** 2))]))
    (0.5 * lp.sum()).backward()
    d1 = torch.tensor([-0.08744, -0.23768, 0.32512])
    d2 = torch.tensor([-0.22020, -0.22020, 0.44040])
    close = lambda got, want: torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    close(head.bias.grad, d1 + d2)
    close(head.weight.grad, torch.stack([d1, 2 * d1], dim=1))
    close(h.grad, torch.stack([d1[1:], d2[1:]]))


def test_head_weight_gradient_is_a_plain_tensor_the_tied_embedding_adds_into(tiny):
    # the head's weight gradient comes back contiguous and not a view (autograd adds the tied input embedding's
    # gradient into such a tensor in place, rather than holding a third [V, H] for their sum), and the tied
    # model's gradient of that one weight is the sum of the head's and the embedding's paths
    model, _ = tiny
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    assert head.weight is emb.weight                            # the tiny model ties them, as SmolLM2 and Qwen do
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, head.weight.shape[0], (7,), generator=g)
    tokens = torch.randint(0, head.weight.shape[0], (7,), generator=g)
    h = torch.randn(7, model.config.hidden_size, generator=g)
    (w_head,) = torch.autograd.grad(engine.head_logprobs(head, h, tokens).sum(), (head.weight,))
    assert w_head.is_contiguous() and w_head._base is None
    x = emb(ids)                                                 # the embedding path, [7, H]
    (w_both,) = torch.autograd.grad(engine.head_logprobs(head, h + x, tokens).sum(), (head.weight,))
    logits = (h + emb.weight[ids]) @ head.weight.T
    (w_exact,) = torch.autograd.grad((logits[torch.arange(7), tokens] - logits.logsumexp(-1)).sum(), (head.weight,))
    torch.testing.assert_close(w_both, w_exact, rtol=1e-4, atol=1e-6)


def test_head_logprobs_when_only_the_states_or_only_the_head_need_a_gradient(tiny, monkeypatch):
    # a frozen head (weights without grad) under states that need one: the backward still recomputes each
    # chunk's logits instead of keeping them, and the states' gradient is the written-out log-softmax's
    model, _ = tiny
    head = model.get_output_embeddings()
    V = head.weight.shape[0]
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, model.config.hidden_size, generator=g, requires_grad=True)
    tokens = torch.randint(0, V, (6,), generator=g)
    monkeypatch.setattr(engine, "HEAD_CHUNK", 4)
    monkeypatch.setattr(head.weight, "requires_grad", False)
    logits = h @ head.weight.T
    (h_exact,) = torch.autograd.grad((logits[torch.arange(6), tokens] - logits.logsumexp(-1)).sum(), (h,))
    saved = []
    with sizes_saved(saved, but=head.weight):
        got = engine.head_logprobs(head, h, tokens)
    (h_got,) = torch.autograd.grad(got.sum(), (h,))
    torch.testing.assert_close(h_got, h_exact, rtol=1e-4, atol=1e-6)
    assert saved and max(saved) < 4 * V
    # and the other way round, a trainable head over states without a gradient (a frozen body): the head's
    # gradient still arrives (a reentrant checkpoint would drop it: none of its inputs needs a gradient)
    monkeypatch.setattr(head.weight, "requires_grad", True)
    h = h.detach()
    logits = h @ head.weight.T
    (w_exact,) = torch.autograd.grad((logits[torch.arange(6), tokens] - logits.logsumexp(-1)).sum(), (head.weight,))
    (w_got,) = torch.autograd.grad(engine.head_logprobs(head, h, tokens).sum(), (head.weight,))
    torch.testing.assert_close(w_got, w_exact, rtol=1e-4, atol=1e-6)


def test_bf16_reference_keeps_its_linear_layers_in_bf16_and_gives_the_same_logprobs(tiny):
    # under bf16 forwards, a linear layer's weights are cast to bf16 in every forward anyway: a reference that
    # stores them so gives bit-identical log-probs; the head (tied to the embedding here) and the norms stay fp32
    model, tok = tiny
    ids, attn, mask = batch(tok)
    ref = engine.frozen_copy(model, "bf16")
    head = ref.get_output_embeddings()
    linears = [m for m in ref.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert head.weight.dtype == torch.float32 and ref.get_input_embeddings().weight.dtype == torch.float32
    assert all(not p.requires_grad for p in ref.parameters()) and not ref.training
    bf16_bytes = sum(p.numel() * p.element_size() for p in ref.parameters())
    assert bf16_bytes < sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad(), engine.autocast("bf16", CPU):
        assert torch.equal(grpo.token_logprobs(ref, ids, attn, mask), grpo.token_logprobs(model, ids, attn, mask))
    # the policy is left as it was (fp32, trainable), and the copy shares no weight with it
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    policy_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not policy_ptrs & {p.data_ptr() for p in ref.parameters()}
    assert ref.get_output_embeddings().weight is ref.get_input_embeddings().weight  # still tied, one tensor
    # fp32 forwards: an fp32 copy
    assert all(p.dtype == torch.float32 for p in engine.frozen_copy(model, "fp32").parameters())


def test_bf16_logprobs_and_loss_agree_with_fp32(tiny):
    model, tok = tiny
    ids, attn, mask = batch(tok)
    A = torch.where(mask, torch.linspace(-1, 1, ids.numel()).view(ids.shape), torch.zeros(()))
    with torch.no_grad():
        lp32 = grpo.token_logprobs(model, ids, attn, mask)
        with engine.autocast("bf16", CPU):
            lp16 = grpo.token_logprobs(model, ids, attn, mask)
    assert lp16.dtype == torch.float32
    assert (lp16 - lp32).abs().max() < 0.05                 # per token, nats
    assert (lp16 - lp32).abs().max() > 0                    # bf16 really ran
    ref = lp32 - 0.1
    loss32, _ = grpo.grpo_loss(lp32, lp32, ref, A, mask, beta_kl=0.1)
    loss16, _ = grpo.grpo_loss(lp16, lp16, ref, A, mask, beta_kl=0.1)
    assert float(loss16) == pytest.approx(float(loss32), abs=5e-3)
    w32, w16 = grpo.warmup_loss(lp32, mask), grpo.warmup_loss(lp16, mask)
    assert float(w16) == pytest.approx(float(w32), abs=0.02)


def test_bf16_gradients_point_the_same_way(tiny):
    model, tok = tiny
    ids, attn, mask = batch(tok)
    grads = {}
    for prec in ("fp32", "bf16"):
        model.zero_grad()
        with engine.autocast(prec, CPU):
            lp = grpo.token_logprobs(model, ids, attn, mask)
        grpo.warmup_loss(lp, mask).backward()
        grads[prec] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        assert all(p.dtype == torch.float32 for p in model.parameters())   # master weights stay fp32
    model.zero_grad()
    cos = torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], dim=0)
    assert cos > 0.99


def test_bf16_ig_scores_agree_with_fp32(tiny):
    model, tok = tiny
    prefix = tok.encode("Question: who wrote Hamlet? <search> Hamlet author </search>", add_special_tokens=False)
    suffixes = [tok.encode(t, add_special_tokens=False) for t in
                ["<information> Hamlet is a play by William Shakespeare. </information> <answer>",
                 "<information> The Danube flows through Vienna. </information> <answer>"]]
    golds = [tok.encode(" William Shakespeare", add_special_tokens=False)] * 2
    s32 = rewards.gold_scorer(model, prefix)(suffixes, golds)
    with engine.autocast("bf16", CPU):
        s16 = rewards.gold_scorer(model, prefix)(suffixes, golds)
    assert (s16 - s32).abs().max() < 0.05
    ig32, ig16 = float(s32[0] - s32[1]), float(s16[0] - s16[1])   # the IG of the real block over the other
    assert ig16 == pytest.approx(ig32, abs=0.05)


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(tiny):
    model, tok = tiny
    ids, attn, mask = batch(tok)
    # a pre-hook inside the checkpointed layer (the layer's own hooks stay outside it; a recompute stops as
    # soon as it has what the backward needs, before any module inside it returns)
    calls = []
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(lambda *a: calls.append(1))
    grads = {}
    try:
        for on in (False, True, False):  # off again after on: set once, it acts only inside recompute
            model.zero_grad(set_to_none=True)
            calls.clear()
            with engine.recompute(model, on):
                assert model.training == on  # transformers checkpoints in train mode only
                loss = grpo.warmup_loss(grpo.token_logprobs(model, ids, attn, mask), mask)
            assert not model.training  # back in eval mode
            loss.backward()  # outside, as in update_policy and the warm-up: the recompute runs here
            # once per forward; with checkpointing once more, in the backward
            assert len(calls) == (2 if on else 1), (on, len(calls))
            grads[on] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 10
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-5, atol=1e-7, msg=n)
    assert any(g.abs().sum() > 0 for g in grads[True].values())


def update_of_two_rows(tiny, precision, grad_checkpointing, on_forward):
    """A copy of the tiny model, and update(micro): ranks.accumulate_gradients over row slices of batch()'s two
    rows with the warm-up loss, calling on_forward(slice) in each forward; it returns the gradients."""
    import ranks
    from types import SimpleNamespace
    model, tok = tiny
    model = copy.deepcopy(model)
    ids, attn, mask = batch(tok)
    cfg = SimpleNamespace(precision=precision, grad_checkpointing=grad_checkpointing)

    def forward(sl):
        on_forward(sl)
        return grpo.token_logprobs(model, ids[sl], attn[sl], mask[sl])

    def update(micro):
        ranks.accumulate_gradients(model, micro, forward,
                                   lambda logp, sl: (grpo.warmup_loss(logp, mask[sl], mask.sum()), None), cfg)
        return gradients(model)
    return update, model


def gradients(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_the_update_runs_bf16_without_autocasts_weight_cache_and_gets_the_same_gradients(tiny, monkeypatch):
    # autocast's cache would hold a bf16 copy of every linear layer until the forward's context exits; a training
    # forward reads each weight once, so without the cache the gradients are the same bit for bit
    seen = []
    update, _ = update_of_two_rows(tiny, "bf16", True, lambda sl: seen.append(
        (torch.is_autocast_enabled("cpu"), torch.is_autocast_cache_enabled())))
    without = update([slice(0, 1), slice(1, 2)])
    assert seen == [(True, False)] * 2  # bf16 forwards, no cache, in each micro-batch
    seen.clear()
    real = engine.autocast
    monkeypatch.setattr(engine, "autocast", lambda precision, device, cache=True: real(precision, device, True))
    cached = update([slice(0, 1), slice(1, 2)])
    assert seen == [(True, True)] * 2
    assert sum(bool(g.abs().sum() > 0) for g in without.values()) > 10
    for n in without:
        assert torch.equal(without[n], cached[n]), n


def test_the_heap_is_trimmed_before_each_micro_batch_and_before_its_backward(tiny, monkeypatch):
    # what the last forward or backward freed is handed back before each micro-batch's forward, and what its
    # forward's layers freed before its backward: two trims a micro-batch, the first two before any gradient
    # (before and after the first forward), the last two with the first micro-batch's gradient added
    forwards = []
    update, model = update_of_two_rows(tiny, "fp32", False, forwards.append)
    first = update([slice(0, 1)])
    seen, forwards[:] = [], []
    monkeypatch.setattr(engine, "trim_heap", lambda: seen.append((len(forwards), gradients(model))))
    both = update([slice(0, 1), slice(1, 2)])
    assert [k for k, _ in seen] == [0, 1, 1, 2]  # forwards run before each trim
    assert sum(bool(g.abs().sum() > 0) for g in first.values()) > 10
    for n in first:
        assert not seen[0][1][n].any() and not seen[1][1][n].any(), n
        assert torch.equal(seen[2][1][n], first[n]) and torch.equal(seen[3][1][n], first[n]), n
    assert any(not torch.equal(first[n], both[n]) for n in first)


def test_adamw_is_fused_and_steps_like_plain_adamw():
    # the fused kernel where torch has one (the CPU has), and the same three updates as the for-each AdamW
    torch.manual_seed(0)
    a = torch.nn.Linear(6, 4)
    b = copy.deepcopy(a)
    opt_a, opt_b = engine.adamw(a.parameters(), 1e-2), torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.0)
    assert opt_a.defaults["fused"] is True and opt_a.defaults["weight_decay"] == 0.0
    for step in range(3):
        x = torch.randn(5, 6)
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6) and not torch.equal(p, torch.zeros_like(p))
    # its moments were made up front, each as views into one buffer, and the fused steps wrote them in place
    for key in ("exp_avg", "exp_avg_sq"):
        got = [opt_a.state[p][key] for p in a.parameters()]
        assert len({t.untyped_storage().data_ptr() for t in got}) == 1
        torch.testing.assert_close(got[0], opt_b.state[b.weight][key], rtol=1e-5, atol=1e-7)  # fused vs for-each
        assert float(got[1].abs().sum()) > 0
    assert float(opt_a.state[a.weight]["step"]) == 3.0


def test_flat_grads_add_every_backward_into_one_buffer():
    # two backwards (two micro-batches) into views of one buffer give the gradients of plain zero_grad; and a
    # second call drops the first buffer's values (the next step starts from zero)
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 3))
    b = copy.deepcopy(a)
    x1, x2 = torch.randn(5, 6), torch.randn(2, 6)
    for _ in range(2):  # twice: the second starts again from zeros
        engine.flat_grads(a.parameters())
        for x in (x1, x2):
            a(x).square().sum().backward()
    b.zero_grad(set_to_none=True)
    for x in (x1, x2):
        b(x).square().sum().backward()
    grads = [p.grad for p in a.parameters()]
    assert len({g.untyped_storage().data_ptr() for g in grads}) == 1  # still views: added in place
    for g, q in zip(grads, b.parameters()):
        torch.testing.assert_close(g, q.grad, rtol=0, atol=1e-6)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    engine.flat_grads(frozen.parameters())
    assert frozen.weight.grad is None  # parameters that do not train get none
