"""Data-parallel training under torchrun (ranks.py), on CPU: 2 processes over gloo with the tiny random model,
spawned from here (tests/ranks_worker.py), against one process on the same questions and scripted rollouts."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checks
import igsearch
import ranks
import ranks_worker as W
import runs
from conftest import ROOT
from retrieve import DataError

# One thread for the whole module, its module fixtures included (one_process computes in this process the
# numbers the workers' are compared with): as in the workers (torchrun sets OMP_NUM_THREADS=1), one summation
# order, and no OpenMP threads waiting on each other on a shared CPU.
pytestmark = [pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                 reason="torch.distributed with gloo is not available in this torch build"),
              pytest.mark.usefixtures("one_thread_per_module")]


def torchrun(out, jobs, env=None):
    """tests/ranks_worker.py on 2 ranks; torchrun --standalone finds a free port itself."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "ranks_worker.py"), str(out), json.dumps(jobs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT,  # a busy CI machine
                          env={**os.environ, "OMP_NUM_THREADS": "1", "IGSEARCH_CACHE": str(out / "cache"),
                               **(env or {})})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def run_argv(out, steps, show=0):
    root = out.parent
    return ["--model", "tiny-random", "--data", str(root / "qa.jsonl"), "--corpus", f"jsonl:{root / 'corpus.jsonl'}",
            "--steps", str(steps), "--questions-per-step", "2", "--group-size", "2", "--max-turns", "1",
            "--max-turn-tokens", "8", "--max-response-tokens", "64", "--eval-questions", "0", "--show-every", str(show),
            "--out", str(out)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One launch of 2 ranks (the processes' start-up is most of the time): one step of each kind, then through
    igsearch.main a 2-step run (straight), a 1-step run (split) and a 1-step run after a warm-up (warm), and
    experiments.py compare of 1-step runs (compare), and a 1-step run with adapters under FSDP (lora)."""
    out = tmp_path_factory.mktemp("two-ranks")
    (out / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in W.DOCS))
    (out / "qa.jsonl").write_text("".join(json.dumps({"id": str(i), "question": f"Where was Person {i} born?",
                                                      "golden_answers": [f"City{i}"]}) + "\n" for i in range(12)))
    proc = torchrun(out, [["step"], ["main", run_argv(out / "straight", 2, show=1)],
                          ["main", run_argv(out / "split", 1)],
                          ["main", run_argv(out / "warm", 1) + ["--warmup-steps", "1", "--warmup-batch", "2",
                                                                 "--max-turn-tokens", "64", "--max-response-tokens",
                                                                 "512"]],  # room for the oracle's turns
                          ["compare", run_argv(out / "compare", 1) + ["--ir-samples", "2"]],
                          ["main", run_argv(out / "lora", 1) + ["--lora-rank", "4", "--parallel", "fsdp"]]])
    yield out, [torch.load(out / f"step_rank{r}.pt", weights_only=True) for r in (0, 1)], proc.stdout
    shutil.rmtree(out, ignore_errors=True)  # 2.3 GB of runs and per-rank steps: kept, the suite's disk use doubles


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return W.strip(W.one_step(tmp_path_factory.mktemp("bm25")))


@pytest.fixture(scope="module")
def one_process_lora(tmp_path_factory):
    return W.strip(W.one_step(tmp_path_factory.mktemp("bm25"), lora_rank=4))


def close(a, b, tol=1e-6):
    return max(float((a[k] - b[k]).detach().abs().max()) for k in a) <= tol and a.keys() == b.keys()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp", "ddp_lora", "fsdp_lora"])
def test_one_step_on_two_ranks_equals_one_process(two_ranks, one_process, one_process_lora, parallel):
    _, results, _ = two_ranks
    single = one_process_lora if parallel.endswith("_lora") else one_process
    init = W.tiny_model(0)[0].state_dict()  # with adapters: B starts at 0, and the base never moves
    start = {n: init.get(n, torch.zeros_like(w)) for n, w in single["weights"].items() if not n.endswith("lora_A")}
    assert max(float((single["weights"][n] - w).abs().max()) for n, w in start.items()) > 1e-4, \
        "the weights must move, or equal weights prove nothing"
    assert single["metrics"]["ig_steps"] == 8 and single["metrics"]["zero_adv_groups"] == 0
    for res in results:
        assert res["world"] == 2
        got = res[parallel]
        assert got["metrics"] == pytest.approx(single["metrics"], abs=1e-6)  # loss, kl, grad norm, reward, IG, ...
        assert got["questions"] == single["questions"]  # every rank holds the whole step, in question order
        assert torch.allclose(got["A"], single["A"], atol=1e-6)
        assert close(got["grads"], single["grads"]) and close(got["weights"], single["weights"])
        assert got["next_draw"] == single["next_draw"]  # the shared stream took the same draws on every rank
    o1, o2 = single["opt_state"], results[0][parallel]["opt_state"]  # FSDP: gathered whole on rank 0
    assert o1["param_groups"] == o2["param_groups"] and o1["state"].keys() == o2["state"].keys()
    assert all(close(o1["state"][i], o2["state"][i]) for i in o1["state"])


def test_ranks_whose_rows_make_unequal_micro_batches_run_as_many(two_ranks, one_process):
    # the token budget cuts rank 0's rows into 2 micro-batches and rank 1's into 3: FSDP gathers and reduces in
    # every forward and backward, so rank 0 halves its widest to run 3 too (else the ranks' collectives would
    # not pair up: a hang). The step is still the one-process step, up to the order of float sums.
    _, results, _ = two_ranks
    assert [res["fsdp_uneven"]["micro_batches"] for res in results] == [[(2, 3)], [(3, 3)]]
    assert one_process["micro_batches"] == [(4, 4)]  # one process, budget 330: two rows a micro-batch
    for res in results:
        got = res["fsdp_uneven"]
        assert got["metrics"] == pytest.approx(one_process["metrics"], abs=1e-6)
        assert close(got["grads"], one_process["grads"]) and close(got["weights"], one_process["weights"], 1e-5)


def test_the_ig_baseline_pool_holds_the_other_ranks_blocks(two_ranks, one_process):
    _, results, _ = two_ranks
    for res in results:
        for parallel in ("ddp", "fsdp"):
            got = res[parallel]
            lo, hi = got["mine"]
            assert (lo, hi) == ((0, 4) if res["rank"] == 0 else (4, 8))
            others = {q for i, q in enumerate(got["questions"]) if not lo <= i < hi}
            assert sorted(got["pools"]) == list(range(lo, hi))  # this rank drew baselines for its own rollouts
            for i, pool in got["pools"].items():
                assert others <= set(pool) and got["questions"][i] not in pool
                assert pool == one_process["pools"][i]


def test_inforeasoner_samples_on_each_rank_for_its_own_questions(two_ranks):
    _, (r0, r1), _ = two_ranks
    assert r0["inforeasoner"]["sampled_for"] == ["q1", "q1", "q4", "q4"]
    assert r1["inforeasoner"]["sampled_for"] == ["q7", "q7", "q10", "q10"]
    m0, m1 = r0["inforeasoner"]["metrics"], r1["inforeasoner"]["metrics"]
    assert m0 == m1 and m0["ir_extra_tokens"] > 0  # reduced over ranks: every rank logs the same step
    assert torch.equal(r0["inforeasoner"]["A"], r1["inforeasoner"]["A"])


def test_an_fsdp_checkpoint_is_the_one_process_checkpoint(two_ranks, one_process):
    out, results, _ = two_ranks
    for res in results:  # written by rank 0 from the shards, loaded back into fresh shards on both ranks
        assert close(res["fsdp_roundtrip"]["weights"], one_process["weights"])
    back = results[0]["fsdp_roundtrip"]["opt_state"]
    assert all(close(back["state"][i], one_process["opt_state"]["state"][i]) for i in back["state"])
    # and one process resumes from it like from its own
    _, weights, opt_state, state = runs.last_checkpoint(out / "fsdp-run")
    model, _ = W.tiny_model(1)
    runs.load_weights(model, weights)
    assert close(dict(model.named_parameters()), one_process["weights"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.load_state_dict(opt_state)
    assert state["step"] == 1


def metrics(run):
    return [{k: v for k, v in json.loads(ln).items() if not k.startswith("time_")}
            for ln in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run, step):
    return load_file(run / "ckpt" / f"step_{step:06d}" / "model" / "model.safetensors")


def test_a_two_rank_run_writes_once_and_resumes_on_two_ranks_or_one(two_ranks, tmp_path, monkeypatch):
    out, _, stdout = two_ranks
    straight, split, one = out / "straight", tmp_path / "split", tmp_path / "one"
    started = [ln for ln in stdout.splitlines() if ln.startswith("run ") and "2 ranks (ddp)" in ln]
    assert len(started) == 6  # straight, split, warm and compare's three: rank 0 alone prints
    assert [m["step"] for m in metrics(straight)] == [0, 1]  # one line per step: rank 0 alone writes
    assert sorted(p.name for p in (straight / "views").iterdir()) == [f"step_{s}.{x}" for s in range(2)
                                                                        for x in ("html", "json")]
    assert len(json.loads((straight / "views" / "step_0.json").read_text())["rollouts"]) == 4  # the whole step
    state = torch.load(straight / "ckpt" / "step_000002" / "state.pt", weights_only=True)
    assert len(state["generators"]) == 2 and not torch.equal(state["generators"][0], state["generators"][1])
    a, w0 = weights(straight, 2), W.tiny_model(0)[0].state_dict()
    assert not all(torch.equal(a[k], w0[k]) for k in a), "the weights must move, or the test proves nothing"

    # the 1-step run, resumed on 2 ranks in new processes: the uninterrupted run
    shutil.copytree(out / "split", split)
    shutil.copytree(out / "split", one)
    torchrun(out, [["main", ["--resume", str(split), "--steps", "2"]]])
    assert metrics(split) == metrics(straight)
    b = weights(split, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)

    # and resumed by one process: it goes on where the two ranks stopped
    monkeypatch.setenv("IGSEARCH_CACHE", str(out / "cache"))
    monkeypatch.setattr(igsearch, "score_outcome", W.varied_reward)
    assert igsearch.main(["--resume", str(one), "--steps", "2"]) == 0
    assert [m["step"] for m in metrics(one)] == [0, 1] and metrics(one)[:1] == metrics(straight)[:1]
    assert len(torch.load(one / "ckpt" / "step_000002" / "state.pt", weights_only=True)["generators"]) == 1


def test_an_fsdp_run_with_adapters_checkpoints_them_and_one_process_resumes_it(two_ranks, tmp_path, monkeypatch):
    out, _, _ = two_ranks
    run = tmp_path / "lora"
    shutil.copytree(out / "lora", run)
    step = run / "ckpt" / "step_000001"
    assert not (step / "model").exists()
    saved = load_file(step / "adapters" / "adapters.safetensors")  # gathered whole from the shards by rank 0
    assert len(saved) == 28 and all(k.endswith((".lora_A", ".lora_B")) for k in saved)
    assert any(bool(v.abs().max() > 0) for k, v in saved.items() if k.endswith("lora_B")), "B must have trained"
    monkeypatch.setenv("IGSEARCH_CACHE", str(out / "cache"))
    monkeypatch.setattr(igsearch, "score_outcome", W.varied_reward)
    assert igsearch.main(["--resume", str(run), "--steps", "2"]) == 0  # AdamW's state fits the adapters alone
    assert [m["step"] for m in metrics(run)] == [0, 1]


def test_the_warmup_runs_on_rank_0_and_the_run_starts_from_it(two_ranks):
    out, _, stdout = two_ranks
    assert stdout.count("warm-up step 1/1") == 1
    assert json.loads((out / "warm" / "warmup" / "done.json").read_text())["losses"]
    assert [m["step"] for m in metrics(out / "warm")] == [0]


def test_compare_on_two_ranks_reports_on_rank_0(two_ranks):
    out, _, stdout = two_ranks
    root = out / "compare"
    assert stdout.count("Same data (") == 1 and stdout.count("=== inforeasoner-s0 ===") == 1  # rank 0 alone
    rows = json.loads((root / "compare.json").read_text())
    assert [r["model"] for r in rows] == ["start", "outcome-s0", "igsearch-s0", "inforeasoner-s0"]
    for reward in ("outcome", "igsearch", "inforeasoner"):
        assert [m["step"] for m in metrics(root / f"{reward}-s0")] == [0]


def test_shards_are_contiguous_and_cover_everything(monkeypatch):
    monkeypatch.setattr(ranks, "world", lambda: 3)
    spans = []
    for r in range(3):
        monkeypatch.setattr(ranks, "rank", lambda r=r: r)
        spans.append(ranks.span(8))
    assert spans == [(0, 2), (2, 5), (5, 8)]
    assert ranks.rank_seed(10) == 12


def test_one_process_is_world_size_one():
    assert (ranks.world(), ranks.rank(), ranks.is_main()) == (1, 0, True)
    items, values = [1, 2, 3], {"b": 1.5, "a": 2}
    assert ranks.shard(items) == items and ranks.gather(items) is items and ranks.all_sum(5) == 5
    assert ranks.data_parallel(torch.nn.Linear(2, 2)) is None and ranks.rank_seed(7) == 7
    assert ranks.reduce_values(values) is values and ranks.from_main(len, items) == 3 and ranks.describe("ddp") == ""
    assert ranks.on_main(sorted, items, reverse=True, then=lambda: "others") == [3, 2, 1]
    g = torch.Generator().manual_seed(3)
    ranks.resume_generator(g, [torch.Generator().manual_seed(4).get_state()] * 2, 5)  # rank 0 keeps its own
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(3).get_state())


def test_questions_must_divide_among_the_ranks(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's: refused by check_config before any process group
    assert igsearch.main(["--model", "tiny-random", "--questions-per-step", "3", "--out", str(tmp_path)]) == 2
    assert "--questions-per-step 3: does not divide among 2 ranks" in capsys.readouterr().err
    with pytest.raises(DataError, match="does not divide among 2 ranks"):
        checks.check_config(igsearch.Config(model="tiny-random", questions_per_step=5, out=str(tmp_path)))
    assert not any(tmp_path.iterdir())
