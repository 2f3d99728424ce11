"""The layout the README promises: flat modules whose imports run one way, with no cycle."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))
# what each module of this repository may import of the others (the README's "How the code is laid out")
ALLOWED = {
    "engine": set(),
    "retrieve": set(),
    "grpo": {"retrieve", "engine"},
    "rewards": {"retrieve", "grpo", "engine"},
    "warmup": {"grpo", "rewards", "retrieve", "engine"},
    "lora": {"ranks", "retrieve"},
    "runs": {"retrieve", "rewards", "lora"},
    "checks": {"runs", "retrieve"},
    "views": {"runs", "retrieve", "grpo", "rewards"},
    "demo": {"runs", "views", "retrieve", "grpo", "rewards"},
    "ranks": {"grpo"},
    "igsearch": {"retrieve", "engine", "grpo", "rewards", "warmup", "runs", "checks", "views", "demo", "ranks",
                 "lora"},
    "experiments": {"igsearch", "retrieve", "runs", "checks", "views", "engine", "grpo", "rewards", "ranks", "warmup"},
}


def own_imports(module):
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):  # imports inside functions count too
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(MODULES)


def test_every_module_imports_only_what_the_layout_allows():
    assert set(MODULES) == set(ALLOWED), "a module was added or removed: place it in ALLOWED and the README"
    for m in MODULES:
        extra = own_imports(m) - ALLOWED[m]
        assert not extra, f"{m}.py imports {sorted(extra)}"


def test_the_import_graph_has_no_cycle():
    graph = {m: own_imports(m) for m in MODULES}
    state = {}

    def visit(m, path):
        assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [m])
        if state.get(m) == "done":
            return
        state[m] = "open"
        for n in sorted(graph[m]):
            visit(n, path + [m])
        state[m] = "done"

    for m in MODULES:
        visit(m, [])
    # nothing but the second script imports the training script
    assert [m for m in MODULES if "igsearch" in graph[m]] == ["experiments"]


def test_the_commands_that_moved_answer_with_where_they_went(capsys):
    import igsearch
    for argv in (["eval", "--model", "runs/x"], ["compare", "--tiny"]):
        assert igsearch.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {argv[0]} is a command of experiments.py: python experiments.py {' '.join(argv)}"]
