"""Shared test set-up: the repository root on sys.path, where the real QA data lives, one torch thread, and
optional tools that CI must have."""
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


@pytest.fixture(autouse=True)
def _one_thread():
    # One intra-op thread in every test: the numbers compared bit for bit (seeded runs, resume, α = 0 against
    # outcome-only) are then summed in the same order on every machine, whatever its cores or its load.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
