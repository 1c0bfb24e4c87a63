"""The commands in README.md and docs/*.md name real modules, flags, scripts and files.

Every ``python -m MODULE [SUBCOMMAND] ...`` in a fenced code block or an inline code span must name a module that
exists, and each ``--flag`` it passes must appear in that module's (or subcommand's) ``--help``; every
``bash launch/...`` script and every ``launch/...`` path a command names must exist, and relative links resolve.
The ``--help`` texts come from one subprocess that runs each module's ``__main__`` in turn (imports shared), so the
whole file takes seconds, not a process start per module. Placeholders (FOLDER, RUN, ...) are fine: only module
names, flags and paths are checked."""

from __future__ import annotations

import importlib
import json
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Runs `python -m MODULE ARGS... --help` for each argv given as JSON on stdin, in this one process, and prints
# {"MODULE ARGS": help text or "ERROR: ..."} as JSON.
HELP_RUNNER = r"""
import contextlib, io, json, runpy, sys, traceback
out = {}
for argv in json.load(sys.stdin):
    buf = io.StringIO()
    sys.argv = [argv[0], *argv[1:], "--help"]
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        text = buf.getvalue()
    except SystemExit as e:
        text = buf.getvalue() if e.code in (0, None) else f"ERROR: exit {e.code}: {buf.getvalue()[-2000:]}"
    except BaseException:
        text = "ERROR: " + traceback.format_exc(limit=3)
    out[" ".join(argv)] = text
print("\n@@HELP@@" + json.dumps(out))
"""


def code_lines(path: Path) -> list[tuple[int, str]]:
    """The command lines of a Markdown file's fenced code blocks: (line number, text), continuations joined,
    comments cut."""
    lines, fenced, pending, start = [], False, "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            continue
        text = line.split(" #", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
        if not pending:
            start = number
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        if pending + text:
            lines.append((start, (pending + text).strip()))
        pending = ""
    return lines


def inline_commands(path: Path) -> list[tuple[int, str]]:
    """The `python -m ...` spans of a Markdown file's running text: (line number, text)."""
    found, fenced = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            found += [(number, span) for span in re.findall(r"`(python -m [^`]+)`", line)]
    return found


def commands() -> list[tuple[str, list[str]]]:
    """Every `python -m ...` command of the docs, in code blocks and in the text: (where, argv after `python`)."""
    found = []
    for path in DOCS:
        for number, line in code_lines(path) + inline_commands(path):
            if not line.startswith("python -m "):
                continue
            try:
                argv = shlex.split(line)[2:]
            except ValueError:  # an unbalanced quote in a fragment: take the words as they stand
                argv = line.split()[2:]
            found.append((f"{path.relative_to(ROOT)}:{number}", argv))
    return found


def subcommands(help_text: str) -> set[str]:
    """The subcommand names a module's usage line offers ({build,synth,...}), if any."""
    match = re.search(r"\{([\w,-]+)\} \.\.\.", help_text.split("\n\n", 1)[0])  # argparse: "{a,b} ..." in usage
    return set(match.group(1).split(",")) if match else set()


@cache
def help_texts(argvs: tuple[tuple[str, ...], ...]) -> dict[str, str]:
    result = subprocess.run(
        [sys.executable, "-c", HELP_RUNNER],
        input=json.dumps([list(a) for a in argvs]),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert "@@HELP@@" in result.stdout, result.stderr[-3000:]
    return json.loads(result.stdout.rsplit("@@HELP@@", 1)[1])


def all_help() -> dict[str, str]:
    """--help of every module the docs run, then of every subcommand they use."""
    cmds = commands()
    modules = tuple(sorted({(argv[0],) for _, argv in cmds}))
    texts = dict(help_texts(modules))
    subs = set()
    for _, argv in cmds:
        offered = subcommands(texts.get(argv[0], ""))
        if offered and len(argv) > 1 and argv[1] in offered:
            subs.add((argv[0], argv[1]))
    texts.update(help_texts(tuple(sorted(subs))))
    return texts


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    return all_help()


def test_docs_have_commands():
    assert len(commands()) >= 20, "the command extraction found too few `python -m` commands"


@pytest.mark.parametrize("where,argv", commands(), ids=[w for w, _ in commands()])
def test_python_m_command(where: str, argv: list[str], helps: dict[str, str]):
    module = argv[0]
    text = helps[module]
    if text.startswith("ERROR"):
        pytest.fail(f"{where}: python -m {module} --help failed:\n{text}", pytrace=False)
    offered = subcommands(text)
    if offered and len(argv) > 1 and argv[1] in offered:
        text = helps[f"{module} {argv[1]}"]
        if text.startswith("ERROR"):
            pytest.fail(f"{where}: python -m {module} {argv[1]} --help failed:\n{text}", pytrace=False)
    elif offered and len(argv) > 1 and not argv[1].startswith("-"):
        pytest.fail(f"{where}: python -m {module} has no subcommand {argv[1]!r} (it offers {sorted(offered)})")
    for word in argv[1:]:
        if word.startswith("--"):
            flag = word.split("=", 1)[0]
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                pytest.fail(f"{where}: python -m {' '.join(argv[:2])}: {flag} is not in its --help", pytrace=False)


def test_launch_paths_exist():
    """`bash launch/X.sh`, `launch/X.sh ...` and every launch/ file a command names (configs, studies) exist."""
    missing = []
    for path in DOCS:
        for number, line in code_lines(path):
            for token in re.findall(r"(?<![\w./-])launch/[\w./-]+", line):
                if "..." in token or token.endswith("/"):
                    continue
                if not (ROOT / token.rstrip(".,:;")).exists():
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {token}")
    assert not missing, "missing launch/ paths:\n" + "\n".join(missing)


def slugs(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    return {
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)
    }


def test_doc_links_resolve():
    """Relative Markdown links between README.md and docs/ point at files (and headings) that exist."""
    broken = []
    for path in DOCS:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", path.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            file = (path.parent / target) if target else path
            if not file.exists() or (anchor and file.suffix == ".md" and anchor not in slugs(file)):
                broken.append(f"{path.relative_to(ROOT)}: {target}#{anchor}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def code_spans(path: Path) -> list[tuple[int, str]]:
    """The inline code spans of a Markdown file's running text: (line number, text)."""
    found, fenced = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            found += [(number, span) for span in re.findall(r"`([^`]+)`", line)]
    return found


def test_named_files_exist():
    """Every repository file the text names in a code span (`pretrain/engine.py`, `tests/dist/...`) exists."""
    missing = []
    for path in DOCS:
        for number, span in code_spans(path):
            if re.fullmatch(r"(shards|pretrain|finetune|benchmarks|launch|tests)/[\w./-]+\.(py|sh|toml)", span):
                if not re.search(r"[A-Z]{3,}", span) and not (ROOT / span).exists():
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {span}")
    assert not missing, "missing files:\n" + "\n".join(missing)


def test_named_python_objects_exist():
    """Every dotted name the text gives as code under one of our modules (`shards.tokens.TEXT_CHARS_PER_TOKEN`,
    `pretrain.export.load_pretrained`) resolves to it or an attribute of it. Spans whose second part is no module
    file are config keys (`finetune.fresh`) or file names (`pretrain.sh`), not checked here."""
    missing = []
    for path in DOCS:
        for number, span in code_spans(path):
            name = span.split("(", 1)[0]
            if not re.fullmatch(r"(shards|pretrain|finetune|benchmarks)(\.\w+)+", name):
                continue
            parts = name.split(".")
            if not any((ROOT / parts[0] / parts[1]).with_suffix(suffix).exists() for suffix in (".py", "")):
                continue
            for cut in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                except ImportError:
                    continue
                try:
                    for attr in parts[cut:]:
                        obj = getattr(obj, attr)
                except AttributeError:
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {name}")
                break
            else:
                missing.append(f"{path.relative_to(ROOT)}:{number}: {name}")
    assert not missing, "names that do not resolve:\n" + "\n".join(missing)
