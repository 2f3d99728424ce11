"""The layout the README promises: flat modules whose imports run one way, with no cycle; and the algorithm box
of grpo.py's docstring, which must keep naming the calls a training step really makes."""
import ast
import builtins
import inspect
import keyword
import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))
# what each module of this repository may import of the others (the README's "How the code is laid out")
ALLOWED = {
    "engine": set(),
    "retrieve": set(),
    "grpo": {"retrieve", "engine"},
    "rewards": {"retrieve", "grpo", "engine"},
    "warmup": {"grpo", "rewards", "retrieve", "engine", "ranks", "lora", "runs"},
    "lora": {"ranks", "retrieve", "engine"},
    "runs": {"retrieve", "lora", "ranks", "engine"},
    "checks": {"runs", "retrieve"},
    "views": {"runs", "retrieve", "grpo", "rewards"},
    "demo": {"runs", "views", "retrieve", "grpo", "rewards"},
    "ranks": {"grpo", "engine"},
    "igsearch": {"retrieve", "engine", "grpo", "rewards", "warmup", "runs", "checks", "views", "demo", "ranks",
                 "lora"},
    "experiments": {"igsearch", "retrieve", "runs", "checks", "views", "engine", "grpo", "rewards", "ranks", "warmup",
                    "lora"},
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


# ----------------------------------------------------------------------------------------------------
# grpo.py's algorithm box: every call in it is a real function, called as train_step and update_policy call it

BOX_MODULES = ("grpo", "engine", "rewards", "igsearch")  # where the box's functions live


def algorithm_box():
    """The indented block after "algorithm box" in grpo.py's docstring, dedented: Python source."""
    import grpo
    after = grpo.__doc__.split("algorithm box", 1)[1].splitlines()
    start = next(i for i, line in enumerate(after) if line.startswith("    "))
    block = []
    for line in after[start:]:
        if not line.strip():
            break
        block.append(line)
    return textwrap.dedent("\n".join(block))


def box_function(name):
    """The one function called `name` that BOX_MODULES define (not merely import)."""
    import importlib
    found = [getattr(m, name) for m in map(importlib.import_module, BOX_MODULES)
             if inspect.isfunction(getattr(m, name, None)) and getattr(m, name).__module__ == m.__name__]
    assert len(found) == 1, f"the algorithm box calls {name}(), which {len(found)} of {BOX_MODULES} define"
    return found[0]


def arg_name(node):
    """The name an argument expression ends in: ids[sl] -> ids, cfg.clip_eps -> clip_eps; None for others."""
    while isinstance(node, ast.Subscript):
        node = node.value
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None


def call_shape(call):
    """(positional arguments, keyword names, whether a ** dict is passed) of a call."""
    return len(call.args), sorted(k.arg for k in call.keywords if k.arg), any(k.arg is None for k in call.keywords)


def step_calls():
    """{function name: [call_shape, ...]} of the calls made in igsearch.py and ranks.py, where a training step's
    code lives (train_step, update_policy and what they call, the update's forward ranks.PolicyLogprobs): the
    whole files, so that a step cut into helpers is still read."""
    calls = {}
    for module in ("igsearch", "ranks"):
        for n in ast.walk(ast.parse((ROOT / f"{module}.py").read_text())):
            if isinstance(n, ast.Call) and isinstance(n.func, (ast.Name, ast.Attribute)):
                name = n.func.id if isinstance(n.func, ast.Name) else n.func.attr
                calls.setdefault(name, []).append(call_shape(n))
    return calls


def test_every_name_the_algorithm_box_calls_is_a_function_of_the_step():
    box = algorithm_box()
    names = {m for m in re.findall(r"(?<![\w.])([A-Za-z_]\w*)\(", box) if not keyword.iskeyword(m)}  # comments too
    core = {"generate_rollouts", "group_advantages", "token_advantages", "token_logprobs", "grpo_loss"}
    assert core <= names, f"the algorithm box no longer calls {sorted(core - names)}"
    for name in sorted(names - set(dir(builtins))):
        box_function(name)


def test_the_algorithm_box_calls_each_function_as_its_signature_and_the_step_do():
    tree = ast.parse(algorithm_box())  # a box that is not Python (e.g. "f(a, k=..., ...)") fails here
    real = step_calls()
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and not hasattr(builtins, n.func.id)]
    assert len(calls) >= 10, f"the algorithm box shows {len(calls)} calls: is it cut by a blank line?"
    for call in calls:
        name, f = call.func.id, box_function(call.func.id)
        params = list(inspect.signature(f).parameters)
        kwargs = {k.arg: None for k in call.keywords if k.arg}
        bind = inspect.signature(f).bind_partial if call_shape(call)[2] else inspect.signature(f).bind
        bind(*[None] * len(call.args), **kwargs)  # too many or too few arguments, or an unknown keyword: TypeError
        for i, a in enumerate(call.args):  # an argument named like a parameter stands in that parameter's place
            named = arg_name(a)
            assert named not in params or params.index(named) == i, \
                f"the box passes {named} as argument {i} of {name}(), where it is parameter {params.index(named)}"
        assert call_shape(call) in real.get(name, []), \
            f"the box calls {name}() with {call_shape(call)}; the step calls it with {real.get(name)}"


def readme_step_lines():
    """The code lines of the README's "One training step" block (its `# ...` headings and `...` left out)."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## One training step"):]
    block = block[block.index("```python\n") + len("```python\n"):]
    block = block[:block.index("```")]
    return [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")
            and ln.strip() != "..."]


def test_the_readme_step_is_the_real_train_step():
    # the README shows train_step as the file has it: every line of its block is a line of igsearch.py, and
    # every line of train_step's body (after the docstring) is in the block, so a changed step changes the README
    source = (ROOT / "igsearch.py").read_text()
    lines = {ln.strip() for ln in source.splitlines()}
    shown = readme_step_lines()
    assert len(shown) > 20
    assert [ln for ln in shown if ln not in lines] == []
    body = inspect.getsource(__import__("igsearch").train_step).split('"""')[2]
    assert [ln.strip() for ln in body.splitlines() if ln.strip() and ln.strip() not in shown] == []
