"""Low-rank adapters (lora.py, METHOD §3.5): the base's numbers at init, only A and B train, the reference is
the policy with its adapters off, merge, checkpoints and resume, and the refusals."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import engine
import experiments
import grpo
import igsearch
import lora
import ranks_worker as W
import runs
from retrieve import DataError
from test_runs import metrics, train_argv, varied_reward  # noqa: F401 (a fixture)

RANK = 4
N_ADAPTED = 2 * 7  # 2 decoder layers of the tiny Qwen3, each with q, k, v, o, gate, up, down


def sample_ids(vocab, shape=(2, 12), seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def adapter_names(model):
    return {n for n, _ in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}


@pytest.fixture(scope="module")
def stepped(tmp_path_factory):
    """One train_step of IG-Search with adapters on scripted rollouts (tests/ranks_worker.py's, the two-rank
    test's one-process side): 2 PPO epochs, so 2 optimizer steps, and a KL to the reference."""
    return W.one_step(tmp_path_factory.mktemp("bm25"), lora_rank=RANK)


def test_at_init_the_adapted_model_computes_the_base_models_numbers_bit_for_bit(tiny):
    base, tok = tiny
    ids = sample_ids(len(tok))
    assert lora.adapt(copy.deepcopy(base), 0).state_dict().keys() == base.state_dict().keys()  # rank 0: as ever
    model = lora.adapt(copy.deepcopy(base), RANK)
    adapted = lora.layers(model)
    assert len(adapted) == N_ADAPTED and all(type(m) is lora.LoRALinear for m in adapted)
    for m in adapted:  # B = 0; A is not, or the equality below would hold for any A and prove less
        bound = m.in_features ** -0.5
        assert torch.count_nonzero(m.lora_B) == 0 and 0 < m.lora_A.abs().max() <= bound
        assert m.lora_scale == 2.0  # α = 0 means 2r: α / r = 2
    assert set(model.state_dict()) - adapter_names(model) == set(base.state_dict())  # the base's names kept
    assert torch.equal(logits(model, ids), logits(base, ids))

    held = lora.adapt(copy.deepcopy(base), RANK, bf16=True)  # the frozen base in bf16, as its forwards cast it
    attn = held.model.layers[0].self_attn
    assert attn.q_proj.weight.dtype == torch.bfloat16 and attn.q_proj.lora_A.dtype == torch.float32
    assert held.get_output_embeddings().weight.dtype == torch.float32  # the head (tied embeddings) stays fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(logits(held, ids), logits(base, ids))
    rounded = copy.deepcopy(base)  # outside autocast the bf16 weights are cast back: the base, rounded to bf16
    for m in lora.layers(held):
        name = next(n for n, x in held.named_modules() if x is m)
        rounded.get_submodule(name).weight.data = m.weight.float()
    assert torch.equal(logits(held, ids), logits(rounded, ids))


def test_after_a_step_only_a_and_b_changed_and_only_they_hold_adam_state(stepped):
    init = lora.adapt(W.tiny_model(0)[0], RANK)  # A is drawn from the run's seed: the step's starting adapters
    start, after = init.state_dict(), stepped["weights"]
    names = adapter_names(init)
    assert set(after) == {n for n, _ in init.named_parameters()} and len(names) == 2 * N_ADAPTED
    for n, w in after.items():
        if n in names:
            assert not torch.equal(w, start[n]), f"{n} did not train"  # B moves in step 1, A in step 2 (B ≠ 0)
        else:
            assert torch.equal(w, start[n]), f"{n}, a base weight, changed"
    assert set(stepped["grads"]) == names  # only A and B got gradients
    state = stepped["opt_state"]["state"]
    shapes = sorted(tuple(p.shape) for n, p in init.named_parameters() if n in names)
    assert sorted(tuple(s["exp_avg"].shape) for s in state.values()) == shapes  # AdamW's moments: A and B only


def test_the_reference_is_the_policy_with_its_adapters_off_and_equals_a_frozen_copy(stepped, tiny):
    model, tok = stepped["model"], stepped["tok"]
    ids = sample_ids(len(tok), (3, 10), seed=1)
    attn, mask = torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool)
    frozen = engine.frozen_copy(W.tiny_model(0)[0], "fp32")  # the initial policy, as a run without adapters holds it
    with torch.no_grad():
        on = grpo.token_logprobs(model, ids, attn, mask)
        with lora.reference(lora.Reference(model)) as ref:
            off = grpo.token_logprobs(ref, ids, attn, mask)
        again = grpo.token_logprobs(model, ids, attn, mask)
        want = grpo.token_logprobs(frozen, ids, attn, mask)
    assert torch.equal(off, want)
    assert (on - want).abs().max() > 1e-5, "the adapters must have trained, or off = on proves nothing"
    assert torch.equal(again, on)  # switched on again after the block

    # bf16: the adapted model's base held in bf16 against frozen_copy's bf16 linears, both under autocast
    base = tiny[0]
    held = lora.adapt(copy.deepcopy(base), RANK, bf16=True)
    for m in lora.layers(held):
        torch.nn.init.normal_(m.lora_B, std=0.1, generator=torch.Generator().manual_seed(2))
    frozen16 = engine.frozen_copy(base, "bf16")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with lora.adapters_off(held):
            off16 = grpo.token_logprobs(held, ids, attn, mask)
        on16 = grpo.token_logprobs(held, ids, attn, mask)
        assert torch.equal(off16, grpo.token_logprobs(frozen16, ids, attn, mask))
    assert (on16 - off16).abs().max() > 1e-3


def test_gradient_of_one_adapted_layer_by_hand():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 2, bias=False)

    toy = Toy()
    lora.adapt(toy, 1, alpha=2.0, targets="proj")  # α / r = 2
    m = toy.proj
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[1., 0., 2.], [0., 1., -1.]]))
        m.lora_A.copy_(torch.tensor([[1., 2., 0.]]))
        m.lora_B.copy_(torch.tensor([[1.], [-1.]]))
    x, g = torch.tensor([1., 1., 2.]), torch.tensor([1., 2.])
    y = toy.proj(x)
    # W x = [5, -1]; A x = 3; (α / r) B A x = 2 · [3, -3] = [6, -6]
    assert y.tolist() == [11., -7.]
    (g * y).sum().backward()  # dL/dy = g
    # dL/dB = (α / r) · g (A x)ᵀ = 2 · [1, 2]ᵀ · 3;  dL/dA = (α / r) · (Bᵀ g) xᵀ = 2 · (1 - 2) · [1, 1, 2]
    assert m.lora_B.grad.tolist() == [[6.], [12.]]
    assert m.lora_A.grad.tolist() == [[-2., -2., -4.]]
    assert m.weight.grad is None and not m.weight.requires_grad


def test_a_merged_model_computes_the_adapted_forward(tiny, tmp_path):
    base, tok = tiny
    ids = sample_ids(len(tok), seed=3)
    model = lora.adapt(copy.deepcopy(base), RANK)
    for m in lora.layers(model):  # large adapters: the merged model is far from the base
        torch.nn.init.normal_(m.lora_B, std=0.1, generator=torch.Generator().manual_seed(4))
    adapted = logits(model, ids)
    merged = lora.merge(copy.deepcopy(model))
    assert not lora.layers(merged) and not lora.adapted(merged)
    assert merged.state_dict().keys() == base.state_dict().keys()
    assert all(p.requires_grad and p.dtype == torch.float32 for p in merged.parameters())
    got = logits(merged, ids)
    # fp32: (W + sBA) x and W x + s B (A x) round differently; logits of size ~1 agree to a few ulps of 1
    assert (got - adapted).abs().max() < 1e-5
    assert (got - logits(base, ids)).abs().max() > 1e-2
    runs.save_model(merged, tok, tmp_path / "m")
    loaded, _, _ = runs.load_model(str(tmp_path / "m"), torch.device("cpu"))
    assert torch.equal(logits(loaded, ids), got)  # a plain model: save_pretrained and back, unchanged


def adapters(run, step):
    return load_file(run / "ckpt" / f"step_{step:06d}" / "adapters" / "adapters.safetensors")


def test_resume_with_adapters_gives_the_uninterrupted_run(tmp_path, varied_reward):  # noqa: F811
    straight, split = tmp_path / "straight", tmp_path / "split"
    flags = ["--lora-rank", str(RANK), "--beta-kl", "0.05"]
    assert igsearch.main(train_argv(tmp_path, straight, 3) + flags) == 0
    assert igsearch.main(train_argv(tmp_path, split, 2) + flags) == 0
    assert igsearch.main(["--resume", str(split), "--steps", "3"]) == 0
    assert metrics(split) == metrics(straight) and [m["step"] for m in metrics(split)] == [0, 1, 2]
    a, b = adapters(straight, 3), adapters(split, 3)
    assert a.keys() == b.keys() and len(a) == 2 * N_ADAPTED and all(torch.equal(a[k], b[k]) for k in a)
    w2 = adapters(straight, 2)
    assert not all(torch.equal(a[k], w2[k]) for k in a), "the adapters must move, or the test proves nothing"
    step = split / "ckpt" / "step_000003"
    assert not (step / "model").exists()  # the adapters alone: the base is the run's --model
    assert json.loads((step / "adapters" / "adapter_config.json").read_text())["rank"] == RANK


def test_merge_writes_a_plain_model_and_eval_reads_the_run(tmp_path, varied_reward, capsys):  # noqa: F811
    run, out = tmp_path / "run", tmp_path / "merged"
    assert igsearch.main(train_argv(tmp_path, run, 1) + ["--lora-rank", str(RANK)]) == 0
    assert igsearch.main(["merge", str(run), str(out)]) == 0
    merged, tok, _ = runs.load_model(str(out), torch.device("cpu"))
    assert not lora.adapted(merged) and "lora" not in " ".join(load_file(out / "model.safetensors"))
    # independently: the base, adapted, with the checkpoint's adapters loaded, run unmerged
    model = lora.adapt(runs.tiny_random_model(0)[0], RANK)
    model.load_state_dict(adapters(run, 1), strict=False)
    ids = sample_ids(len(tok), seed=5)
    assert (logits(merged, ids) - logits(model, ids)).abs().max() < 1e-5  # as in the test above
    assert (logits(merged, ids) - logits(runs.tiny_random_model(0)[0], ids)).abs().max() > 0  # it trained
    from_run = experiments.load_run_model(run, torch.device("cpu"))[0]  # what eval of the run loads
    assert torch.equal(logits(from_run, ids), logits(merged, ids))
    assert experiments.main(["eval", "--model", str(run), "--limit", "1"]) == 0
    capsys.readouterr()
    assert igsearch.main(["merge", str(run), str(out)]) == 2  # never over a model
    assert "is not an empty directory" in capsys.readouterr().err


def one_line_error(capsys, needle):
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_adapters_refuse_another_base_in_one_line(tmp_path, varied_reward, capsys):  # noqa: F811
    run = tmp_path / "run"
    assert igsearch.main(train_argv(tmp_path, run, 1) + ["--lora-rank", str(RANK)]) == 0
    path, weights, _, _ = runs.last_checkpoint(run)
    other = lora.adapt(runs.tiny_random_model(seed=1)[0], RANK)  # the same shapes, other weights
    with pytest.raises(DataError, match="trained on another base model"):
        lora.check_checkpoint(path, other, weights)
    capsys.readouterr()
    assert igsearch.main(["--resume", str(run), "--steps", "2", "--lora-rank", "8"]) == 2
    one_line_error(capsys, "adapters of lora_rank 4, this run has 8")
    assert igsearch.main(["--resume", str(run), "--steps", "2", "--lora-rank", "0"]) == 2
    one_line_error(capsys, "holds adapters (--lora-rank 4) and this run trains whole weights")
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "seed": 1}))  # tiny-random of seed 1: another base
    assert igsearch.main(["merge", str(run), str(tmp_path / "merged")]) == 2
    one_line_error(capsys, "trained on another base model")
    full = tmp_path / "full"
    assert igsearch.main(train_argv(tmp_path, full, 1)) == 0
    capsys.readouterr()
    assert igsearch.main(["merge", str(full), str(tmp_path / "m2")]) == 2
    one_line_error(capsys, "hold whole models (trained without --lora-rank)")


def test_bad_adapter_settings_are_one_line_errors(tmp_path, capsys):
    assert igsearch.main(train_argv(tmp_path, tmp_path / "a", 1) + ["--lora-rank", "4", "--lora-targets",
                                                                    "q_proj,qproj"]) == 2
    one_line_error(capsys, "--lora-targets 'q_proj,qproj': qproj names no linear layer of this model")
    assert igsearch.main(train_argv(tmp_path, tmp_path / "b", 1) + ["--lora-rank", "-1"]) == 2
    one_line_error(capsys, "--lora-rank -1: must be at least 0")


def test_a_lora_warmup_is_merged_into_the_base_that_grpos_adapters_start_from(tmp_path, varied_reward):  # noqa: F811
    run = tmp_path / "run"
    argv = train_argv(tmp_path, run, 1) + ["--lora-rank", str(RANK), "--warmup-steps", "1", "--warmup-batch", "2",
                                           "--max-turn-tokens", "64", "--max-response-tokens", "512"]
    assert igsearch.main(argv) == 0
    warm = load_file(run / "warmup" / "model" / "model.safetensors")
    base = runs.tiny_random_model(0)[0].state_dict()
    assert warm.keys() <= base.keys()  # a plain model: no adapters in it
    moved = {k for k in warm if not torch.equal(warm[k], base[k])}
    assert moved and all(k.endswith(tuple(f"{t}.weight" for t in lora.TARGETS.split(","))) for k in moved)
    # GRPO's adapters sit on the warmed-up base: "adapters off" is the warm-up's model
    saved = json.loads((run / "ckpt" / "step_000001" / "adapters" / "adapter_config.json").read_text())
    warmed, _, _ = runs.load_model(str(run / "warmup" / "model"), torch.device("cpu"))
    assert saved["fingerprint"] == lora.fingerprint(warmed) != lora.fingerprint(runs.tiny_random_model(0)[0])
