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
