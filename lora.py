"""Low-rank adapters (METHOD §3.5), hand-written: `--lora-rank r` trains r-rank updates of the linear layers and
nothing else, so that a model whose weights, gradients and AdamW moments do not fit still trains.

    adapt(model, rank, alpha, targets)   # each target y = W x + (α / r) B A x; B = 0: the model is unchanged
    with adapters_off(model): ...        # the base model: the §3.3 reference, without a second copy
    merge(model)                         # W <- W + (α / r) B A: a plain model again (save_pretrained)

A checkpoint of an adapted run holds the adapters alone (save_adapters: adapters.safetensors and
adapter_config.json, with a fingerprint of the base they were trained on); its base is the run's start
model, its --model or its warm-up. `python igsearch.py merge RUN OUT` (runs.merge_command) writes base +
(α / r) B A as a plain model that eval, compare and every other tool load. With --lora-rank 0 (the default)
nothing here runs. This module imports only ranks (FSDP's gather for the reference) and retrieve.
"""
import contextlib
import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import engine
import ranks
from retrieve import DataError

TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # attention and MLP: METHOD §3.5
FORMAT = "igsearch-lora-1"


class LoRALinear(torch.nn.Linear):
    """A linear layer with a low-rank update, METHOD §3.5: y = W x + b + (α / r) · B (A x), W and b frozen,
    A [r, d_in] and B [d_out, r] trained. `lora_on` False (adapters_off) computes the base layer alone."""

    def forward(self, x):
        w = self.weight
        if w.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):  # a bf16 base, called in fp32
            w = w.to(x.dtype)
        y = F.linear(x, w, self.bias)
        if not self.lora_on:
            return y
        return y + self.lora_scale * F.linear(F.linear(x, self.lora_A), self.lora_B)  # METHOD §3.5


def adapt(model, rank, alpha=0.0, targets=TARGETS, bf16=False, seed=0):
    """Adapters of rank `rank` on every linear layer whose name ends in one of `targets` (comma-separated,
    e.g. q_proj), every other weight frozen; α = 0 means 2r. A is drawn as nn.Linear draws its weights
    (Kaiming-uniform with a = √5: U(-1/√d_in, 1/√d_in)) from its own generator, so that adapting leaves the
    run's random streams alone; B = 0, so the adapted model computes the base model's numbers exactly.
    bf16=True holds the adapted layers' frozen weights in bf16 (half their memory), for runs whose forwards
    autocast to bf16 anyway (a forward outside autocast casts them back); the layers not adapted, the
    vocabulary head (tied to the embeddings) and the norms stay fp32. rank 0: nothing is done (full
    fine-tuning). Returns the model."""
    if rank == 0:
        return model
    names = [t.strip() for t in targets.split(",") if t.strip()]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and m is not head and n.rsplit(".", 1)[-1] in names]
    found = {n.rsplit(".", 1)[-1] for n, _ in layers}
    if not names or set(names) - found:
        known = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and m is not head})
        raise DataError(f"--lora-targets {targets!r}: {', '.join(sorted(set(names) - found)) or 'empty'} names no "
                        f"linear layer of this model (its linear layers: {','.join(known)}; the vocabulary head is "
                        "never adapted)")
    model.lora_config = {"format": FORMAT, "rank": rank, "alpha": float(alpha or 2 * rank),
                         "targets": ",".join(names), "fingerprint": fingerprint(model)}
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for _, m in layers:
        A = torch.empty(rank, m.in_features).uniform_(-m.in_features ** -0.5, m.in_features ** -0.5, generator=g)
        # the class is swapped rather than the module replaced: the weight keeps its object and its name, so
        # state_dict, save_pretrained and the optimizer see the model they saw before
        m.__class__ = LoRALinear
        m.lora_A = torch.nn.Parameter(A.to(m.weight.device))
        m.lora_B = torch.nn.Parameter(torch.zeros(m.out_features, rank, device=m.weight.device))
        m.lora_scale, m.lora_on = model.lora_config["alpha"] / rank, True
        if bf16:
            m.weight = torch.nn.Parameter(m.weight.detach().to(torch.bfloat16), requires_grad=False)
    return model


def adapt_run(model, cfg, device):
    """The run's adapters on the loaded model (METHOD §3.5; nothing with --lora-rank 0), the frozen base in
    bf16 where the forwards run in bf16."""
    return adapt(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets,
                 bf16=engine.bf16_forwards(cfg.precision, device), seed=cfg.seed)


def adapted(model):
    return hasattr(model, "lora_config")


def layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def adapters_off(model):
    """The base model inside the block: every adapter switched off, then on again."""
    mods = layers(model)
    for m in mods:
        m.lora_on = False
    try:
        yield model
    finally:
        for m in mods:
            m.lora_on = True


class Reference:
    """The frozen reference (METHOD §3.3) of an adapted policy: the policy itself with its adapters off, used
    through reference()."""

    def __init__(self, model):
        self.model = model


@contextlib.contextmanager
def reference(ref_model, dp=None):
    """The reference model to call inside the block: a frozen copy (or None) as it is; for a Reference, the
    policy with its adapters off, its FSDP shards gathered whole (the update holds only shards, and the
    reference's forwards run outside the data-parallel module)."""
    if not isinstance(ref_model, Reference):
        yield ref_model
        return
    ranks.unshard(dp)
    try:
        with adapters_off(ref_model.model) as base:
            yield base
    finally:
        ranks.reshard(dp)


@torch.no_grad()
def merge(model):
    """METHOD §3.5: W <- W + (α / r) · B A in fp32 in every adapted layer, the adapters removed and every weight
    fp32 and trainable again, as runs.load_model gives a model: a plain model (a base held in bf16 merges as its
    bf16 values, the weights its forwards computed with). A model without adapters is returned as it is."""
    if not adapted(model):
        return model
    for m in layers(model):
        w = m.weight.float() + m.lora_scale * (m.lora_B.float() @ m.lora_A.float())
        del m.lora_A, m.lora_B, m.lora_scale, m.lora_on
        m.__class__ = torch.nn.Linear
        m.weight = torch.nn.Parameter(w)
    del model.lora_config
    return model.float().requires_grad_(True)


def fingerprint(model):
    """A hash of the base weights: names, shapes and a strided sample of the values rounded to bf16 (the same
    whether the base is held in fp32 or bf16), so that adapters are never put on a base they were not trained
    on. Adapter weights are left out."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.endswith((".lora_A", ".lora_B")) or not t.is_floating_point():
            continue
        sample = t.detach().flatten()[::1009].to(torch.bfloat16).view(torch.int16).cpu()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# Adapters in checkpoints

def state(model, weights=None):
    """The adapters' tensors by state_dict name: from `weights` where given (a whole state dict gathered from
    FSDP shards), else from the model."""
    weights = model.state_dict() if weights is None else weights
    return {k: v.detach().contiguous().cpu() for k, v in weights.items() if k.endswith((".lora_A", ".lora_B"))}


def save_adapters(model, directory, weights=None):
    """DIR/adapters.safetensors and DIR/adapter_config.json (rank, α, targets, the base's fingerprint)."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state(model, weights), str(directory / "adapters.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(model.lora_config, indent=1))


def read_config(directory):
    """A checkpoint's adapter_config.json, or None where it holds whole weights; DataError where unreadable."""
    path = Path(directory) / "adapter_config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        config = None
    if not (isinstance(config, dict) and config.get("format") == FORMAT):
        raise DataError(f"{path}: not the adapter config this program writes")
    return config


def check_checkpoint(path, model, weights):
    """DataError, in one line, unless checkpoint `path` holds what `model` trains: adapters of its rank, α and
    targets, trained on this very base (its fingerprint), with a tensor of the right shape for each adapter;
    or whole weights for a model without adapters."""
    saved, mine = read_config(Path(path) / "adapters"), getattr(model, "lora_config", None)
    if saved is None and mine is None:
        return
    if saved is None or mine is None:
        held, trains = (f"adapters (--lora-rank {c['rank']})" if c else "whole weights (--lora-rank 0)"
                        for c in (saved, mine))
        raise DataError(f"checkpoint {path} holds {held} and this run trains {trains}; resume with the run's "
                        "own --lora-rank")
    if saved["fingerprint"] != mine["fingerprint"]:
        raise DataError(f"checkpoint {path}: its adapters were trained on another base model (fingerprint "
                        f"{saved['fingerprint']}) than the one loaded here ({mine['fingerprint']}); they load onto "
                        "their run's own --model (or its warm-up) only")
    for k in ("rank", "alpha", "targets"):
        if saved[k] != mine[k]:
            raise DataError(f"checkpoint {path}: adapters of lora_{k} {saved[k]!r}, this run has {mine[k]!r}; "
                            f"resume with the run's own --lora-{k}")
    want = {k: tuple(v.shape) for k, v in state(model).items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if want != got:
        raise DataError(f"checkpoint {path}: its adapters do not fit this model ({len(got)} tensors, "
                        f"{len(want)} expected)")


def load_adapters(model, weights):
    """Copy checkpoint adapters (checked by check_checkpoint) into an adapted model."""
    model.load_state_dict(weights, strict=False)
