"""The roofline's pieces, shared by bench_step.py and bench_versions.py: the decoder's matmul parameters P, the
token positions its forwards compute, and the machine's dense matmul rate at the model's sizes. A phase's FLOPs
are counted as 2·P per position of a forward without gradient and 6·P per position of one with (forward and
backward), and the same for the vocabulary head at the positions it projects (its V·H parameters): every
position in a plain forward, only the read ones in ours (the last of a prompt in generation, policy tokens in
the update, gold tokens in IG scoring). Attention's T² term is left out, so the counts, and the rates made from
them, are if anything understated. Imports torch only: bench_versions runs it inside older trees."""
import time

import torch


def body_params(model):
    """Parameters of the decoder's matmuls (every Linear but the vocabulary head): 2 FLOPs each per token
    forward. The head is counted apart (Positions), at the positions it projects."""
    head = model.get_output_embeddings()
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)


class Positions:
    """Token positions the decoder computes, counted by a pre-hook on its base model (real tokens where an
    attention mask says which; every position otherwise, as right-padded rows without a mask are computed):
    `n` in all, `grad` of them in forwards that record a graph (a backward follows); and the states its
    vocabulary head projects, by a pre-hook on the head: `head_n`, `head_grad`. The recomputed forwards of
    gradient checkpointing are not counted: they are not work a step needs (the layers' run without the base
    model; the head's chunks run again inside the backward, which the head's hook tells by autograd's graph task
    id).

    `head_n` counts rows of whatever the head is given, padding included: the engine projects one state a row
    (logits_to_keep=1), and our log-prob forwards only the real tokens they read."""

    def __init__(self, model):
        self.n = self.grad = self.head_n = self.head_grad = 0
        head = model.get_output_embeddings()
        self.head_params = head.weight.numel()
        self.hooks = [model.base_model.register_forward_pre_hook(self.count, with_kwargs=True),
                      head.register_forward_pre_hook(self.count_head)]

    def count(self, module, args, kwargs):
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        attn = kwargs.get("attention_mask")
        k = int(attn[:, -ids.shape[1]:].sum()) if attn is not None else ids.numel()
        self.n += k
        self.grad += k if torch.is_grad_enabled() else 0

    def count_head(self, module, args):
        if torch._C._current_graph_task_id() != -1:  # inside a backward: a chunk's recomputation
            return
        k = args[0].shape[:-1].numel()
        self.head_n += k
        self.head_grad += k if args[0].requires_grad else 0  # states in a graph: a backward follows (in
        # engine.HeadLogprobs's forward grad mode is off, so torch.is_grad_enabled() cannot tell)

    def flops(self, P, adapters=None):
        """2·P per position, and 4·P more per position that is back-propagated (the gradients of the
        activations and of the weights); the same for the head's parameters per state it projects.
        `adapters` (the adapters' parameter count, lora.py): the base and the head are frozen, so a
        back-propagated position costs 2·P (activations only), and the adapters cost 2 per parameter forward
        and 4 more backward."""
        V_H = self.head_params
        if adapters is None:
            return 2 * (P * self.n + V_H * self.head_n) + 4 * (P * self.grad + V_H * self.head_grad)
        return (2 * ((P + adapters) * self.n + V_H * self.head_n) + 2 * (P * self.grad + V_H * self.head_grad)
                + 4 * adapters * self.grad)

    def remove(self):
        for h in self.hooks:
            h.remove()


def matmul_rate(hidden, inter, dtype, device="cpu", tokens=2048, repeats=5):
    """FLOP/s of a plain torch.mm at a model's MLP size, [tokens, hidden] @ [hidden, inter]."""
    device = torch.device(device)
    a, b = torch.randn(tokens, hidden, device=device, dtype=dtype), torch.randn(hidden, inter, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    sync()
    return 2 * tokens * hidden * inter * repeats / (time.perf_counter() - t)


def mlp_sizes(model):
    """(hidden, intermediate) of a model's MLP: the matmul the rate is measured at."""
    H = model.config.hidden_size
    return H, getattr(model.config, "intermediate_size", 4 * H)
