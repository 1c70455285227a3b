"""Every `python -m msk_jax...` command shown in the documentation parses as written.

The fenced code blocks of README.md, docs/*.md, launch/README.md and colab/README.md are read,
and each command's flags are parsed by the tool's own parser without running the tool: one
child process runs every command's module as `__main__` with `absl.app.run` replaced by a
function that parses the command line (for `msk_jax.cli.run`: its `--config` check, then absl)
and stops before `main`. So an unknown flag, a value of the wrong type, a missing required flag,
a `--config` file or variant that does not exist and an override of a field the configuration
does not have (`--config.optimiser.lr=...`) all fail the test; positional arguments are checked
against what each tool accepts. Placeholders such as `RUN`, `DIR` or `...` are fine where the
flag takes a string.

Not checked here: commands of other tools (the launchers have tests/test_launch.py) and shell
that runs around a command (`$(...)` becomes a placeholder; `NAME="..."` assignments of the
same block are substituted).
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ("README.md", "docs/*.md", "launch/README.md", "colab/README.md")
SKIPPED_LANGUAGES = {"python", "py", "json", "bibtex", "toml", "yaml", "text"}
STOP_TOKENS = {"&&", "||", ";", "|", "&", ">", ">>", "2>", "2>&1", "<"}
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.M | re.S)
ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)

# Commands the checker must refuse (run beside the documented ones: the check checks itself).
MUST_FAIL = (
    ("msk_jax.main", ["--config=configs/howto.py:demo", "--workdir=/tmp/x", "--no_such_flag=1"]),
    ("msk_jax.main", ["--config=configs/howto.py:demo", "--workdir=/tmp/x", "--config.optimiser.lr=1"]),
    ("msk_jax.main", ["--config=configs/howto.py:demoo", "--workdir=/tmp/x"]),
    ("msk_jax.main", ["--config=configs/howto.py:demo"]),  # --workdir is required
    ("msk_jax.extract", ["--videos=V", "--output=O", "--batch=many"]),
    ("msk_jax.evaluate", ["--config=configs/howto.py", "--checkpoint=RUN", "stray"]),
    ("msk_jax.bench", ["no_such_benchmark"]),
)


# ------------------------------------------------------------------------------ reading the docs


def documents() -> list[str]:
    found = []
    for pattern in DOCUMENTS:
        found += sorted(glob.glob(os.path.join(REPO_ROOT, pattern)))
    return found


def logical_lines(block: str) -> list[str]:
    """The block's lines with backslash continuations joined and a leading `$ ` prompt dropped."""
    lines, current = [], ""
    for line in block.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    if current:
        lines.append(current)
    return [re.sub(r"^\s*\$\s+", "", line) for line in lines]


def expand(line: str, variables: dict[str, str]) -> str:
    line = re.sub(r"\$\([^()]*\)", "SUBSTITUTED", line)
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?",
                  lambda m: variables.get(m.group(1), m.group(0)), line)


def strip_optional_brackets(tokens: list[str]) -> list[str]:
    """`[--dtype=bfloat16]` and `[--json OUT]` (optional parts, as usage lines write them)."""
    out, inside = [], False
    for token in tokens:
        if token.startswith("[") and token.startswith("[-"):
            token, inside = token[1:], True
        if inside and token.endswith("]"):
            token, inside = token[:-1], False
        out.append(token)
    return out


def commands_in(text: str) -> list[tuple[str, list[str], str]]:
    """(module, argv after the module, the line as written) of each `python -m msk_jax...` of the
    fenced blocks of a markdown text."""
    found = []
    for match in FENCE.finditer(text):
        language = match.group(1).strip().lower()
        if language in SKIPPED_LANGUAGES:
            continue
        variables = {}
        for line in logical_lines(match.group(2)):
            stripped = line.strip()
            assignment = ASSIGNMENT.match(stripped)
            if assignment and " python" not in stripped.split("=", 1)[0]:
                try:
                    value = shlex.split(assignment.group(2), comments=True)
                except ValueError:
                    value = []
                if len(value) == 1 and "python" not in value[0].split()[:1]:
                    variables[assignment.group(1)] = value[0]
                    continue
            if "msk_jax" not in line or "-m" not in line:
                continue
            try:
                tokens = shlex.split(expand(line, variables), comments=True)
            except ValueError as err:
                raise AssertionError(f"cannot split the shell line {line!r}: {err}") from None
            for i in range(len(tokens) - 2):
                if (os.path.basename(tokens[i]) in ("python", "python3") and tokens[i + 1] == "-m"
                        and tokens[i + 2].split(".")[0] == "msk_jax"):
                    argv = []
                    for token in tokens[i + 3:]:
                        if token in STOP_TOKENS:
                            break
                        argv.append(token)
                    found.append((tokens[i + 2], strip_optional_brackets(argv), stripped))
    return found


def documented_commands() -> list[tuple[str, str, list[str], str]]:
    """(document, module, argv, line) of every documented command."""
    found = []
    for path in documents():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        name = os.path.relpath(path, REPO_ROOT)
        found += [(name, module, argv, line) for module, argv, line in commands_in(text)]
    return found


# ------------------------------------------------------------------- parsing (in the child process)


def _positional_problem(module: str, positional: list[str]) -> str | None:
    """What is wrong with a command's positional arguments, or None."""
    def members(arg):  # {a,b,c}: one of them, as a usage line writes it
        return arg[1:-1].split(",") if arg.startswith("{") and arg.endswith("}") else [arg]

    if module == "msk_jax.bench":
        from msk_jax.bench import BENCHMARKS

        if len(positional) != 1:
            return f"expects one benchmark, got {positional}"
        unknown = [m for m in members(positional[0]) if m not in BENCHMARKS and m != "all"]
        return f"unknown benchmark {unknown}" if unknown else None
    if module == "msk_jax.tools.build_tfds":
        from msk_jax.data.tfds_builders import BUILDERS

        ok = len(positional) == 1 and all(m in BUILDERS for m in members(positional[0]))
        return None if ok else f"expects one of {sorted(BUILDERS)}, got {positional}"
    if module == "msk_jax.parity":
        return None if len(positional) == 1 else f"expects the golden folder, got {positional}"
    if module == "msk_jax.search":
        try:
            from msk_jax.search.__main__ import COMMANDS  # the package's sub-commands
        except ImportError:
            COMMANDS = ("index", "query")
        if not positional or positional[0] not in COMMANDS:
            return f"expects one of {sorted(COMMANDS)}, got {positional}"
        if positional[0] != "query" and positional[1:]:  # queries are the only further arguments
            return f"{positional[0]} takes no more arguments, got {positional[1:]}"
        return None
    return f"takes no positional arguments, got {positional}" if positional else None


class _Parsed(Exception):
    def __init__(self, remaining):
        super().__init__()
        self.remaining = remaining


def parse_commands(commands: list[tuple[str, list[str]]]) -> list[str | None]:
    """For each (module, argv): None if the tool's parser accepts it, else its complaint. Runs
    each module as `__main__` with `app.run` (and argparse) stopped after parsing."""
    import argparse

    from absl import app, flags

    def parse_only(main, argv=None, flags_parser=None):
        argv = sys.argv if argv is None else argv
        remaining = flags_parser(argv) if flags_parser is not None else flags.FLAGS(argv)
        raise _Parsed(list(remaining))

    original_parse_args = argparse.ArgumentParser.parse_args

    def argparse_only(self, args=None, namespace=None):
        original_parse_args(self, args, namespace)
        raise _Parsed([sys.argv[0]])

    app.run = parse_only
    argparse.ArgumentParser.parse_args = argparse_only
    baseline = set(flags.FLAGS)
    problems = []
    for module, argv in commands:
        sys.argv = [module] + list(argv)
        err = io.StringIO()
        problem = None
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            problem = "the module did not parse a command line (no app.run / cli.run)"
        except _Parsed as parsed:
            problem = _positional_problem(module, parsed.remaining[1:])
        except SystemExit as exit_:
            problem = f"exit {exit_.code}: {err.getvalue().strip()[-500:]}"
        except Exception as exc:  # absl's parse errors where the tool calls app.run itself
            problem = f"{type(exc).__name__}: {exc}"
        finally:
            for name in set(flags.FLAGS) - baseline:
                delattr(flags.FLAGS, name)
            flags.FLAGS.unparse_flags()
        problems.append(problem)
    return problems


def _child() -> None:
    commands = json.loads(sys.stdin.read())
    print(json.dumps(parse_commands([tuple(c) for c in commands])))


def run_child(commands: list[tuple[str, list[str]]]) -> list[str | None]:
    env = dict(os.environ, MSK_JAX_TCMALLOC="0", JAX_PLATFORMS="cpu")
    code = "from tests.test_docs_commands import _child; _child()"
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(commands), capture_output=True, text=True,
                          cwd=REPO_ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ tests


def test_commands_are_found():
    commands = documented_commands()
    modules = {module for _, module, _, _ in commands}
    assert {"msk_jax.main", "msk_jax.evaluate", "msk_jax.extract", "msk_jax.parity"} <= modules, modules
    # The README shows the demo's command exactly.
    demo = ["--config=configs/howto.py:demo", "--workdir=/tmp/msk_demo"]
    assert any(d == "README.md" and m == "msk_jax.main" and a == demo for d, m, a, _ in commands)


def test_extraction_of_shell_forms():
    text = "\n".join([
        "```bash",
        'L="--config=configs/howto.py:demo --seeds=0,1"',
        "$ python -m msk_jax.experiments $L --workdir=W \\",
        "    --grid=a=1   # a comment",
        "python -m msk_jax.extract --videos=V --output=O [--dtype=bfloat16] [--json OUT] && echo done",
        "python -m msk_jax.main --config.mesh='[(\"fsdp\", -1)]' --runs=$(ls a | paste -sd,)",
        "```",
        "```python",
        "python -m msk_jax.main --ignored",
        "```",
    ])
    assert [(m, a) for m, a, _ in commands_in(text)] == [
        ("msk_jax.experiments", ["--config=configs/howto.py:demo", "--seeds=0,1", "--workdir=W", "--grid=a=1"]),
        ("msk_jax.extract", ["--videos=V", "--output=O", "--dtype=bfloat16", "--json", "OUT"]),
        ("msk_jax.main", ['--config.mesh=[("fsdp", -1)]', "--runs=SUBSTITUTED"]),
    ]


def test_every_documented_command_parses():
    commands = documented_commands()
    assert commands
    problems = run_child([(m, a) for _, m, a, _ in commands] + [list(c) for c in MUST_FAIL])
    documented, checks = problems[:len(commands)], problems[len(commands):]
    failed = [f"{doc}: {line}\n    -> {problem}" for (doc, _, _, line), problem in zip(commands, documented) if problem]
    assert not failed, "documented commands that do not parse:\n" + "\n".join(failed)
    missed = [f"{m} {' '.join(a)}" for (m, a), problem in zip(MUST_FAIL, checks) if problem is None]
    assert not missed, f"the check accepted commands it must refuse: {missed}"
