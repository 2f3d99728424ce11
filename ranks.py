"""Data-parallel training with torchrun: the ranks of one run, and what passes between them.

    torchrun --nproc_per_node K igsearch.py ...     # K processes, each told RANK, WORLD_SIZE, LOCAL_RANK

Every rank holds the policy and samples the rollouts of its share of the step's questions (a group never spans
ranks); the step's rollouts, rewards and IG details are then gathered, so every rank sees the whole step and
computes the same advantages and metrics as one process holding the whole batch. The update is data-parallel
(DistributedDataParallel, or FSDP with --parallel fsdp) with the loss normalized by the policy tokens of all
ranks. Without torchrun the world size is 1 and every function here is the identity or does nothing, so one
process computes exactly what it computed before this module existed.

Rank 0 alone writes the run directory and holds its lock (on_main, main_holds; the others wait at a barrier)
and alone prints (init sends the others' stdout to os.devnull; errors still reach stderr on every rank).
Should a rank fail, it ends, and torchrun stops the others.

This module imports only torch, grpo (the update's forward, PolicyLogprobs) and engine (precision, gradient buffers).
"""
import contextlib
import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

import engine
import grpo


# ----------------------------------------------------------------------------------------------------
# Who am I

# What --pg-timeout 0 means: how long a rank waits for the others in one collective. Rank 0 works alone while
# the others wait (the warm-up, a checkpoint), so this bounds those phases too: a CPU is far slower at them.
PG_TIMEOUT = {"gloo": 1800.0, "nccl": 600.0}
_timeout = [None]


def init(device="auto", timeout=0.0):
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT): nccl on GPUs (rank r on its node's GPU LOCAL_RANK), gloo on CPUs (--device cpu, or no
    GPU). A rank that waits `timeout` seconds in a collective (0: PG_TIMEOUT of the backend) fails with a
    DistError: a rank that died or froze ends the run in bounded time (lost_rank says so in one line). Nothing
    to do without torchrun or when already joined."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    gpu = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if gpu else "gloo"
    _timeout[0] = float(timeout) or PG_TIMEOUT[backend]
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=_timeout[0]))
    if rank() > 0:  # rank 0 alone prints; errors still go to stderr on every rank
        sys.stdout = open(os.devnull, "w")


def lost(e):
    """Is the error `e` a collective that failed because another rank ended or did not answer? nccl raises a
    DistError; gloo a plain RuntimeError that names its transport."""
    return world() > 1 and (isinstance(e, getattr(dist, "DistError", ())) or any(
        w in str(e) for w in ("gloo/transport", "Timed out waiting", "Connection reset", "Connection closed")))


def lost_rank(e):
    """The one line for a collective that failed: another rank ended, or did not answer within the timeout."""
    return (f"rank {rank()} of {world()}: another rank ended or did not answer within --pg-timeout "
            f"{_timeout[0] or 0:g} s ({type(e).__name__}); the run's last checkpoint is kept: --resume goes on")


def guarded(command):
    """`command` with a collective that failed for a lost rank (lost) raised as a ConnectionError of one line
    (lost_rank), which runs.cli prints as it prints every OSError."""
    def run():
        try:
            return command()
        except RuntimeError as e:
            if not lost(e):
                raise
            message = lost_rank(e)
        raise ConnectionError(message)
    return run


def finish(code=0):
    """The end of a script: leave the process group after a successful run, and return its exit code. (After
    a failure the process just ends: torchrun stops the other ranks, one of which may wait in a collective.)"""
    if code == 0 and dist.is_initialized():
        dist.destroy_process_group()
    return code


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    """Rank 0 alone prints, and writes metrics, views and checkpoints."""
    return rank() == 0


def local_device(device):
    """"cuda" means this process's own GPU (torchrun's LOCAL_RANK, made current by init)."""
    if device.type == "cuda" and device.index is None and world() > 1:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def describe(parallel):
    """What the run's first line says of the ranks: nothing in one process."""
    return f"  {world()} ranks ({parallel}), a rank silent for {_timeout[0]:g} s ends the run" if world() > 1 else ""


def tqdm_disable():
    """tqdm's `disable` on this rank: rank 0 shows its progress bars (None: where stderr is a terminal)."""
    return None if is_main() else True


def rank_seed(seed, r=None):
    """The seed of rank r's sampling generator: seed + r (rank 0, and a single process, keep the run's seed)."""
    return seed + (rank() if r is None else r)


def resume_generator(generator, saved, seed):
    """On resume, once the checkpoint's states (rank 0's) are restored: rank r > 0 takes its own sampling
    generator from `saved` (the checkpoint's "generators", every rank's in rank order), or, where the run had
    fewer ranks, a fresh one seeded seed + r. Rank 0 keeps the one restored."""
    r = rank()
    if 0 < r < len(saved):
        generator.set_state(saved[r])
    elif r > 0:
        generator.manual_seed(rank_seed(seed))


# ----------------------------------------------------------------------------------------------------
# Shards and what passes between ranks

def span(n):
    """This rank's contiguous share [lo, hi) of n items: rank r of K gets [r n / K, (r + 1) n / K)."""
    K, r = world(), rank()
    return r * n // K, (r + 1) * n // K


def shard(items):
    return items[slice(*span(len(items)))]


def gather(items):
    """Every rank's list, concatenated in rank order (all_gather_object): for contiguous shards, the whole
    list in its original order, on every rank. World size 1: `items` itself."""
    if world() == 1:
        return items
    parts = [None] * world()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def _comm_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(x):
    """Σ over ranks of a number or a tensor, returned as the same type. World size 1: x itself."""
    if world() == 1:
        return x
    if isinstance(x, torch.Tensor):
        t = x.detach().to(_comm_device(), copy=True)
        dist.all_reduce(t)
        return t.to(x.device)
    t = torch.tensor(float(x), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return type(x)(t.item())


def reduce_values(values, op="sum"):
    """{name: number} -> the same names in the same order, summed ("sum") or maximized ("max") over ranks."""
    if world() == 1 or not values:
        return values
    keys = list(values)  # the same insertion order on every rank: the same code built the dict
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return {k: type(values[k])(v) for k, v in zip(keys, t.tolist())}


def barrier():
    if world() > 1:
        dist.barrier()


def from_main(fn, *args):
    """fn(*args) called on rank 0, its result on every rank: a decision read from a file that rank 0 may
    write next, so that every rank takes the same branch (and the same collectives)."""
    if world() == 1:
        return fn(*args)
    box = [fn(*args) if is_main() else None]
    dist.broadcast_object_list(box, 0)
    return box[0]


def on_main(fn, *args, then=None, **kwargs):
    """fn(*args, **kwargs) on rank 0 alone (a write to the run directory), the others waiting until it is
    done; then, where given, then() on the others (a read of what rank 0 checked or wrote). Returns fn's
    result on rank 0, then()'s (or None) elsewhere. One process: fn(*args, **kwargs)."""
    result = fn(*args, **kwargs) if is_main() else None
    barrier()
    return then() if then is not None and not is_main() else result


@contextlib.contextmanager
def main_holds(cm):
    """Rank 0 holds the context manager `cm` for the block (runs.locked(out): one process writes a run
    directory); the others enter the block once rank 0 holds it."""
    with contextlib.ExitStack() as stack:
        on_main(stack.enter_context, cm)
        yield


def broadcast_weights(model):
    """Every rank takes rank 0's weights (after the warm-up, which only rank 0 runs)."""
    if world() > 1:
        with torch.no_grad():
            for t in model.state_dict().values():
                dist.broadcast(t, 0)


# ----------------------------------------------------------------------------------------------------
# The data-parallel update

class PolicyLogprobs(torch.nn.Module):
    """The update's forward as one module, so that DDP and FSDP see it: log π(ids[b, k] | ids[b, <k]) at the
    masked positions of one micro-batch, in one forward (grpo.token_logprobs). [b, T] -> [b, T]"""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, attention_mask, mask):
        return grpo.token_logprobs(self.model, ids, attention_mask, mask)


def same_count(chunks):
    """The update's micro-batches (row slices, engine.token_chunks), the widest halved until this rank has as many
    as the rank with the most: FSDP gathers weights in every forward and reduce-scatters in every backward, so
    every rank must run as many of each. Halving never adds tokens to a micro-batch, and every rank holds as many
    rows (a step's questions divide among the ranks), so the count can always be reached. One process: chunks."""
    n = int(reduce_values({"micro_batches": len(chunks)}, "max")["micro_batches"])
    chunks = list(chunks)
    while len(chunks) < n:
        j = max(range(len(chunks)), key=lambda k: chunks[k].stop - chunks[k].start)
        mid = (chunks[j].start + chunks[j].stop) // 2
        chunks[j:j + 1] = [slice(chunks[j].start, mid), slice(mid, chunks[j].stop)]
    return chunks


def data_parallel(model, how="ddp"):
    """The policy's data-parallel forward (a PolicyLogprobs wrapped in DDP, or sharded by FSDP), or None in a
    single process. Build the optimizer after this: FSDP replaces the parameters with their shards.

    ddp: every rank holds all weights, gradients and optimizer state; the gradients are averaged over ranks.
    fsdp: each rank holds 1/K of them (FSDP2's fully_shard on each transformer block and on the whole);
    the rollout phases gather the weights whole (unshard), the update gathers one block at a time."""
    if world() == 1:
        return None
    net = PolicyLogprobs(model)
    device = next(model.parameters()).device
    if how == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (world(),))
        blocks = set(getattr(model, "_no_split_modules", None) or [])  # e.g. Qwen3DecoderLayer
        for m in model.modules():
            if type(m).__name__ in blocks:
                fully_shard(m, mesh=mesh)
        fully_shard(net, mesh=mesh)
        with torch.no_grad():  # FSDP takes the first module to run forward as its root: make it this one
            net(torch.zeros((1, 2), dtype=torch.long, device=device), torch.ones((1, 2), dtype=torch.long, device=device),
                torch.tensor([[False, True]], device=device))
        net.reshard()
        return net
    from torch.nn.parallel import DistributedDataParallel
    # no buffer broadcast: a forward then holds no collective, so the no-grad forwards need not be matched
    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)


def _fsdp_modules(dp):
    from torch.distributed.fsdp import FSDPModule
    return [m for m in dp.modules() if isinstance(m, FSDPModule)] if dp is not None else []


def is_fsdp(dp):
    return bool(_fsdp_modules(dp))


def no_sync(dp, last):
    """Around the forward of each micro-batch (DDP's forward decides whether its backward all-reduces):
    gradients accumulate over the micro-batches and DDP all-reduces after the last one only. (FSDP
    reduce-scatters every backward, so that each rank only ever keeps its shard of the gradients.)"""
    if dp is not None and not last and not is_fsdp(dp):
        return dp.no_sync()
    return contextlib.nullcontext()


@contextlib.contextmanager
def whole_weights(dp):
    """Around the rollout phases (generation, IG scoring, evaluation): FSDP gathers every shard first and
    shards again after (unshard, reshard); DDP and one process: nothing."""
    unshard(dp)
    try:
        yield
    finally:
        reshard(dp)


def unshard(dp):
    """FSDP: the rollout phases (generation, IG scoring, evaluation) call the model outside the update's
    forward, so every shard is gathered first and kept gathered until reshard(dp). Otherwise: nothing."""
    mods = _fsdp_modules(dp)
    for m in mods:
        m.unshard()
    for m in mods:
        if m is not dp:
            m.set_reshard_after_forward(False, recurse=False)


def reshard(dp):
    """FSDP: back to this rank's shards, before the update (see unshard). Otherwise: nothing."""
    mods = _fsdp_modules(dp)
    for m in mods:
        if m is not dp:
            m.set_reshard_after_forward(True, recurse=False)
    for m in mods:
        m.reshard()


def grad_norm(total):
    """clip_grad_norm_'s result as a float (under FSDP it is a DTensor over the shards)."""
    return float(total.full_tensor() if hasattr(total, "full_tensor") else total)


# ----------------------------------------------------------------------------------------------------
# Checkpoints: whole weights and optimizer state, as one process holds them

def checkpoint_state(model, opt, dp, generator):
    """What runs.save_checkpoint takes beside the model and optimizer, as keywords: every rank's sampling
    generator state in rank order ("generators") and, under FSDP, the weights and optimizer state gathered
    whole from the shards ("weights", "opt_state": full_state). Every rank must call it; rank 0 writes."""
    weights, opt_state = full_state(model, opt, dp)
    return {"weights": weights, "opt_state": opt_state, "generators": gather([generator.get_state()])}


def full_state(model, opt, dp):
    """FSDP: (weights, optimizer state) gathered whole from the shards, keyed as in one process
    (model.state_dict() names, opt.state_dict()'s parameter numbers), on rank 0 (empty elsewhere); every
    rank must call it. DDP and one process: (None, None), the model and optimizer hold them already."""
    if not is_fsdp(dp):
        return None, None
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    named = get_optimizer_state_dict(model, opt, options=options)
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # the optimizer's, in its order
    index = {n: i for i, n in enumerate(names)}
    state = {index[n]: s for n, s in named.get("state", {}).items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in named.get("param_groups", [])]
    return weights, {"state": state, "param_groups": groups}


def load_full_state(model, opt, dp, weights, opt_state):
    """FSDP: load whole weights and an opt.state_dict() (as full_state writes them) into the shards. Every
    rank passes the same whole state."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, strict=False)  # tied weights are saved once
    set_model_state_dict(model, weights, options=options)
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # the optimizer's, in its order
    named = {"state": {names[i]: s for i, s in opt_state["state"].items()},
             "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in opt_state["param_groups"]]}
    set_optimizer_state_dict(model, opt, named, options=options)


def accumulate_gradients(model, micro, forward, loss_of, cfg, dp=None, scale=1.0):
    """The gradients of one optimizer step, from zero, summed over micro-batches (row slices, each within the token
    budget): for each slice its forward (bf16 where native; activations recomputed with gradient
    checkpointing), then loss_of(logp, slice) -> (loss, stats) in fp32, then backward of loss * scale. Every
    loss is normalized by the whole batch, so the slices' gradients add up to the batch's. Under DDP the
    gradients are all-reduced once, after the last slice (no_sync). Returns [(loss value, stats)] a slice."""
    device = next(model.parameters()).device
    if dp is None:
        engine.flat_grads(model.parameters())  # the last step's dropped, then one buffer (engine.flat_zeros)
    else:  # DDP and FSDP write the gradients themselves
        model.zero_grad(set_to_none=True)
    parts = []
    for j, sl in enumerate(micro):
        if device.type == "cpu":  # the heap that the last forward or backward freed: this slice's tensors differ
            engine.trim_heap()    # in size (a GPU's activations live in its own allocator, and a trim takes ms)
        with engine.autocast(cfg.precision, device, cache=False), \
                engine.recompute(model, cfg.grad_checkpointing), no_sync(dp, last=j == len(micro) - 1):
            logp = forward(sl)
        loss, stats = loss_of(logp, sl)
        if device.type == "cpu":  # and the heap the forward's layers freed, before the backward's own tensors
            engine.trim_heap()
        (loss * scale).backward()
        parts.append((loss.item(), stats))
    return parts


class Clock:
    """Wall seconds of a step's phases: `with clock("update"): ...` adds to seconds["update"]; times() is the
    slowest rank's of each phase, as metrics (time_update, ...)."""

    def __init__(self, *names):
        self.seconds = dict.fromkeys(names, 0.0)

    @contextlib.contextmanager
    def __call__(self, name):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def times(self):
        return {f"time_{k}": round(v, 3) for k, v in reduce_values(self.seconds, "max").items()}
