"""The repo's shape: imports run one way (no circles, no module imports a script), and every script's --help lists
each option of its Config with type, default and the comment beside it."""
import ast
import os
import subprocess
import sys
from dataclasses import fields

import pytest

import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"stage1_kd", "stage2_sft", "sample"}  # entry points: nothing may import them
LIBRARY = sorted(f[:-3] for f in os.listdir(REPO) if f.endswith(".py") and f[:-3] not in SCRIPTS)


def repo_imports(path):
    """The repo's own top-level modules that a file imports (anywhere in it, function-level imports included)."""
    modules = {f[:-3] for f in os.listdir(REPO) if f.endswith(".py")}
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
        found |= {n.split(".")[0] for n in names} & modules
    return found


def test_imports_run_one_way():
    graph = {m: repo_imports(os.path.join(REPO, m + ".py")) - {m} for m in LIBRARY + sorted(SCRIPTS)}
    for m, deps in graph.items():
        assert not deps & SCRIPTS, f"{m} imports a script: {deps & SCRIPTS}"
    # the layering of the issue: tokenizer <- data, tokenizer <- teacher <- model
    assert graph["tokenizer"] <= {"sentencepiece_proto"} and graph["safetensors_io"] == set()
    assert graph["sentencepiece_proto"] == set()
    assert "model" not in graph["teacher"] and "data" not in graph["teacher"]
    assert graph["data"] <= {"tokenizer", "corpora", "shards", "teacher", "chat"}  # teacher: the CLI's preset names
    assert graph["corpora"] <= {"tokenizer"} and graph["shards"] <= {"tokenizer"}  # readers; shards and loaders
    assert graph["chat"] <= {"tokenizer"}
    state = {}

    def visit(m, path):  # depth-first search for a cycle
        state[m] = "open"
        for d in graph.get(m, ()):
            assert state.get(d) != "open", f"import circle: {' -> '.join(path + [d])}"
            if d not in state:
                visit(d, path + [d])
        state[m] = "done"
    for m in graph:
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("script", ["stage1_kd.py", "stage2_sft.py", "sample.py", "bench/fidelity.py", "bench/generate.py",
                                    "bench/budget.py", "bench/summary.py", "bench/teacher.py", "bench/data.py",
                                    "bench/losses.py", "bench/memory.py", "bench/plot.py", "bench/chat.py",
                                    "bench/eval_floor.py", "bench/eval_profile.py", "bench/scale.py",
                                    "bench/gpu_step.py", "bench/context_tail.py", "bench/patcher.py", "eval.py"])
def test_help_lists_every_option(script):
    out = subprocess.run([sys.executable, os.path.join(REPO, script), "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for line in lines:
        assert "Traceback" not in line
    listed = lines[lines.index("options (--key=value; a bool also as --key alone):"):]  # not the docstring's lines
    options = [line.strip() for line in listed if line.strip().startswith("--")]
    names = config_fields(os.path.join(REPO, script), "Config")
    assert [o.split()[0] for o in options] == [f"--{n}" for n in names]
    assert all("default" in o for o in options)


def config_fields(path, name):
    """The fields of the dataclass `name` in the file at `path`, read from the source in a dataclass's order: its bases'
    first (a base written module.Class read from module.py), then its own that no base has (one it redeclares keeps
    the base's place)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    config = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    names = []
    for base in config.bases:
        if isinstance(base, ast.Attribute):
            names += config_fields(os.path.join(REPO, base.value.id + ".py"), base.attr)
        else:
            names += config_fields(path, base.id)
    own = [n.target.id for n in config.body if isinstance(n, ast.AnnAssign)]
    return names + [n for n in own if n not in names]


def test_help_text_reads_the_comments_beside_fields():
    import stage1_kd
    text = cli.help_text(stage1_kd.Config)
    comments, sections = cli.field_comments(stage1_kd.Config)
    assert comments["phase"] == "all | align | distill | boundary | decoder"
    assert "student size" in sections["d_local"]
    for f in fields(stage1_kd.Config):
        assert f"--{f.name} ({f.type.__name__}, default {getattr(stage1_kd.Config(), f.name)!r})" in text
    assert "--dtype (str, default 'auto'): autocast dtype" in text  # a comment in train.RunConfig, the base
    assert "--out_dir (str, default 'out/stage1'): the byte model" in text  # redeclared: the base's comment stays
