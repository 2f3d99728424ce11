"""Mutation check of the reward and loss math: one-line bugs in the formula lines, each run against its tests.

    python tests/mutate.py                      # every mutant; prints killed / survived per mutant and a score
    python tests/mutate.py --list               # the mutants only, nothing run
    python tests/mutate.py --only grpo_loss,ig_gate        # the mutants of some functions
    python tests/mutate.py --timeout 300        # seconds per mutant (a mutant that hangs counts as killed)
    python tests/mutate.py --survivors LOG      # again, only the mutants that survived in an earlier output
    python tests/mutate.py --skip-done LOG      # go on after an interrupted run (its output in LOG)
    python tests/mutate.py --tally LOG [LOG..]  # the score of the current mutants from the outputs of runs in parts

The formula lines are the bodies and default arguments of the functions in TARGETS (rewards.py, the math of
grpo.py and engine.py, and the lines of igsearch.py that combine them: the rewards of a step, the update, the
defaults that METHOD gives), less the bookkeeping lines LINES and FIELDS leave out. Each
mutant changes one node on one line, the kind of slip a reader makes:

    constant     a number n -> n + 1 (floats: 2n, 0 -> 1), True <-> False
    operator     + <-> -, * <-> /, += <-> -=, -x -> x, and <-> or, not x -> x
    swap         a - b -> b - a
    normalize    a / b -> a (a mean becomes a sum, a normalization is dropped)
    reduce       .sum() <-> .mean(), min <-> max, abs(x) -> x
    compare      < <-> <=, > <-> >=, == <-> !=, is <-> is not, in <-> not in
    index        x[k] -> x[k + 1], x[:t] -> x[:t - 1] / x[:t + 1] / x[t - 1:t], x[s:] -> x[s + 1:]
    choice       a if c else b -> a, -> b

The working tree is never written: the repository's files (tracked and untracked, not ignored) are copied to a
temporary directory and each mutant is written there, run, and restored. Each run is `pytest -x -q` on the test
files that guard the function (TESTS), in a process forked from one that has imported torch and transformers
already (a few seconds per mutant instead of ten). A mutant is killed when a test fails. Survivors that cannot
change any result are listed in EQUIVALENT with the reason and left out of the score.
"""
import argparse
import ast
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# file -> the functions (or classes / module constants) whose lines are formula lines. "a.b" is the nested
# function b of a.
TARGETS = {
    "rewards.py": ["normalize_answer", "exact_match", "f1_score", "head_weights", "gold_scorer",
                   "gold_scorer.score", "batch_pool", "baseline_blocks", "igsearch_information_gain", "weigh_samples",
                   "default_equivalent", "semantic_classes", "belief", "smoothed_p_gold", "information_gain",
                   "nli_equivalent.equivalent", "entailment_index", "load_nli.entail", "sample_logprobs",
                   "sample_answers", "trajectory_evidence", "inforeasoner_information_gain", "inforeasoner_beliefs",
                   "ir_metrics", "IR_EPS"],
    "grpo.py": ["extract_answer", "Batch.policy_mask", "group_advantages", "token_advantages", "token_logprobs",
                "grpo_loss", "ig_gate", "add_query_bonus"],
    "engine.py": ["stop_ids", "token_chunks", "generate_turn", "sample_tokens", "_generate_batch", "head_logprobs",
                  "_chunk_logprobs", "HeadLogprobs.backward"],
    "igsearch.py": ["Config", "PRESETS", "train_step", "step_rewards", "update_policy"],
    "ranks.py": ["accumulate_gradients"],
}

# function -> a regular expression: only its lines that match are formula lines (the rest is bookkeeping)
STEP_LINES = (r"ir_model|ir_lambda|group_advantages|token_advantages|add_query_bonus|gold_scorer|"
              r"information_gain\(|inforeasoner_beliefs|ir_metrics|ref_model")
LINES = {"train_step": STEP_LINES, "step_rewards": STEP_LINES,
         "_generate_batch": r"temperature|cumsum|pos = |argmax"}  # the engine: its arithmetic, not its bookkeeping

# Config and PRESETS: only the settings METHOD (or the README's --tiny) gives a value; the rest are run knobs
FIELDS = {"Config": {"group_size", "temperature", "max_turns", "topk", "lr", "beta_kl", "clip_eps", "ppo_epochs",
                     "grad_clip", "ig_alpha", "ig_delta", "ig_rho", "ig_clip", "ig_samples", "ig_head_tokens",
                     "ig_head_weight", "ir_samples", "ir_temperature", "ir_max_tokens", "ir_lambda"},
          "PRESETS": {"steps", "questions_per_step", "group_size", "max_turns", "topk"}}

# function -> the pytest runs that guard it, fastest and most direct first; a mutant is killed by the first that fails
# the defaults against METHOD (tests/test_grpo.py) and IG-Search's default N = 3 blocks (tests/test_igsearch.py)
DEFAULTS = "tests/test_grpo.py tests/test_igsearch.py -k 'defaults_follow or igsearch_defaults'"
# the guards tests/test_formulas.py held (now in their topic files; its InfoReasoner ones run with the second)
FAST_IR = ["tests/test_grpo.py tests/test_igsearch.py -k 'defaults_follow or preset or gold_scorer_refuses or "
           "igsearch_default or igsearch_contexts or igsearch_cuts'",
           "tests/test_inforeasoner.py -k 'not nli_model_loads'"]
TESTS = {
    **{f: ["rewards.py", "tests/test_outcome.py"] for f in ("normalize_answer", "exact_match", "f1_score")},
    "extract_answer": ["grpo.py", "tests/test_outcome.py"],
    **{f: ["rewards.py", "tests/test_igsearch.py -k 'head_weights or gold_score'",
           DEFAULTS, "tests/test_budget.py -k 'gold or ig_'"]
       for f in ("head_weights", "gold_scorer", "gold_scorer.score")},
    **{f: ["tests/test_igsearch.py -k 'not train_step'", "tests/test_grpo.py -k defaults_follow"] for f in
       ("batch_pool", "baseline_blocks", "igsearch_information_gain")},
    **{f: ["rewards.py", *FAST_IR] for f in (
        "weigh_samples", "default_equivalent", "semantic_classes", "belief", "smoothed_p_gold", "information_gain",
        "nli_equivalent.equivalent", "sample_logprobs", "sample_answers",
        "trajectory_evidence", "inforeasoner_information_gain", "inforeasoner_beliefs", "ir_metrics", "IR_EPS")},
    **{f: ["rewards.py", *FAST_IR, "tests/test_inforeasoner.py -k nli_model_loads"] for f in ("entailment_index",
                                                                                               "load_nli.entail")},
    "stop_ids": ["tests/test_engine.py"],
    "token_chunks": ["engine.py", "tests/test_budget.py -k 'chunks or update or logprobs'"],
    "generate_turn": ["tests/test_budget.py -k 'rollout or evaluation or one_batch or belief or longest or shortest'",
                      "tests/test_engine.py"],
    "sample_tokens": ["tests/test_engine.py -k 'sampler or sampling'"],
    "_generate_batch": ["tests/test_engine.py",
                        "tests/test_grpo.py -k 'greedy or max_new or stop_string or engine_rollouts or reproducible'"],
    **{f: ["grpo.py", "tests/test_grpo.py -k 'loss or advantage or gradient or mask or logprobs or micro or learns "
                      "or unlearns or equal or clip or kl or group or seq_mean'", "tests/test_training.py -k 'ppo or clipping or one_policy'",
                 DEFAULTS,
                 "tests/test_budget.py -k 'update or logprobs'"]
       for f in ("Batch.policy_mask", "group_advantages", "token_advantages", "head_logprobs", "token_logprobs",
                 "grpo_loss")},
    **{f: ["tests/test_precision.py -k head", "tests/test_grpo.py -k 'logprobs or gradient'"]
       for f in ("head_logprobs", "_chunk_logprobs", "HeadLogprobs.backward")},
    **{f: ["grpo.py", "tests/test_igsearch.py -k 'gate or bonus or failed or alpha'",
           DEFAULTS] for f in
       ("ig_gate", "add_query_bonus")},
    "Config": ["tests/test_grpo.py tests/test_igsearch.py -k 'defaults_follow or igsearch_defaults or preset'"],
    "PRESETS": ["tests/test_grpo.py tests/test_igsearch.py -k 'defaults_follow or igsearch_defaults or preset'"],
    # last, tests/test_ranks.py (2 processes, a minute or two): a rank's share and the data-parallel update, which
    # one process cannot tell from the whole (there world() is 1 and [lo:hi] the whole batch)
    "train_step": ["tests/test_training.py -k inforeasoner",
                   "tests/test_inforeasoner.py -k 'train_step or all_wrong'",
                   "tests/test_igsearch.py -k train_step",
                   "tests/test_ranks.py -k 'one_step or ig_baseline or inforeasoner_samples'"],
    "update_policy": ["tests/test_training.py -k 'ppo or clipping or one_policy'",
                      "tests/test_grpo.py -k 'micro or update_policy or unchanged or learns or unlearns'",
                      "tests/test_budget.py -k update", "tests/test_ranks.py -k 'one_step or unequal'"],
}
TESTS["step_rewards"] = TESTS["train_step"]
TESTS["accumulate_gradients"] = [*TESTS["update_policy"][:-1], "tests/test_warmup.py -k 'loss or step or micro_batches'",
                                 "tests/test_precision.py -k 'heap or weight_cache'", TESTS["update_policy"][-1]]

# (function, the mutated line, stripped) -> why no test can kill it: it computes the same numbers
EQUIVALENT = {
    ('extract_answer', 'if (end <= 0):'):
        'end = 0: the response starts with </answer>, no <answer> precedes it, rfind gives -1 and the answer is None either way',
    ('extract_answer', 'if end < 1:'):
        'the same as end <= 0',
    ('token_chunks', 'chunks, start, longest = [], 0, 1'):
        "the first row sets longest = max(longest, its length), and no row has 0 tokens (every row holds a prompt)",
    ('generate_turn', 'grow = max(max_new, default=1)'):
        'the default is read only when there are no rows, and then there is no batch to grow',
    ('gold_scorer.score', 'h = body(input_ids=ids, past_key_values=past, position_ids=pos, use_cache=(past is None)).last_hidden_state'):
        'use_cache only decides whether a cache is returned; the hidden states are the same',
    ('default_equivalent', 'if (not a and (not b)):'):
        "with one side empty, '  ' never occurs in a normalized ' b ' (single spaces), nor ' b ' in '  ': False either way",
    ('load_nli.entail', 'x = nli_tok(premise, hypothesis, return_tensors="pt", truncation=False).to(device)'):
        "a question and a few-word answer, twice, stay far below the classifier's length limit",
    ('sample_logprobs', 'rows = [grpo.Rollout(question=None, group=1, ids=list(p) + list(s),'):
        'the group of these throw-away rows is never read',
    ('sample_logprobs', 'return ((lp * mask).sum(-1) / mask.sum(1).clamp(min=1)).tolist()'):
        'a 2-D tensor: dim 1 is dim -1',
    ('sample_logprobs', 'return ((lp * mask).sum(1) / mask.sum(-1).clamp(min=1)).tolist()'):
        'a 2-D tensor: dim 1 is dim -1',
    ('sample_answers', 'pad = 0'):
        "the pad id sits only at right-padded, masked positions: it never changes a real position's log-prob",
    ('sample_answers', 'pad = tok.pad_token_id if (tok.pad_token_id is None) else 0'):
        "the pad id sits only at right-padded, masked positions: it never changes a real position's log-prob",
    ('sample_answers', 'pad = tok.pad_token_id if tok.pad_token_id is not None else 1'):
        "the pad id sits only at right-padded, masked positions: it never changes a real position's log-prob",
    ('sample_answers', 'pad = tok.pad_token_id'):
        'load_model gives every tokenizer a pad id (its EOS when it has none)',
    ('_generate_batch', 'pos = (attn.cumsum(1) - 1).clamp(min=0)  # [U, L] positions that ignore the padding'):
        'a 2-D tensor: dim 1 is dim -1',
    ('_generate_batch', 'probs = torch.softmax(logits / temperature, dim=1).cpu()  # drawn on CPU: reproducible'):
        "the last position's logits are 2-D, [U, V]: dim 1 is dim -1",
    ('sample_tokens', 'cdf = probs.cumsum(1, dtype=torch.float64)  # [b, V]'):
        'probs is 2-D, [b, V]: dim 1 is dim -1',
    ('sample_tokens', 'return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)'):
        'the indices are 2-D, [b, 1]: dim 1 is dim -1',
    ('sample_tokens', 'return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[1] - 1)'):
        'probs is 2-D, [b, V]: dim 1 is dim -1',
    ('_generate_batch', 'nxt = logits.argmax(1).cpu()'):
        "the last position's logits are 2-D, [U, V]: dim 1 is dim -1",
    ('token_logprobs', 'lengths = attention_mask.sum(1)                                           # [B]'):
        'attention_mask is 2-D, [B, T]: dim 1 is dim -1',
    ('train_step', "stats = update_policy(model, ref_model, opt, batch[lo:hi], A[lo:hi + 1], cfg, dp)              # §3.3"):
        "update_policy reads A only as A[sl] for row slices of its batch's rows: a trailing extra row is never read",
    ('head_logprobs', 'for s in range(0, max(h.shape[0], 2), HEAD_CHUNK):  # no state: one empty chunk, still in the graph'):
        'HEAD_CHUNK >= 2: with 0 or 1 states, range(0, 2, HEAD_CHUNK) is the same one chunk as range(0, 1, HEAD_CHUNK)',
    ('head_logprobs', 'if (torch.is_grad_enabled() or (hs.requires_grad or head.weight.requires_grad)):'):
        'HeadLogprobs and the plain call compute the same numbers; they differ only in the backward, and with '
        'autograd off there is none',
    ('_chunk_logprobs', 'm = x.amax(1, keepdim=True)                                # [n, 1]'):
        'the logits are 2-D, [n, V]: dim 1 is dim -1',
    ('_chunk_logprobs', 'x_t = x.gather(1, tokens[:, None])                         # [n, 1]'):
        'the logits are 2-D, [n, V]: dim 1 is dim -1',
    ('_chunk_logprobs', 'return (x_t - m - x.sub_(m).exp_().sum(1, keepdim=True).log()).squeeze(-1)'):
        'the logits are 2-D, [n, V]: dim 1 is dim -1',
    ('_chunk_logprobs', 'return (x_t - m - x.sub_(m).exp_().sum(-1, keepdim=True).log()).squeeze(1)'):
        'the log-probs are 2-D, [n, 1]: dim 1 is dim -1',
    ('HeadLogprobs.backward', 'x.sub_(x.amax(1, keepdim=True)).exp_()'):
        'the logits are 2-D, [n, V]: dim 1 is dim -1',
    ('HeadLogprobs.backward', 'x.div_(x.sum(1, keepdim=True))                         # softmax(x)'):
        'the logits are 2-D, [n, V]: dim 1 is dim -1',
    ('HeadLogprobs.backward', 'grad_h = (x @ weight).to(h.dtype)      # [n, H]'):
        'autograd drops a gradient returned for an input that needs none: only the work differs',
    ('HeadLogprobs.backward', 'grad_w = x.t().mm(h.to(weight.dtype))  # [V, H], contiguous'):
        'autograd drops a gradient returned for an input that needs none: only the work differs',
    ('sample_logprobs', 'out = [0.0] * len(prompts)'.replace('0.0', '1.0')):
        'a placeholder: every prompt belongs to one of the rows, and each of its samples is written',
    ('sample_logprobs', 'score = gold_scorer(model, list(p), head_tokens=0, head_weight=2.0, token_budget=token_budget)  # w_k = 1'):
        'with head_tokens=0 no token is a head token, so the head weight is never applied',
    ('sample_logprobs', 'score = gold_scorer(model, list(p), head_tokens=1, head_weight=1.0, token_budget=token_budget)  # w_k = 1'):
        'a head weight of 1 is the weight of every other token: the mean is the same',
    ('ir_metrics', 'extra = {"ir_ig_mean": mean, "ir_ig_std": math.sqrt(sum(((mean - x)) ** 2 for x in ig) / n),'):
        '(x - m)^2 = (m - x)^2',
    ('grpo_loss', 'if clip_ratio_c > 1:'):
        'checks.check_config refuses 0 < clip_ratio_c <= 1 (verl: c > 1), so c > 0 and c > 1 select the same runs',
    ('grpo_loss', 'dual = ((A <= 0)) & (pg > cap)'):
        'at A = 0 the token loss and the cap are both 0, so pg > cap is false either way',
    ('grpo_loss', 'pg = torch.where((A <= 0), torch.minimum(pg, cap), pg)'):
        'at A = 0 the token loss and the cap are both 0: the minimum is the loss, and its gradient -r A is 0',
    ('grpo_loss', 'kl = torch.clamp(torch.exp(d) - d - 1, -11, 10)'):
        'the k3 estimator e^d - d - 1 is never negative: the lower bound never binds',
    ('grpo_loss', 'per_seq = (loss_tok * mask).sum(-1) / mask.sum(1).clamp(min=1)   # a row without policy tokens: 0'):
        'a 2-D tensor: dim 1 is dim -1',
    ('grpo_loss', 'per_seq = (loss_tok * mask).sum(1) / mask.sum(-1).clamp(min=1)   # a row without policy tokens: 0'):
        'a 2-D tensor: dim 1 is dim -1',
    ('ig_gate', 'return x if (x >= 0) else rho * x'):
        'at x = 0 both branches give 0',
    ('update_policy', 'micro = ranks.same_count(engine.token_chunks(attn.sum(1).tolist(), cfg.token_budget))  # row slices'):
        'a 2-D tensor: dim 1 is dim -1',
    ('update_policy', 'old = torch.cat([policy(ids[sl], attn[sl], mask[sl]) for sl in micro])'):
        'with one epoch the stored old log-probs are the current ones, which the loss otherwise takes detached: '
        'the same numbers, one forward more',
    ('accumulate_gradients', 'if (dp is not None):'):
        'one process: the gradients set to None and written afresh by the backward instead of into one zeroed '
        'buffer (engine.flat_grads): the same numbers, another memory layout; with dp, flat buffers before DDP',
    ('accumulate_gradients', 'model.zero_grad(set_to_none=False)'):
        'gradients accumulate into zeros instead of None: the same sums',
    ('update_policy', 'old = torch.cat([policy(ids[sl], attn[sl], mask[sl]) for sl in micro]) if (cfg.ppo_epochs >= 1) else None'):
        'ppo_epochs is at least 1: the stored old log-probs always, the same numbers as above',
}


# ----------------------------------------------------------------------------------------------------
# Finding the formula lines and mutating them

def target_ranges(tree, names):
    """{name: (first line, last line, node)} of the named functions, classes, methods, nested functions and
    module assignments."""
    found = {}

    def visit(body, prefix):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + node.name
                found[name] = node
                visit(node.body, name + ".")
            elif isinstance(node, (ast.Assign, ast.AnnAssign)) and not prefix:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name):
                        found[t.id] = node
    visit(tree.body, "")
    missing = [n for n in names if n not in found]
    return {n: found[n] for n in names if n in found}, missing


def owned_nodes(node, name, all_targets):
    """The nodes of `node` that belong to `name`: its body and default arguments, less nested targets and
    docstrings."""
    skip = set()
    for other, o in all_targets.items():
        if other.startswith(name + ".") and o is not node:
            skip.add(id(o))
    out, fields = [], FIELDS.get(name)

    def walk(n, top=False):
        if id(n) in skip:
            return
        if fields is not None and isinstance(n, ast.AnnAssign) and n.target.id not in fields:
            return
        if fields is not None and isinstance(n, ast.keyword) and n.arg not in fields:
            return
        if (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)):
            return  # a docstring
        if isinstance(n, ast.JoinedStr):
            return  # f-strings: messages, not math
        if isinstance(n, (ast.Raise, ast.Assert)):
            return  # error paths
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("print", "DataError",
                                                                                       "ValueError"):
            return
        if not top:
            out.append(n)
        for child in ast.iter_child_nodes(n):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and child is n.args:
                for d in n.args.defaults + n.args.kw_defaults:
                    if d is not None:
                        walk(d)
                continue
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and child in n.decorator_list:
                continue
            walk(child)
    walk(node, top=True)
    return out


SWAP_BIN = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}
SWAP_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
            ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
SWAP_CALL = {"sum": "mean", "mean": "sum", "min": "max", "max": "min", "minimum": "maximum", "maximum": "minimum"}


def plus(e, k):
    return ast.BinOp(left=e, op=ast.Add() if k > 0 else ast.Sub(), right=ast.Constant(abs(k)))


def mutations(n):
    """(kind, replacement node) for a node."""
    import copy
    c = lambda: copy.deepcopy(n)  # noqa: E731
    if isinstance(n, ast.Constant) and not isinstance(n.value, str) and n.value is not None:
        v = n.value
        if isinstance(v, bool):
            yield "constant", ast.Constant(not v)
        elif isinstance(v, int):
            yield "constant", ast.Constant(v + 1)
        elif isinstance(v, float):
            yield "constant", ast.Constant(v * 2 if v else 1.0)
    elif isinstance(n, ast.BinOp):
        if type(n.op) in SWAP_BIN:
            m = c()
            m.op = SWAP_BIN[type(n.op)]()
            yield "operator", m
        if isinstance(n.op, ast.Sub):
            yield "swap", ast.BinOp(left=c().right, op=ast.Sub(), right=c().left)
        if isinstance(n.op, (ast.Div, ast.FloorDiv)):
            yield "normalize", c().left
    elif isinstance(n, ast.AugAssign) and type(n.op) in SWAP_BIN:
        m = c()
        m.op = SWAP_BIN[type(n.op)]()
        yield "operator", m
    elif isinstance(n, ast.UnaryOp):
        if isinstance(n.op, (ast.USub, ast.Not)):
            yield "operator", c().operand
    elif isinstance(n, ast.BoolOp):
        m = c()
        m.op = ast.Or() if isinstance(n.op, ast.And) else ast.And()
        yield "operator", m
    elif isinstance(n, ast.Compare):
        for i, op in enumerate(n.ops):
            if type(op) in SWAP_CMP:
                m = c()
                m.ops[i] = SWAP_CMP[type(op)]()
                yield "compare", m
    elif isinstance(n, ast.IfExp):
        yield "choice", c().body
        yield "choice", c().orelse
    elif isinstance(n, ast.Call):
        f = n.func
        if isinstance(f, ast.Attribute) and f.attr in SWAP_CALL:
            m = c()
            m.func.attr = SWAP_CALL[f.attr]
            yield "reduce", m
        elif isinstance(f, ast.Name) and f.id in ("min", "max"):
            m = c()
            m.func.id = SWAP_CALL[f.id]
            yield "reduce", m
        elif isinstance(f, ast.Name) and f.id == "abs" and len(n.args) == 1:
            yield "reduce", c().args[0]
    elif isinstance(n, ast.Subscript):
        parts = n.slice.elts if isinstance(n.slice, ast.Tuple) else [n.slice]
        for i, s in enumerate(parts):
            variants = []
            if isinstance(s, ast.Slice) and s.step is None:
                if s.upper is not None:
                    variants += [ast.Slice(copy.deepcopy(s.lower), plus(copy.deepcopy(s.upper), -1), None),
                                 ast.Slice(copy.deepcopy(s.lower), plus(copy.deepcopy(s.upper), 1), None)]
                    if s.lower is None:
                        variants.append(ast.Slice(plus(copy.deepcopy(s.upper), -1), copy.deepcopy(s.upper), None))
                if s.lower is not None:
                    variants.append(ast.Slice(plus(copy.deepcopy(s.lower), 1), copy.deepcopy(s.upper), None))
            elif isinstance(s, ast.Constant) and isinstance(s.value, int) and not isinstance(s.value, bool):
                variants.append(ast.Constant(s.value + 1))
            elif isinstance(s, ast.UnaryOp) and isinstance(s.op, ast.USub) and isinstance(s.operand, ast.Constant):
                variants.append(ast.Constant(-s.operand.value + 1))
            for v in variants:
                m = c()
                if isinstance(m.slice, ast.Tuple):
                    m.slice.elts[i] = v
                else:
                    m.slice = v
                yield "index", m


ATOMS = (ast.Name, ast.Attribute, ast.Call, ast.Subscript, ast.Constant)


def mutants(path):
    """Every mutant of one file: dicts with the function, line number, kind, old and new line and source."""
    src = path.read_text()
    lines = src.splitlines(keepends=True)
    tree = ast.parse(src)
    targets, missing = target_ranges(tree, TARGETS[path.name])
    for name in missing:
        print(f"note: {path.name}: no {name} (moved?): its lines are not mutated", file=sys.stderr)
    seen, out = set(), []
    for name, node in targets.items():
        for n in owned_nodes(node, name, targets):
            if not hasattr(n, "lineno") or n.lineno != n.end_lineno:
                continue
            line = lines[n.lineno - 1]
            if name in LINES and not re.search(LINES[name], line):
                continue
            raw = line.encode()
            for kind, new in mutations(n):
                ast.fix_missing_locations(new)
                text = ast.unparse(new)
                if isinstance(n, ast.AugAssign):
                    text = text.rstrip("\n")
                elif not isinstance(new, ATOMS) or (isinstance(new, ast.Constant) and str(text).startswith("-")):
                    text = f"({text})"
                new_line = (raw[:n.col_offset] + text.encode() + raw[n.end_col_offset:]).decode()
                new_src = "".join(lines[:n.lineno - 1]) + new_line + "".join(lines[n.lineno:])
                if new_line == line or new_src in seen:
                    continue
                try:
                    ast.parse(new_src)
                except SyntaxError:
                    continue
                seen.add(new_src)
                out.append({"file": path.name, "function": name, "line": n.lineno, "kind": kind,
                            "old": line.strip(), "new": new_line.strip(), "source": new_src})
    return sorted(out, key=lambda m: (m["line"], m["new"]))


# ----------------------------------------------------------------------------------------------------
# Running a mutant

def preload():
    """Import the heavy dependencies once, in the parent; every forked run starts with them loaded."""
    sys.dont_write_bytecode = True  # a mutant must never be read back from a stale .pyc
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import importlib
    for name in ("numpy", "pytest", "rank_bm25", "safetensors.torch", "torch", "transformers",
                 "transformers.models.qwen3.modeling_qwen3", "transformers.models.bert.modeling_bert"):
        importlib.import_module(name)


def run_pytest(workdir, spec, timeout):
    """'killed', 'survived' or 'timeout' for one `pytest -x -q` run of `spec` (files and -k) in a forked child."""
    import shlex
    # one basetemp in the copy, emptied by each run: pytest's own keeps every run's directory (tens of GB a run)
    args = ["-x", "-q", "-p", "no:cacheprovider", "--basetemp", str(workdir / ".pytest-tmp"), *shlex.split(spec)]
    pid = os.fork()
    if pid == 0:  # the child: run the tests on the copy, quietly, and exit with pytest's code
        try:
            os.setpgid(0, 0)
            os.chdir(workdir)
            sys.path[:0] = [str(workdir), str(workdir / "tests")]
            fd = os.open(workdir / ".mutant-output", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            import pytest
            code = int(pytest.main(args))
        except BaseException:
            code = 99
        os._exit(code)
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            if code == 0:
                return "survived", ""
            if code == 5:  # no test collected: a wrong -k, not a kill
                raise SystemExit(f"mutate.py: `pytest {spec}` collected no test")
            failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", (workdir / ".mutant-output").read_text(), re.M)
            return "killed", failed[0] if failed else spec
        if time.time() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", spec
        time.sleep(0.05)


def tally(all_mutants, logs):
    outcome = {}
    for log in logs:
        for ln in Path(log).read_text().splitlines():
            # the mutant, less the test that killed it or the reason it is equivalent
            hit = re.match(r"\[\d+/\d+ +\d+s\] (\w+) +(.*?)(?:   \(.*|   equivalent: .*)?$", ln)
            if hit:
                outcome[unlined(hit[2])] = hit[1]
    counts = {"killed": 0, "equivalent": 0, "survived": 0, "not run": 0}
    for m in all_mutants:
        o = outcome.get(unlined(describe(m)), "not run")
        o = "killed" if o == "timeout" else o
        if o in ("survived", "equivalent"):
            o = "equivalent" if (m["function"], m["new"]) in EQUIVALENT else "survived"
        counts[o] += 1
        if o in ("survived", "not run"):
            print(f"{o.upper()} {describe(m)}")
    scored = len(all_mutants) - counts["equivalent"]
    print(f"\n{len(all_mutants)} mutants: {counts['killed']} killed, {counts['equivalent']} equivalent, "
          f"{counts['survived']} survived, {counts['not run']} not run; "
          f"score {counts['killed']}/{scored} = {counts['killed'] / max(1, scored):.1%}")
    return 0 if counts["survived"] + counts["not run"] == 0 else 1


def describe(m):
    return f"{m['file']}:{m['line']} {m['function']} [{m['kind']}] {m['old']}  ->  {m['new']}"


def unlined(text):
    """A mutant's description (or a log line holding one) without its line number: an earlier run's log still
    names the mutants after edits above them have moved their lines.

    >>> unlined("[3/9  12s] survived   grpo.py:600 grpo_loss [compare] a < b  ->  a <= b")
    '[3/9  12s] survived   grpo.py grpo_loss [compare] a < b  ->  a <= b'
    """
    return re.sub(r"\.py:\d+ ", ".py ", text, count=1)


def copy_repo(dest):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--list", action="store_true", help="print the mutants, run nothing")
    p.add_argument("--only", default="", help="comma-separated function names")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant")
    p.add_argument("--survivors", metavar="LOG", help="only the mutants that survived in this earlier output")
    p.add_argument("--skip-done", metavar="LOG", help="leave out the mutants already reported in this earlier output")
    p.add_argument("--tally", metavar="LOG", nargs="+", help="run nothing: the score of the current mutants from "
                   "earlier outputs (the last outcome of each), for a check run in parts")
    args = p.parse_args(argv)
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    all_mutants = [m for f in TARGETS for m in mutants(ROOT / f) if not only or m["function"] in only]
    if args.survivors:
        log = [unlined(ln) for ln in Path(args.survivors).read_text().splitlines() if "] survived " in ln]
        all_mutants = [m for m in all_mutants if any(unlined(describe(m)) in ln for ln in log)
                       and (m["function"], m["new"]) not in EQUIVALENT]
    if args.skip_done:
        log = [unlined(ln) for ln in Path(args.skip_done).read_text().splitlines() if ln.startswith("[")]
        all_mutants = [m for m in all_mutants if not any(unlined(describe(m)) in ln for ln in log)]
    if args.tally:
        return tally(all_mutants, args.tally)
    if args.list:
        for m in all_mutants:
            print(f"{m['file']}:{m['line']} {m['function']} [{m['kind']}]  {m['old']}  ->  {m['new']}")
        print(f"{len(all_mutants)} mutants")
        return 0
    preload()
    results = []
    with tempfile.TemporaryDirectory(prefix="igsearch-mutants-") as tmp:
        work = Path(tmp)
        copy_repo(work)
        originals = {f: (work / f).read_text() for f in TARGETS}
        for f in TARGETS:  # the unmutated code must pass its tests, or no kill means anything
            for spec in sorted({s for m in all_mutants if m["file"] == f for s in TESTS[m["function"]]}):
                if run_pytest(work, spec, args.timeout)[0] != "survived":
                    raise SystemExit(f"mutate.py: the unmutated code fails `pytest {spec}`")
        t0 = time.time()
        for i, m in enumerate(all_mutants, 1):
            (work / m["file"]).write_text(m["source"])
            outcome, by = "survived", ""
            try:
                for spec in TESTS[m["function"]]:
                    outcome, by = run_pytest(work, spec, args.timeout)
                    if outcome != "survived":
                        break
            finally:
                (work / m["file"]).write_text(originals[m["file"]])
            why = EQUIVALENT.get((m["function"], m["new"]))
            if outcome == "survived" and why:
                outcome = "equivalent"
            results.append({**m, "outcome": outcome, "by": by, "why": why})
            print(f"[{i}/{len(all_mutants)} {time.time() - t0:6.0f}s] {outcome:10s} {describe(m)}"
                  + (f"   ({by})" if by else "")
                  + (f"   equivalent: {why}" if outcome == "equivalent" else ""), flush=True)
    killed = sum(r["outcome"] in ("killed", "timeout") for r in results)
    equivalent = sum(r["outcome"] == "equivalent" for r in results)
    survived = [r for r in results if r["outcome"] == "survived"]
    print(f"\n{len(results)} mutants: {killed} killed, {equivalent} equivalent, {len(survived)} survived; "
          f"score {killed}/{len(results) - equivalent} = {killed / max(1, len(results) - equivalent):.1%}")
    for r in survived:
        print(f"SURVIVED {describe(r)}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
