"""Shared test set-up: the repository root on sys.path, and where the real QA data lives."""
import sys
from pathlib import Path

import pytest

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
    import grpo
    monkeypatch.setattr(grpo, "bf16_native", lambda device: False)
