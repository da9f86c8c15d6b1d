"""The house: the top level is the reading set, imports point one way (read from the source with ast), the README
stays short and every command in it names a script, subcommand, config file and key that exist, and the tools
write under runs/ by default."""
import argparse
import ast
import importlib
import os
import re
import shlex

import pytest

import config
from conftest import ROOT

READING_SET = ["asyncopd.py", "schedule.py", "rollout.py", "batch_format.py", "teacher_cache.py", "learner.py",
               "estimators.py", "config.py", "task.py"]  # in the README's reading order
MAX_TOP_FILES, MAX_TOP_LINES, MAX_README_LINES = 9, 2200, 300
# what a function may import lazily: optional or heavy dependencies (gpu_check --plan runs without torch)
LAZY_OK = {"vllm", "datasets", "trl", "matplotlib", "pyarrow", "torch", "transformers", "wandb", "trackio",
           "math_verify"}


def project_modules():
    """{module name: path} of every .py file of the project outside tests/ (no virtual environments, no runs)."""
    modules = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "runs", "__pycache__")
                   and not os.path.isfile(os.path.join(folder, d, "pyvenv.cfg"))]
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), ROOT)
                modules[rel[:-3].replace(os.sep, ".").removesuffix(".__init__")] = os.path.join(ROOT, rel)
    return modules


def imports(path, modules):
    """[(imported project module or top-level package name, at module level?)] of one file, every import statement
    in it (function bodies included)."""
    tree, out = ast.parse(open(path).read()), []
    top = {id(n) for n in tree.body} | {id(c) for n in tree.body if isinstance(n, ast.Try) for c in n.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:  # a submodule by its name, else the module
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found = next((".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in modules),
                         None)
            out.append((found or parts[0], id(node) in top))
    return out


def test_the_top_level_is_the_reading_set():
    top = sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))
    assert top == sorted(READING_SET) and len(top) <= MAX_TOP_FILES, top
    lines = sum(len(open(os.path.join(ROOT, f)).read().splitlines()) for f in top)
    assert lines <= MAX_TOP_LINES, f"the reading set has {lines} lines (at most {MAX_TOP_LINES})"
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert len(readme.splitlines()) <= MAX_README_LINES
    order = [readme.index(f"`{f}`") for f in READING_SET]  # the reading order is the README's
    assert order == sorted(order)
    folders = {m.split(".")[0] for m in project_modules() if "." in m}  # every folder of code has its row
    assert folders == {"runtime", "optional", "tools"} and all(f"[`{f}/`]({f}/README.md)" in readme for f in folders)


def test_no_import_cycle_and_lazy_imports_only_for_optional_dependencies():
    modules = project_modules()
    graph = {m: {t for t, _ in imports(p, modules) if t in modules and t != m} for m, p in modules.items()}
    assert {"asyncopd", "runtime.channels", "optional.offline", "tools.lab"} <= set(graph)  # the walk found them
    state, stack = {}, []

    def visit(m):  # depth-first; meeting a module that is still on the stack closes a cycle
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            assert state.get(t) != "open", "import cycle: " + " -> ".join(stack[stack.index(t):] + [t])
            if t not in state:
                visit(t)
        state[m] = "done"
        stack.pop()

    for m in sorted(graph):
        if m not in state:
            visit(m)
    for m, path in modules.items():
        for target, at_top in imports(path, modules):
            if at_top:
                continue
            if target in modules:  # a project module imported lazily must be one that imports an optional dependency
                heavy = {t for t, top in imports(modules[target], modules) if top} & LAZY_OK
                assert heavy, f"{m} imports {target} inside a function: import it at the top"
            else:
                assert target in LAZY_OK, f"{m} imports {target} inside a function: import it at the top"


def readme_commands():
    """The README's shell commands: lines of ```bash blocks, comments and heredoc bodies dropped."""
    text, out = open(os.path.join(ROOT, "README.md")).read(), []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        heredoc = None
        for line in block.replace("\\\n", " ").splitlines():  # a continued line is one command
            if heredoc:
                heredoc = None if line.strip() == heredoc else heredoc
                continue
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                if "<<'" in line:
                    heredoc = line.split("<<'")[1].split("'")[0]
                for command in line.split("&&"):
                    out.append(shlex.split(command.split("<<")[0]))
    return out


def check_overrides(argv, path=None):
    """key=value arguments name real config keys with values of the right type."""
    config.load_config(path and os.path.join(ROOT, path), [a for a in argv if "=" in a and not a.startswith("-")])


def check_tool(name, argv):
    """A tool module exists, and its own parser accepts these arguments (subcommand, options, their types)."""
    parser = importlib.import_module(f"tools.{name}").parser()
    assert isinstance(parser, argparse.ArgumentParser)
    try:
        parser.parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"tools.{name} refuses {argv}") from e
    check_overrides(argv, next((a for a in argv if a.endswith(".yaml")), None))


def test_every_readme_command_names_what_exists():
    commands = readme_commands()
    assert len(commands) >= 15
    for argv in commands:
        program, args = argv[0], argv[1:]
        if program == "bash":
            assert args[0] == "run.sh", argv
            args = args[1:]
            if not args or args[0].startswith("-") or "=" in args[0]:
                check_overrides(args, "configs/default.yaml")
            elif args[0] == "gpu-check":
                check_tool("gpu_check", args[1:])
            elif args[0].endswith(".yaml"):
                check_overrides(args[1:], args[0])
            else:
                assert args[0] == "test", argv
        elif program in (".venv/bin/python", ".venv-gpu/bin/python"):
            if args[:1] == ["-m"] and args[1].startswith("tools."):
                check_tool(args[1].split(".", 1)[1], args[2:])
            elif args[:2] == ["-m", "pip"]:
                assert args[2] == "install", argv
            elif args == ["-"]:
                pass  # a heredoc script
            else:
                assert args[0] == "asyncopd.py" and args[1] in ("train", "precompute", "print-config"), argv
                check_overrides(args[2:], next((a for a in args[2:] if a.endswith(".yaml")), None))
        elif "=" in program:  # VAR=value vllm serve ...: the server the remote teacher needs (optional/vllm_teacher.py)
            assert argv[1:3] == ["vllm", "serve"] and {"--enable-scale-out", "--max-logprobs", "--max-model-len"} <= \
                set(argv) and argv[argv.index("--hf-overrides") + 1] == '{"head_dtype": "float32"}', argv
        else:
            assert program in (".venv/bin/hf", "mkdir"), f"{argv}: use .venv/bin/python or bash run.sh"
    run_sh = open(os.path.join(ROOT, "run.sh")).read()
    assert '"${1:-}" = "test"' in run_sh and '"${1:-}" = "gpu-check"' in run_sh


@pytest.mark.parametrize("tool", ["bench", "bench_gpu", "lab", "sft", "gpu_check", "prepare_data"])
def test_tools_write_under_runs_by_default(tool):
    """Every output folder a tool takes has a default under runs/ (or none: it must be given), never a committed
    folder."""
    parser = importlib.import_module(f"tools.{tool}").parser()
    parsers = [parser] + [p for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                          for p in a.choices.values()]
    for p in parsers:
        for action in p._actions:
            if action.dest in ("out", "out_dir") and action.default is not None:
                default = action.default
                rel = os.path.relpath(default, ROOT) if os.path.isabs(default) else os.path.normpath(default)
                assert rel.split(os.sep)[0] == "runs", (tool, p.prog, default)


def test_every_relative_link_in_the_docs_resolves():
    """Links between README.md, the folder READMEs and results/ point at files that exist."""
    docs = ["README.md", "runtime/README.md", "optional/README.md", "tools/README.md"]
    docs += [os.path.join(d, f) for d in ("results", "results/lab") for f in os.listdir(os.path.join(ROOT, d))
             if f.endswith(".md")]
    links = 0
    for doc in docs:
        for target in re.findall(r"\]\(([^)#]+)\)", open(os.path.join(ROOT, doc)).read()):
            if not target.startswith("http"):
                links += 1
                assert os.path.exists(os.path.join(ROOT, os.path.dirname(doc), target)), (doc, target)
    assert links >= 15


def test_public_functions_of_the_reading_set_have_type_hints():
    missing = []
    for f in READING_SET:
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, f)).read())):
            if isinstance(node, ast.FunctionDef) and (not node.name.startswith("_") or node.name == "__init__"):
                args = [a for a in node.args.args + node.args.kwonlyargs if a.arg not in ("self", "cls", "ctx")]
                if any(a.annotation is None for a in args) or (node.returns is None and node.name != "__init__"):
                    missing.append(f"{f}:{node.lineno} {node.name}")
    assert not missing, missing


def test_readme_python_compiles():
    """The README's Python (its code blocks and heredocs) is valid Python."""
    text = open(os.path.join(ROOT, "README.md")).read()
    scripts = re.findall(r"<<'PY'\n(.*?)\nPY\n", text, re.S) + re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(scripts) >= 1
    for script in scripts:
        compile(script, "README.md", "exec")
