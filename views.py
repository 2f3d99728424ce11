"""What a run looks like: the per-token advantage views (HTML and terminal), tables, training curves.

    python igsearch.py show --run runs/igsearch-s0 --step 0          # tokens coloured by their advantage A[i, k]
    python igsearch.py plot --run runs/outcome-s0 runs/igsearch-s0   # training curves, overlaid
"""
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch

import grpo
from retrieve import DataError
from runs import ArgParser, output_file, read_json, read_metrics, terminal_safe


# ----------------------------------------------------------------------------------------------------
# The per-token advantage view: A [B, T] drawn over the tokens (python igsearch.py show --run DIR --step N)

def view_records(rollouts, tok):
    """Rollouts as plain JSON-able dicts, each token decoded on its own (so `show` needs no tokenizer)."""
    return [{"question": r.question["question"], "golds": r.question["golden_answers"], "group": r.group,
             "tokens": [tok.decode([t]) for t in r.ids], "roles": list(r.roles), "answer": r.answer,
             "reward": float(r.reward),
             "searches": [{"query": s["query"], "query_span": list(s["query_span"]), "ig": s.get("ig")}
                          for s in r.searches]} for r in rollouts]


def adv_rgb(a, scale):
    """Diverging scale: blue (-scale) .. white (0) .. red (+scale)."""
    t = max(-1.0, min(1.0, a / scale)) if scale > 0 else 0.0
    fade = round(255 * (1 - abs(t)))
    return (255, fade, fade) if t > 0 else (fade, fade, 255)


def _spans(rec):
    """Token index -> (search step, IG) for tokens inside a query span."""
    where = {}
    for t, s in enumerate(rec["searches"]):
        for k in range(*s["query_span"]):
            where[k] = (t, s["ig"])
    return where


def html_from_records(records, A, title, scale=None):
    import html
    escape = lambda text: html.escape(terminal_safe(text))  # control characters shown, never sent on
    A = torch.as_tensor(A, dtype=torch.float32)
    scale = scale or float(A.abs().max()) or 1.0
    legend = "".join(f'<span class="t" style="background:rgb{adv_rgb(v * scale, scale)}">{v * scale:+.2f}</span>'
                     for v in (-1, -0.5, 0, 0.5, 1))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title><style>"
             "body{font-family:sans-serif;margin:1em} .roll{border-top:1px solid #ccc;padding:.5em 0}"
             ".toks{font-family:monospace;white-space:pre-wrap;line-height:1.9}"
             ".t{padding:1px 0} .grey{color:#999;background:#f3f3f3} "
             ".query{outline:2px solid #222;outline-offset:1px} .ig{font-size:75%;font-weight:bold;"
             "background:#ffd;border:1px solid #222;margin-left:3px;padding:0 2px}</style></head><body>",
             f"<h2>{escape(title)}</h2><p>Per-token advantage A[i, k] on policy tokens: "
             f"{legend} (blue negative, white 0, red positive). Prompt and observation tokens are grey; "
             "query spans are outlined, with their information gain.</p>"]
    for i, rec in enumerate(records):
        q = _spans(rec)
        parts.append(f"<div class='roll'><b>rollout {i}</b> (group {rec['group']}) &nbsp; reward "
                     f"{rec['reward']:.3f} &nbsp; answer {escape(repr(rec['answer']))} &nbsp; gold "
                     f"{escape(' | '.join(rec['golds']))}<div class='toks'>")
        in_prompt = False
        for k, (text, role) in enumerate(zip(rec["tokens"], rec["roles"])):
            if role == grpo.PROMPT and not in_prompt:
                parts.append("<details><summary>prompt</summary>")
                in_prompt = True
            if role != grpo.PROMPT and in_prompt:
                parts.append("</details>")
                in_prompt = False
            if k in q and (k == 0 or q.get(k - 1, (None,))[0] != q[k][0]):
                parts.append(f"<span class='query' title='search step {q[k][0]}'>")
            a = float(A[i, k]) if k < A.shape[1] else 0.0
            if role == grpo.POLICY:
                parts.append(f'<span class="t" style="background:rgb{adv_rgb(a, scale)}" title="A={a:+.3f}">'
                             f"{escape(text)}</span>")
            else:
                parts.append(f'<span class="t grey">{escape(text)}</span>')
            if k in q and q.get(k + 1, (None,))[0] != q[k][0]:
                ig = q[k][1]
                parts.append("</span>" + (f"<span class='ig'>IG {ig:+.3f}</span>" if ig is not None else ""))
        parts.append(("</details>" if in_prompt else "") + "</div></div>")
    parts.append("</body></html>")
    return "".join(parts)


def render_html(rollouts, A, tok, title="", scale=None):
    """A self-contained HTML page (no script, no network) of a group's rollouts coloured by A [B, T]."""
    return html_from_records(view_records(rollouts, tok), A, title, scale)


def ansi_from_records(records, A, title, scale=None, prompt=False):
    A = torch.as_tensor(A, dtype=torch.float32)
    scale = scale or float(A.abs().max()) or 1.0
    lines = [f"{terminal_safe(title)}  (background: A, blue < 0 < red, |A| = {scale:.3f} is full colour; grey: prompt/obs; "
             "underlined: query)"]
    for i, rec in enumerate(records):
        q = _spans(rec)
        lines.append(f"\n== rollout {i} (group {rec['group']})  reward {rec['reward']:.3f}  answer {rec['answer']!r}")
        out = []
        for k, (text, role) in enumerate(zip(rec["tokens"], rec["roles"])):
            if role == grpo.PROMPT and not prompt:
                continue
            under, text = "\x1b[4m" if k in q else "", terminal_safe(text)
            if role == grpo.POLICY:
                r, g, b = adv_rgb(float(A[i, k]), scale)
                out.append(f"\x1b[48;2;{r};{g};{b}m\x1b[30m{under}{text}\x1b[0m")
            else:
                out.append(f"\x1b[90m{text}\x1b[0m")
            if k in q and q.get(k + 1, (None,))[0] != q[k][0] and q[k][1] is not None:
                out.append(f"\x1b[1m[IG {q[k][1]:+.3f}]\x1b[0m")
        lines.append("".join(out))
    return "\n".join(lines) + "\n"


def render_ansi(rollouts, A, tok, title="", scale=None, prompt=False):
    """The terminal version of render_html (24-bit colour escapes); the prompt is left out unless asked."""
    return ansi_from_records(view_records(rollouts, tok), A, title, scale, prompt)


def save_view(out, step, rollouts, A, tok):
    """views/step_N.json (tokens, roles, spans, IG, rewards, A) and views/step_N.html."""
    views = Path(out) / "views"
    views.mkdir(parents=True, exist_ok=True)
    records = view_records(rollouts, tok)
    rows = [A[i, :len(rec["tokens"])].tolist() for i, rec in enumerate(records)]
    (views / f"step_{step}.json").write_text(json.dumps({"step": step, "rollouts": records, "A": rows}))
    (views / f"step_{step}.html").write_text(html_from_records(records, pad_rows(rows), f"{out} step {step}"))


def pad_rows(rows):
    T = max(len(r) for r in rows)
    return [r + [0.0] * (T - len(r)) for r in rows]


ROLES = (grpo.PAD, grpo.PROMPT, grpo.POLICY, grpo.OBS)


def read_view(path):
    """A saved step (views/step_N.json), checked field by field: a received file with fields of the wrong
    type or shape is refused in one line, never drawn (nor allowed to break the page or the terminal)."""
    view = read_json(path, "a saved step")
    recs, A = view.get("rollouts"), view.get("A")
    bad = lambda what: DataError(f"{path}: {what}; not a view this program wrote (train with --show-every to save one)")
    if type(view.get("step")) is not int or not isinstance(recs, list) or not isinstance(A, list) or len(A) != len(recs):
        raise bad("needs an integer 'step', a list 'rollouts' and one row of 'A' per rollout")
    for i, (r, row) in enumerate(zip(recs, A)):
        if not _rollout_ok(r, row):
            raise bad(f"rollout {i} lacks a field or has one of the wrong type")
        if not all(_search_ok(s, len(r["tokens"])) for s in r["searches"]):
            raise bad(f"rollout {i} has a search that is not {{query, query_span [start, end], ig}}")
    return view


def _number(v):
    return type(v) in (int, float) and math.isfinite(v)


def _strings(xs):
    return isinstance(xs, list) and all(isinstance(x, str) for x in xs)


def _rollout_ok(r, row):
    """One saved rollout as view_records writes it, and its row of A: finite numbers."""
    return (isinstance(r, dict) and isinstance(r.get("question"), str) and type(r.get("group")) is int
            and _strings(r.get("golds")) and _strings(r.get("tokens"))
            and isinstance(r.get("roles"), list) and len(r["roles"]) == len(r["tokens"])
            and all(type(x) is int and x in ROLES for x in r["roles"])
            and (r.get("answer") is None or isinstance(r["answer"], str)) and _number(r.get("reward"))
            and isinstance(r.get("searches"), list) and isinstance(row, list) and all(map(_number, row)))


def _search_ok(s, n_tokens):
    span = s.get("query_span") if isinstance(s, dict) else None
    return (isinstance(span, list) and len(span) == 2 and all(type(k) is int for k in span)
            and 0 <= span[0] <= span[1] <= n_tokens and isinstance(s.get("query"), str)
            and (s.get("ig") is None or _number(s["ig"])))


def saved_steps(run):
    """{step: path} of RUN/views/step_N.json."""
    views = Path(run) / "views"
    found = [(re.fullmatch(r"step_(\d+)\.json", f.name), f) for f in views.iterdir()] if views.is_dir() else []
    return dict(sorted((int(m.group(1)), f) for m, f in found if m))


def show_command(argv):
    p = ArgParser(prog="igsearch.py show", description="Render a saved training step: tokens coloured by their "
                  "advantage A[i, k]")
    p.add_argument("--run", required=True)
    p.add_argument("--step", type=int, default=None, help="default: the last saved step")
    p.add_argument("--html", default=None, help="write the HTML page here (default: print to the terminal)")
    p.add_argument("--prompt", action="store_true", help="show the prompt tokens in the terminal too")
    args = p.parse_args(argv)
    html_out = output_file(args.html, "--html", "view") if args.html else None
    saved = saved_steps(args.run)
    if not saved:
        raise DataError(f"{args.run}: no saved steps (views/step_N.json); train with --show-every 1")
    step = args.step if args.step is not None else max(saved)
    if step not in saved:
        raise DataError(f"{args.run}: step {args.step} was not saved (saved steps: {', '.join(map(str, saved))})")
    view = read_view(saved[step])
    A, title = pad_rows(view["A"]), f"{args.run} step {view['step']}"
    if html_out:
        html_out.write_text(html_from_records(view["rollouts"], A, title))
        print(f"wrote {html_out}")
    else:
        sys.stdout.write(ansi_from_records(view["rollouts"], A, title, prompt=args.prompt))


# ----------------------------------------------------------------------------------------------------
# Tables

def print_table(rows, columns):
    """Rows (dicts) as aligned columns on the terminal, floats to 3 decimals; every cell through terminal_safe."""
    cell = lambda r, c: f"{r[c]:.3f}" if isinstance(r.get(c), float) else terminal_safe(r.get(c, ""))
    widths = [max(len(c), *(len(cell(r, c)) for r in rows)) for c in columns]
    line = lambda vals: "  ".join(str(v).ljust(w) for v, w in zip(vals, widths))
    print(line(columns))
    for r in rows:
        print(line([cell(r, c) for c in columns]))


# ----------------------------------------------------------------------------------------------------
# python igsearch.py plot --run DIR [DIR ...]: training curves, runs overlaid

CURVES = [("reward", ("reward",)), ("EM", ("em",)), ("information gain", ("ig_mean", "ir_ig_mean")),
          ("KL to reference", ("kl",)), ("response length (tokens)", ("response_len",)),
          ("searches per rollout", ("searches",))]


def curves(run_dir):
    """{panel title: (steps, values)} of one run; the IG panel reads ig_mean (IG-Search) or ir_ig_mean
    (InfoReasoner), and a run without either has no IG curve. A run with no logged step, or a value that is
    not a number, is a DataError naming the file."""
    rows = read_metrics(run_dir)
    if not rows:
        raise DataError(f"{Path(run_dir) / 'metrics.jsonl'}: no completed step yet; nothing to plot")
    out = {}
    for title, keys in CURVES:
        key = next((k for k in keys if any(k in r for r in rows)), None)
        if key is not None:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            for step, v in pts:
                if type(v) not in (int, float):
                    raise DataError(f"{Path(run_dir) / 'metrics.jsonl'}: step {step} has {key} = {v!r}, not a number")
            out[title] = ([s for s, _ in pts], [v for _, v in pts])
    return out


def plot_runs(runs, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DataError("plot needs matplotlib, which is not installed: pip install matplotlib") from None
    data = {str(r): curves(r) for r in runs}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (title, _) in zip(axes.flat, CURVES):
        for i, (run, c) in enumerate(data.items()):
            if title in c:  # a fixed colour per run: a run missing from one panel must not shift the others
                ax.plot(*c[title], color=f"C{i}", label=Path(run).name, marker="." if len(c[title][0]) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(handles=[plt.Line2D([], [], color=f"C{i}", label=Path(r).name) for i, r in enumerate(data)])
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


FIGURE_TYPES = (".png", ".pdf", ".svg")


def plot_command(argv):
    p = ArgParser(prog="igsearch.py plot", description="Training curves of runs, overlaid: reward, "
                  "EM, IG, KL, response length, searches per rollout vs step")
    p.add_argument("--run", nargs="+", required=True, help="run directories")
    p.add_argument("--out", default=None, help="PNG file (default RUN/curves.png for one run, else curves.png)")
    args = p.parse_args(argv)
    out = output_file(args.out or (Path(args.run[0]) / "curves.png" if len(args.run) == 1 else "curves.png"),
                      "--out", "figure")
    if out.suffix.lower() not in FIGURE_TYPES:
        raise DataError(f"--out {out}: a figure is written as {', '.join(FIGURE_TYPES)}; name the file so")
    for r in args.run:
        curves(r)  # a bad or empty run fails before matplotlib is asked for
    print(f"wrote {plot_runs(args.run, out)}")


# ----------------------------------------------------------------------------------------------------
# python experiments.py compare --tiny: one row per reward, one table, the curves overlaid

EVAL_METRICS = ("em", "f1", "answered", "searches")  # what evaluate() reports per question


N_BOOT = 2000  # resamples of every bootstrap interval; the tables say so


def bootstrap_ci(values, n_boot=N_BOOT, seed=0):
    """The 95% percentile-bootstrap interval of the mean over questions (resampled with replacement).

    >>> bootstrap_ci([1.0] * 10)
    [1.0, 1.0]
    """
    v = np.asarray(values, dtype=float)
    if not len(v):
        return [float("nan"), float("nan")]
    means = v[np.random.default_rng(seed).integers(0, len(v), (n_boot, len(v)))].mean(1)   # [n_boot]
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def print_evals(rows, columns=EVAL_METRICS):
    """One line per (name, evaluation summary): each metric as mean [95% interval]."""
    cell = lambda s, k: f"{s[k]:.3f} [{s[k + '_ci'][0]:.2f}, {s[k + '_ci'][1]:.2f}]" if k + "_ci" in s else ""
    print_table([{"when": name, "n": s.get("n", 0), **{k: cell(s, k) for k in columns}} for name, s in rows],
                ["when", *columns, "n"])


def flat_groups_line(steps, cfg, out):
    """The closing line on the groups GRPO could not learn from: those with no reward spread (every rollout
    scored alike, so Â = 0 and outcome has no gradient there), and what IG-Search's query bonus gave them."""
    flat = sum(m.get("zero_adv_groups", 0) for m in steps)
    failed = sum(m.get("all_fail_groups", 0) for m in steps)
    dead = sum(m.get("zero_adv_groups", 0) == cfg.questions_per_step for m in steps)
    line = (f"groups without reward spread: {flat} of {len(steps) * cfg.questions_per_step} ({failed} where every "
            f"rollout failed); {dead} of {len(steps)} steps had no spread in any group")
    if cfg.reward == "igsearch":
        credit = sum(m.get("flat_group_credit_tokens", 0) for m in steps)
        line += f"; IG-Search gave {credit} query tokens in those groups an advantage"
        shown = [m["step"] for m in steps if m.get("flat_group_credit_tokens") and cfg.show_every
                 and m["step"] % cfg.show_every == 0]
        if shown:
            line += f" (see them: python igsearch.py show --run {out} --step {shown[0]})"
    elif flat and cfg.reward == "outcome":
        line += " (no gradient there; --reward igsearch credits their queries)"
    return line


def paired_gain(after, start, metric="em"):
    """The mean per-question change of `metric` from `start` to `after` (evaluation summaries holding
    "each", evaluate's per-question values) over the questions both answered, matched by id, with its 95%
    bootstrap interval: one interval on the difference, far narrower than two intervals side by side, since
    both models met the same questions. None when either summary lacks per-question values.

    >>> a = {"each": {"id": ["q1", "q2", "q3", "q4"], "em": [1.0, 1.0, 0.0, 1.0]}}
    >>> b = {"each": {"id": ["q4", "q3", "q2", "q1"], "em": [0.0, 0.0, 1.0, 1.0]}}
    >>> paired_gain(a, b)["gain"]
    0.25
    """
    if "each" not in after or "each" not in start:
        return None
    before = dict(zip(start["each"]["id"], start["each"][metric]))
    diffs = [x - before[q] for q, x in zip(after["each"]["id"], after["each"][metric]) if q in before]
    return {"gain": float(np.mean(diffs)), "gain_ci": bootstrap_ci(diffs), "n": len(diffs)} if diffs else None


def compare_rows(runs, results, evals):
    """One row per evaluated model: the start (and the model before the warm-up), then each run, with its
    paired change from the start (em_gain, answered_gain: paired_gain)."""
    rows = []
    if evals:
        rows += [{"model": "before warm-up", **flat_eval(evals["before"])}] if evals["before"] else []
        rows += [{"model": "warm-up (start of every run)", **flat_eval(evals["warm-up"])}]
    elif runs:
        rows.append({"model": "start", **flat_eval(results[runs[0]]["before"])})
    for run in runs:
        steps = read_metrics(run)
        ig = [m[k] for m in steps for k in ("ig_mean", "ir_ig_mean") if k in m]
        start = evals["warm-up"] if evals else results[run]["before"]
        gains = {}
        for metric in ("em", "answered"):
            g = paired_gain(results[run]["after"], start, metric) or {}
            gains.update({f"{metric}_gain": g.get("gain"), f"{metric}_gain_ci": g.get("gain_ci")})
        rows.append({"model": run.name, **flat_eval(results[run]["after"]), **gains,
                     "mean_ig": float(np.mean(ig)) if ig else None, "mean_ig_ci": bootstrap_ci(ig) if ig else None,
                     "train_reward": (float(np.mean([m["reward"] for m in steps if "reward" in m]))
                                      if any("reward" in m for m in steps) else None),  # control: no reward
                     # the median: a run paused or resumed on a busy machine has a few steps of hours
                     "s_per_step": float(np.median([sum(v for k, v in m.items() if k.startswith("time_"))
                                                    for m in steps])) if steps else None})
    return rows


def seed_rows(runs, results, evals):
    """One row per reward over all its seeds (one seed or more). The unit is the question (every seed met
    the same ones): a question's value is its mean over the seeds, and the interval is bootstrapped over
    questions. Paired columns: the change from the start, and from outcome with the same seed, on the same
    questions. F1, searches, mean IG and train reward: the mean of the seeds' values.

    Worked example (tests/test_runs.py): two questions, seeds 0 and 1; outcome gets EM [0, 1] and [0, 0],
    igsearch [1, 1] and [0, 1]. Per question over the seeds, outcome 0 and 0.5 (EM 0.25), igsearch 0.5 and 1
    (EM 0.75); igsearch − outcome: q1 (1 − 0 + 0 − 0) / 2 = 0.5, q2 (1 − 1 + 1 − 0) / 2 = 0.5, so +0.5.
    """
    by_reward = {}
    for run in runs:
        reward, _, seed = run.name.rpartition("-s")
        by_reward.setdefault(reward, {})[seed] = run

    def per_question(pairs, metric):
        return list(_per_question(pairs, metric).values())

    def mean_ci(values):
        return (float(np.mean(values)), bootstrap_ci(values)) if values else (None, None)

    base = {s: results[r]["after"] for s, r in by_reward.get("outcome", {}).items()}  # outcome, by seed
    rows = []
    for reward, seeds in by_reward.items():
        after = {s: results[r]["after"] for s, r in seeds.items()}
        start = {s: evals["warm-up"] if evals else results[r]["before"] for s, r in seeds.items()}
        row = {"model": reward, "seeds": ",".join(sorted(seeds, key=int)),
               "n": len(per_question([(a, None) for a in after.values()], "em"))}
        for metric in ("em", "answered"):
            row[metric], row[metric + "_ci"] = mean_ci(per_question([(a, None) for a in after.values()], metric))
            row[metric + "_gain"], row[metric + "_gain_ci"] = mean_ci(
                per_question([(after[s], start[s]) for s in after], metric))
            shared = [s for s in after if s in base]
            row[metric + "_vs_outcome"], row[metric + "_vs_outcome_ci"] = (mean_ci(
                per_question([(after[s], base[s]) for s in shared], metric)) if reward != "outcome" and shared
                else (None, None))
        for metric in ("f1", "searches"):
            values = [a[metric] for a in after.values() if a.get(metric) is not None]
            row[metric] = float(np.mean(values)) if values else None
        steps = {s: read_metrics(r) for s, r in seeds.items()}
        ig = [float(np.mean(v)) for v in ([m[k] for m in ms for k in ("ig_mean", "ir_ig_mean") if k in m]
                                           for ms in steps.values()) if v]
        rewards = [float(np.mean([m["reward"] for m in ms])) for ms in steps.values() if ms and "reward" in ms[0]]
        row["mean_ig"] = float(np.mean(ig)) if ig else None
        row["train_reward"] = float(np.mean(rewards)) if rewards else None
        rows.append(row)
    return rows


def sign_test(diffs):
    """The exact two-sided sign test of paired differences: only the discordant questions, where one side did
    better, count (ties carry no information). Returns (better, worse, p).

    >>> sign_test([1.0, 1.0, 0.5, 1.0, 1.0, 0.0, 0.0, -1.0])
    (5, 1, 0.21875)
    """
    better, worse = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    n, k = better + worse, min(better, worse)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return better, worse, p


def question_kinds(summary):
    """{question id: its kind}: HotpotQA's type (bridge, comparison) where the records have it, else hops."""
    each = summary.get("each", {})
    for key in ("type", "hops"):
        kinds = each.get(key) or []
        if len({k for k in kinds if k is not None}) > 1:
            return dict(zip(each["id"], kinds))
    return {}


def pairwise_rows(runs, results, evals, metric="em"):
    """Each arm against the start, outcome and the control, over all questions and by kind (question_kinds):
    per question the mean over the seeds of (arm − baseline), with baseline of the same seed (the start is
    one model for all seeds); its mean with the bootstrap interval, and the sign test on the discordant
    questions. One row per (arm, baseline, kind)."""
    by_arm = {}
    for run in runs:
        arm, _, seed = run.name.rpartition("-s")
        by_arm.setdefault(arm, {})[seed] = results[run]["after"]
    start = evals.get("warm-up") if evals else None
    kinds = question_kinds(start or next(iter(results.values()), {}).get("after", {}))
    rows = []
    for arm, after in by_arm.items():
        # outcome against the control, not the control against outcome too: one sign flip of the other
        others = [] if arm == "control" else ["control"] if arm == "outcome" else ["outcome", "control"]
        baselines = [("start", {s: start for s in after} if start else {})] + [(b, by_arm.get(b, {})) for b in others]
        for name, base in baselines:
            seeds = [s for s in after if s in base]
            if not seeds:
                continue
            diffs = _per_question([(after[s], base[s]) for s in seeds], metric)
            for kind in [None, *sorted(set(kinds.values()), key=str)]:
                d = [x for q, x in diffs.items() if kind is None or kinds.get(q) == kind]
                if not d:
                    continue
                better, worse, p = sign_test(d)
                rows.append({"arm": arm, "vs": name, "kind": "all" if kind is None else str(kind), "n": len(d),
                             "seeds": ",".join(sorted(seeds, key=int)), "diff": float(np.mean(d)),
                             "diff_ci": bootstrap_ci(d), "better": better, "worse": worse, "p": p})
    return rows


def pairwise_table(rows, metric="EM"):
    """pairwise_rows as a Markdown table."""
    lines = [f"| arm | vs | questions | seeds | {metric} difference [95% CI] | better / worse | sign test p |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        kind = "" if r["kind"] == "all" else f" ({md_text(r['kind'])})"
        lines.append(f"| {r['arm']}{kind} | {r['vs']} | {r['n']} | {r['seeds']} | {r['diff']:+.3f} "
                     f"[{r['diff_ci'][0]:+.3f}, {r['diff_ci'][1]:+.3f}] | {r['better']} / {r['worse']} | {r['p']:.3g} |")
    return "\n".join(lines)


def _per_question(pairs, metric):
    """[(after, baseline or None)] evaluation summaries -> {question id: the mean over the pairs of after
    (− baseline)}, over the questions every pair holds."""
    tables = [(_each(a, metric), _each(b, metric) if b is not None else None) for a, b in pairs]
    common = set.intersection(*(set(a) & (set(b) if b is not None else set(a)) for a, b in tables))
    return {q: float(np.mean([a[q] - (b[q] if b is not None else 0.0) for a, b in tables])) for q in sorted(common)}


def _each(summary, metric):
    return dict(zip(summary["each"]["id"], summary["each"][metric])) if "each" in summary else {}


def seed_table(rows):
    """seed_rows as a Markdown table: mean [95% interval] per cell, changes signed."""
    cols = [("EM", "em"), ("answered", "answered"), ("EM − start", "em_gain"), ("EM − outcome", "em_vs_outcome"),
            ("answered − outcome", "answered_vs_outcome"), ("F1", "f1"), ("searches", "searches"),
            ("mean IG (train)", "mean_ig"), ("train reward", "train_reward")]
    return _markdown(rows, [("reward", "model"), ("seeds", "seeds"), ("questions", "n")], cols,
                     signed=("_gain", "_vs_outcome"))


def flat_eval(summary):
    """An evaluation summary as one flat row: all questions, then 1-hop and 2-hop apart (h1_em, h2_em, ...)."""
    row = {k: summary.get(k) for k in ("n", *EVAL_METRICS, *(m + "_ci" for m in EVAL_METRICS))}
    for h, s in summary.get("by_hops", {}).items():
        row.update({f"h{h}_{k}": s.get(k) for k in ("n", "em", "em_ci", "f1", "f1_ci")})
    for t, s in summary.get("by_type", {}).items():  # HotpotQA: bridge_em, comparison_em, ...
        row.update({f"{t}_{k}": s.get(k) for k in ("n", "em", "em_ci", "f1", "f1_ci")})
    return row


def markdown_table(rows):
    """compare's rows as a Markdown table: mean [95% interval] per cell."""
    cols = [("EM", "em"), ("F1", "f1"), ("answered", "answered"), ("searches", "searches"),
            ("EM 1-hop", "h1_em"), ("EM 2-hop", "h2_em"), ("EM bridge", "bridge_em"),
            ("EM comparison", "comparison_em"), ("EM − start (paired)", "em_gain"),
            ("answered − start (paired)", "answered_gain"), ("mean IG (train)", "mean_ig"),
            ("train reward", "train_reward"), ("s/step (median)", "s_per_step")]
    by_kind = ("h1_em", "h2_em", "bridge_em", "comparison_em")  # shown where the questions have those kinds
    cols = [(c, k) for c, k in cols if k not in by_kind or any(r.get(k) is not None for r in rows)]
    return _markdown(rows, [("model", "model"), ("n", "n")], cols)


def md_text(value):
    """Text from a file as one Markdown table cell: control characters shown, never sent on; | escaped."""
    return terminal_safe(value).replace("|", "\\|")


def _markdown(rows, plain, cols, signed=()):
    """A Markdown table: the `plain` columns as they are, then each of `cols` as mean [95% interval] (its
    key + "_ci"), signed where the key ends in one of `signed`; – where a value is missing."""
    def cell(r, k):
        v, ci = r.get(k), r.get(k + "_ci")
        if v is None:
            return "–"
        if not isinstance(v, float):
            return md_text(v)
        sign = "+" if signed and k.endswith(signed) else ""
        return f"{v:{sign}.3f} [{ci[0]:{sign}.2f}, {ci[1]:{sign}.2f}]" if ci else f"{v:.3f}"
    lines = ["| " + " | ".join(c for c, _ in plain + cols) + " |", "|---" * (len(plain) + len(cols)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([md_text(r.get(k)) for _, k in plain]
                                       + [cell(r, k) for _, k in cols]) + " |")
    return "\n".join(lines)
