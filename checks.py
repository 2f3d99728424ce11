"""Settings that cannot work are refused before anything is read or loaded, in one line each.

check_config(cfg) checks every field of igsearch.Config: its type (a hand-edited config.json), its range
(MIN_INT, MIN_FLOAT, MAX), its allowed values (CHOICES), the device and the --model path, and under torchrun that
the step's questions divide among the ranks. The error names the flag, or the file the value came from and
how to override it:

    --lr nan: must be a finite number ≥ 0
    runs/x/config.json: group_size = 1 cannot be used (must be at least 2 (...)); fix the file or override
    it with --group-size
"""
import dataclasses
import math
import os

import runs
import retrieve
from retrieve import DataError


CHOICES = {"reward": ("outcome", "igsearch", "inforeasoner"), "loss_agg": ("token-mean", "seq-mean-token-mean"),
           "ig_baseline": ("batch", "corpus"), "ir_estimator": ("prob", "log", "entropy"),
           "ir_belief": ("agent", "plain"), "eval_split": ("dev", "test"),
           "precision": ("auto", "bf16", "fp32"), "parallel": ("ddp", "fsdp")}
# the smallest value of each integer setting
MIN_INT = {"steps": 0, "questions_per_step": 1, "group_size": 2, "max_turns": 1, "topk": 1, "max_turn_tokens": 1,
           "max_response_tokens": 1, "warmup_steps": 0, "warmup_batch": 1, "ppo_epochs": 1, "token_budget": 1,
           "forward_budget": 1, "eval_questions": 0, "save_every": 1, "show_every": 0, "ig_samples": 1,
           "ig_head_tokens": 0, "ig_max_context": 1, "ir_samples": 1, "ir_max_tokens": 1, "seed": 0, "lora_rank": 0}
# the largest value of each size setting: as a flag or from a config.json, a value above is refused before anything
# is allocated (a KV cache of max_turn_tokens, a list of questions_per_step x group_size rollouts, ...), or run
# for ever. Token counts stop at the longest context of the models this is for (Qwen3's).
CONTEXT = 131072
MAX = {"steps": 10 ** 6, "questions_per_step": 10 ** 4, "group_size": 1024, "max_turns": 1024, "topk": 1000,
       "max_turn_tokens": CONTEXT, "max_response_tokens": CONTEXT, "warmup_steps": 10 ** 6, "warmup_batch": 10 ** 4,
       "ppo_epochs": 1000, "token_budget": 1 << 24, "forward_budget": 1 << 24, "eval_questions": 10 ** 7,
       "save_every": 10 ** 6, "show_every": 10 ** 6, "ig_samples": 1000, "ig_head_tokens": CONTEXT,
       "ig_max_context": CONTEXT, "ir_samples": 1000, "ir_max_tokens": CONTEXT, "pg_timeout": 7 * 24 * 3600}
# each float setting: (lowest value, whether the lowest value itself is allowed); all must be finite
MIN_FLOAT = {"temperature": (0, False), "ir_temperature": (0, True), "warmup_lr": (0, True), "lr": (0, True),
             "beta_kl": (0, True), "clip_eps": (0, False), "clip_ratio_c": (0, True), "grad_clip": (0, False),
             "ig_alpha": (0, True), "ig_delta": (0, True), "ig_rho": (0, True), "ig_clip": (0, False),
             "ig_head_weight": (0, False), "ir_lambda": (0, True), "pg_timeout": (0, True),
             "lora_alpha": (0, True)}
WHY = {"group_size": "GRPO compares rollouts within a group",
       "temperature": "0 samples greedily, so every rollout of a group is the same and GRPO learns nothing",
       "seed": "numpy takes seeds from 0 to 2**32 - 1"}


def setting_error(name, value, what):
    """A DataError about one setting, naming its flag; `.field` tells check_config's caller which one."""
    e = DataError(f"--{name.replace('_', '-')} {value!r}: {what}")
    e.field, e.what = name, what
    return e


def check_config(cfg, source=None, explicit=(), model=True):
    """Refuse settings that cannot work, in one line each: a value of the wrong type (a hand-edited
    config.json), out of range or not finite, a device this machine does not have, a --model path that is
    not there (model=False skips that: eval of a run loads the run's checkpoint). A value that came from
    `source` (a run's config.json; not among the `explicit` flags) is reported as that file's."""
    try:
        _check_config(cfg, model)
    except DataError as e:
        name = getattr(e, "field", None)
        if source is None or name is None or name in explicit:
            raise
        raise DataError(f"{source}: {name} = {getattr(cfg, name)!r} cannot be used ({e.what}); "
                        f"fix the file or override it with --{name.replace('_', '-')}") from None


TYPES = {bool: "true or false", str: "a string", int: "an integer", float: "a number"}


def _check_config(cfg, model):
    for f in dataclasses.fields(cfg):
        v, kind = getattr(cfg, f.name), type(f.default)
        if not (type(v) is kind or (kind is float and type(v) is int)):  # True is an int to Python: not here
            raise setting_error(f.name, v, f"must be {TYPES[kind]}")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise setting_error(name, getattr(cfg, name), f"is not one of {', '.join(allowed)}")
    for name, lowest in MIN_INT.items():
        if getattr(cfg, name) < lowest:
            raise setting_error(name, getattr(cfg, name), f"must be at least {lowest}" +
                                (f" ({WHY[name]})" if name in WHY else ""))
    for name, (lowest, inclusive) in MIN_FLOAT.items():
        v = getattr(cfg, name)
        if not math.isfinite(v) or v < lowest or (v == lowest and not inclusive):
            raise setting_error(name, v, f"must be a finite number {'≥' if inclusive else '>'} {lowest}" +
                                (f" ({WHY[name]})" if name in WHY else ""))
    for name, highest in MAX.items():
        if getattr(cfg, name) > highest:
            raise setting_error(name, getattr(cfg, name), f"must be at most {highest:,}")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # processes under torchrun (ranks.py); a group never spans two
    if cfg.questions_per_step % world:
        raise setting_error("questions_per_step", cfg.questions_per_step, f"does not divide among {world} ranks: "
                            "give a multiple of the number of processes")
    if cfg.seed >= 2 ** 32:
        raise setting_error("seed", cfg.seed, f"must be below 2**32 ({WHY['seed']})")
    if cfg.clip_eps >= 1:
        raise setting_error("clip_eps", cfg.clip_eps, "must be below 1 (the ratio is clipped to [1 - eps, 1 + eps])")
    if 0 < cfg.clip_ratio_c <= 1:
        raise setting_error("clip_ratio_c", cfg.clip_ratio_c, "must be 0 (off) or above 1 (verl's dual clip: "
                            "the loss of a token with A < 0 is capped at -A * c)")
    try:
        retrieve.split_percents(cfg.split)
    except ValueError as e:
        raise setting_error("split", cfg.split, str(e)) from None
    for name in ("data", "corpus", "lora_targets"):
        if not getattr(cfg, name).strip():
            raise setting_error(name, getattr(cfg, name), "is empty")
    checks = {"device": runs.pick_device, **({"model": runs.check_model_name} if model else {})}
    for name, check in checks.items():
        try:
            check(getattr(cfg, name))
        except DataError as e:
            e.field, e.what = name, str(e).split(": ", 1)[-1]
            raise
