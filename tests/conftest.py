"""Shared test set-up: the repository root on sys.path, where the real QA data lives, one torch thread,
optional tools that CI must have, and the helpers several test files use (enc, make_rollout, loss_and_grads).

tests/ is on sys.path while pytest runs (this file's folder, rootdir-style), so a test file imports the plain
helpers by name: `from conftest import enc, make_rollout`. Fixtures need no import."""
import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_file(name):
    """A file from ../shared/data, or skip the test with the reason (a user's clone has no ../shared)."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (real QA data lives beside the repository on the project's machines)")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Every test gets its own BM25/data cache so that tests never see each other's files.
    monkeypatch.setenv("IGSEARCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def _auto_precision_is_fp32(monkeypatch):
    # precision "auto" (the default) means fp32 in tests, so that hand-computed expectations hold to 1e-6; the
    # tests of bf16 ask for it by name (precision="bf16").
    import engine
    monkeypatch.setattr(engine, "bf16_native", lambda device: False)


@contextlib.contextmanager
def one_torch_thread():
    """One intra-op torch thread inside the block, the caller's number again after it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _one_thread():
    # One intra-op thread in every test: the numbers compared bit for bit (seeded runs, resume, α = 0 against
    # outcome-only) are then summed in the same order on every machine, whatever its cores or its load.
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def one_thread_per_module():
    """One thread for a whole module, its module-scoped fixtures included (the autouse `_one_thread` above
    starts with each test, after those fixtures are made). A module asks for it with
    `pytestmark = pytest.mark.usefixtures("one_thread_per_module")` when a module fixture computes numbers that
    its tests compare bit for bit (tests/test_ranks.py: one process against the workers, which torchrun starts
    at one thread), or whose forward passes should not wait on OpenMP threads on a shared CPU."""
    with one_torch_thread():
        yield


def require_tool(present, tool, install):
    """Skip a test whose optional tool is absent, naming it; in CI (CI=true), where .ci/run installs every
    such tool, its absence is a failure instead, so that no test is silently skipped there."""
    if present:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{tool} is absent in CI: .ci/run must install it ({install})")
    pytest.skip(f"{tool} is absent (optional tool: {install})")


@pytest.fixture(scope="module")
def tiny():
    """(model, tok): a tiny random-initialised Qwen3 and the Qwen3 tokenizer, one per test module. Tests that
    change the weights deep-copy the model first."""
    import runs
    model, tok = runs.tiny_random_model(seed=0)
    return model.eval(), tok


@pytest.fixture(scope="module")
def tok(tiny):
    return tiny[1]


# ----------------------------------------------------------------------------------------------------
# Helpers for the test files: plain functions, imported with `from conftest import ...`

def enc(tok, text):
    """The ids of `text` with no special token added: how the agent loop appends every piece of a rollout."""
    return tok.encode(text, add_special_tokens=False)


# A question and three documents for hand-built rollouts (make_rollout's searches ask "capital of France")
Q = {"question": "What is the capital of France?", "golden_answers": ["Paris"]}
PARIS = {"id": "paris", "title": "Paris", "text": "Paris is the capital and largest city of France."}
LYON = {"id": "lyon", "title": "Lyon", "text": "Lyon is a city in France."}
NICE = {"id": "nice", "title": "Nice", "text": "Nice lies on the Riviera."}


def make_rollout(tok, question, group, searches, answer="Lyon", golds=("Paris",)):
    """A hand-built trajectory: prompt, one search per entry of `searches` (its documents), then an answer.

    `question` is a QA item ({"question": ..., "golden_answers": [...]}, used as it is) or the question's text,
    whose gold answers are then `golds`. Every search has the query "capital of France"."""
    import grpo
    if isinstance(question, str):
        question = {"question": question, "golden_answers": list(golds)}
    p = grpo.prompt_ids(tok, question["question"])
    r = grpo.Rollout(question=question, group=group, ids=list(p), roles=[grpo.PROMPT] * len(p))
    for docs in searches:
        s = grpo._append(r, enc(tok, "<search> capital of France </search>"), grpo.POLICY)
        info = grpo._append(r, enc(tok, grpo.information_block(docs)), grpo.OBS)
        r.searches.append({"query": "capital of France", "docs": docs, "query_span": s, "info_span": info})
    grpo._append(r, enc(tok, f"<answer> {answer} </answer>"), grpo.POLICY)
    r.answer = answer
    return r


def loss_and_grads(model, batch, A):
    """The GRPO loss of a whole collated batch at ratio 1 (logp_old = the detached logp, no KL) for per-token
    advantages A, one backward pass, and (loss detached, {parameter name: its gradient, cloned; None where the
    backward left none}). The model's gradients are cleared first; the new ones stay on it."""
    import grpo
    model.zero_grad(set_to_none=True)
    mask = batch.policy_mask
    logp = grpo.token_logprobs(model, batch.ids, batch.attention_mask, mask)
    loss, _ = grpo.grpo_loss(logp, logp.detach(), None, A, mask, beta_kl=0.0)
    loss.backward()
    return loss.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
