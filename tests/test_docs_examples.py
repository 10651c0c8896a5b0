"""Every command in README.md and docs/*.md runs as written, and every documented Python call binds to the API.

The commands: every ``jaxedit ...`` line of a fenced code block (backslash continuations joined, ``# comments``
dropped; the README's main-command / test-command set-up lines are left out: CI runs them) runs in this process
through the click group with ``--dry-run`` (it checks the options and the input files, reads the model's config
without its weights, prints the plan and ends with ``DRY_RUN_END``), in a temporary folder that holds a stand-in
for every input file the docs name. A line with a synopsis placeholder (``TEXT``, ``[--out DIR]``, ``A | B``,
``...``) is not a command one can run: it is reported as such, not run. The meshes and hosts of docs/scaling.md
(8 to 32 devices, a coordinator) are not here: their ``--mesh`` spec is parsed but not built, and no
``jax.distributed`` is started.

The Python: every call of ``jaxedit.NAME(...)`` (or ``jaxedit.module.NAME``) and of a name imported from jaxedit in
a ```python block must bind to the function's signature (``inspect.signature(fn).bind`` with placeholder values).

Every failure is collected, and one assertion lists them all (the doc, its line, the command or call, the error).
"""
from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import re
import shlex
import shutil
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

import jaxedit
from jaxedit import calibration
from jaxedit.cli.app import DRY_RUN_END
from jaxedit.cli.main import cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
SETUP_MARKERS = ("<!-- main-command -->", "<!-- test-command -->")  # the README's set-up lines: CI runs them
DATA = Path(jaxedit.__file__).parent / "data"

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"


# ------------------------------------------------------------------------------------------------- the docs' blocks
@dataclass
class Block:
    doc: str  # relative path
    line: int  # the first line of the block's text (1-based)
    lang: str
    lines: list = field(default_factory=list)
    setup: bool = False  # preceded by a set-up marker


def fenced_blocks(path: Path) -> list:
    blocks, cur, previous = [], None, ""
    for no, text in enumerate(path.read_text().split("\n"), 1):
        s = text.strip()
        if s.startswith("```"):
            if cur is None:
                cur = Block(str(path.relative_to(ROOT)), no + 1, s[3:].strip(), setup=previous in SETUP_MARKERS)
            else:
                blocks.append(cur)
                cur = None
            continue
        if cur is not None:
            cur.lines.append(text)
        elif s:
            previous = s
    return blocks


def _strip_comment(text: str) -> str:
    """The text before a ``#`` that starts a shell comment (at the start or after a space, outside quotes)."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i]
    return text


def logical_lines(block: Block):
    """(line number, text) of a shell block: continuations joined, comments dropped."""
    buf, first = "", None
    for i, text in enumerate(block.lines):
        if first is None:
            first = block.line + i
        text = _strip_comment(text).rstrip()
        if text.endswith("\\"):
            buf += text[:-1] + " "
            continue
        buf += text
        if buf.strip():
            yield first, buf.strip()
        buf, first = "", None
    if buf.strip():
        yield first, buf.strip()


OPERATORS = {"&&", "||", ";", "|", "&"}
ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def jaxedit_calls(tokens: list):
    """(env, args) of each ``jaxedit`` invocation in a shell line's tokens (also inside a quoted argument, such as
    a remote command)."""
    for i, tok in enumerate(tokens):
        if tok == "jaxedit":
            env, j = {}, i - 1
            while j >= 0 and ENV.match(tokens[j]):
                k, _, v = tokens[j].partition("=")
                env[k] = v
                j -= 1
            args = []
            for t in tokens[i + 1:]:
                if t in OPERATORS:
                    break
                args.append(t)
            yield env, args
        elif " " in tok and re.search(r"(^|\s)jaxedit\s", tok):
            try:
                yield from jaxedit_calls(shlex.split(tok))
            except ValueError:
                pass


@dataclass
class Command:
    where: str
    text: str
    env: dict
    args: list


def doc_commands() -> list:
    out = []
    for path in DOCS:
        for block in fenced_blocks(path):
            if block.lang == "python" or block.setup:
                continue
            for no, text in logical_lines(block):
                if not re.search(r"(^|[\s\"'])jaxedit\s", text):
                    continue
                try:
                    tokens = shlex.split(text)
                except ValueError:
                    continue  # not shell (prose in a text block)
                for env, args in jaxedit_calls(tokens):
                    out.append(Command(f"{block.doc}:{no}", text, env, args))
    return out


PLACEHOLDER = re.compile(r"^(\.\.\.|\|)$|^\[|\]$|^[A-Z][A-Z0-9_]*$")


def placeholders(args: list) -> list:
    return [a for a in args if PLACEHOLDER.search(a)]


# ------------------------------------------------------------------------------------------------- stand-in inputs
def _jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_inputs(folder: Path, tiny_model_dir: str) -> None:
    """A stand-in for every input file name the docs use (a doc that names a new one adds it here)."""
    trace = [{"prompt": PROMPT, "subject": SUBJECT}, {"prompt": "Miles Davis plays the", "subject": "Miles Davis"}]
    _jsonl(folder / "prompts.jsonl", trace)
    _jsonl(folder / "examples.jsonl", [{"prompt": PROMPT, "target": " Paris"}, {"prompt": "Miles Davis plays the"}])
    _jsonl(folder / "edits.jsonl", [{"prompt": PROMPT, "subject": SUBJECT, "target": " Rome"}])
    _jsonl(folder / "deletions.jsonl", [{"prompt": PROMPT, "subject": SUBJECT, "suppress": " Paris"}])
    for name in ("counterfact.json", "cf.json"):
        shutil.copy(DATA / "counterfact_demo.json", folder / name)
    shutil.copy(DATA / "safeedit_demo.json", folder / "SafeEdit_test.json")
    text = (DATA / "neutral.txt").read_text() if (DATA / "neutral.txt").exists() else PROMPT + " Paris.\n"
    (folder / "shared").mkdir()
    for name in ("wiki.txt", "shared/wiki.txt"):
        (folder / name).write_text(text)
    shutil.copytree(tiny_model_dir, folder / "edited")  # a jaxedit folder, as `jaxedit edit --out edited` writes
    for name in ("SafeEdit-Safety-Classifier", "path/to/roberta-toxicity-classifier"):  # hf:PATH scorers
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(json.dumps(
            {"architectures": ["RobertaForSequenceClassification"], "id2label": {"0": "LABEL_0", "1": "LABEL_1"}}))


SHARED = "/shared/"  # docs/scaling.md's shared filesystem: a folder of the temporary one here


def _local(value: str, folder: Path) -> str:
    return str(folder / "shared" / value[len(SHARED):]) if value.startswith(SHARED) else value


def _files(folder: Path) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if not str(p.relative_to(folder)).startswith(
        os.path.join("shared", "cache"))}


@pytest.fixture(scope="module")
def tiny_native_dir(tmp_path_factory, tokenizer):
    """A tiny random model saved as a jaxedit folder (what `jaxedit edit --out DIR` leaves, `jaxedit export`
    reads)."""
    from jaxedit.config import ModelConfig
    from jaxedit.loading.native import save_native
    from jaxedit.model import create_model

    cfg = ModelConfig(family="llama", n_layers=3, d_model=32, n_heads=4, n_kv_heads=4, head_dim=8, d_ff=48,
                      vocab_size=len(tokenizer), max_positions=64, norm_eps=1e-5, tie_embeddings=True,
                      activation="silu", rope_theta=10000.0, rope_scaling=())
    out = tmp_path_factory.mktemp("tiny-native") / "model"
    save_native(create_model(cfg), tokenizer, str(out))
    return str(out)


# the machine probe of the study's and DINM's time estimates (a compiled benchmark, seconds): a fixed record here
PROBE = {"rate": 1e10, "compile": 1.0, "date": "2000-01-01"}


def run_command(cmd: Command, folder: Path, monkeypatch):
    """(ok, message) of one command's dry run in ``folder``."""
    found = placeholders(cmd.args)
    if found:
        return False, f"a synopsis, not a command (placeholders {' '.join(found)})"
    args = [_local(a, folder) for a in cmd.args]
    if "--dry-run" not in args:
        args.append("--dry-run")
    env = {k: _local(v, folder) for k, v in cmd.env.items()}
    before = _files(folder)
    cwd = os.getcwd()
    with monkeypatch.context() as m:
        m.setattr(jaxedit, "load", _refuse_load)
        m.setattr(calibration, "probe", lambda cfg: dict(PROBE))
        os.chdir(folder)
        try:
            res = CliRunner().invoke(cli, ["-q"] + args, env=env or None)
        finally:
            os.chdir(cwd)
    out = res.output.strip()
    last = out.splitlines()[-1] if out else ""
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        return False, f"{type(res.exception).__name__}: {res.exception}"
    if res.exit_code != 0:
        return False, f"exit {res.exit_code}: {last}"
    if last != DRY_RUN_END:
        return False, f"no dry-run end line; the output ends {last!r}"
    written = _files(folder) - before
    if written:
        return False, f"the dry run wrote {sorted(written)[:5]}"
    return True, ""


def _refuse_load(*args, **kwargs):
    raise AssertionError("a dry run loaded the model")


def test_every_doc_command_runs(tmp_path, tiny_native_dir, monkeypatch):
    commands = doc_commands()
    assert len(commands) >= 20, [c.text for c in commands]  # the docs' command blocks were found
    folder = tmp_path / "work"
    folder.mkdir()
    write_inputs(folder, tiny_native_dir)
    failures = []
    for cmd in commands:
        ok, why = run_command(cmd, folder, monkeypatch)
        if not ok:
            failures.append(f"{cmd.where}: jaxedit {shlex.join(cmd.args)}\n    -> {why}")
    print(f"{len(commands)} doc commands run, {len(commands) - len(failures)} pass")
    assert not failures, f"{len(failures)} of {len(commands)} doc commands fail:\n" + "\n".join(failures)


# ----------------------------------------------------------------------------------------------------- Python calls
def _resolve(node, names: dict):
    """The jaxedit object a call's function expression names (``jaxedit.x``, ``jaxedit.mod.x``, an imported name),
    or None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in names:
        return None
    obj = names[node.id]
    for p in reversed(parts):
        if not hasattr(obj, p):
            try:
                obj = importlib.import_module(f"{obj.__name__}.{p}")
                continue
            except (ImportError, AttributeError):
                return AttributeError(f"{'.'.join([node.id] + list(reversed(parts)))}: no {p!r} in "
                                      f"{getattr(obj, '__name__', obj)}")
        obj = getattr(obj, p)
    return obj


def _imports(tree, names: dict) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "jaxedit" or a.name.startswith("jaxedit."):
                    mod = importlib.import_module(a.name)
                    names[a.asname or "jaxedit"] = mod if a.asname else jaxedit
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "jaxedit":
            mod = importlib.import_module(node.module)
            for a in node.names:
                obj = getattr(mod, a.name, None)
                if obj is None:
                    try:
                        obj = importlib.import_module(f"{node.module}.{a.name}")
                    except ImportError:
                        obj = AttributeError(f"no {a.name!r} in {node.module}")
                names[a.asname or a.name] = obj


def doc_python_calls() -> list:
    """(where, source, fn or an error, positional count, keyword names) of every jaxedit call in the docs' Python
    (a call with ``*args`` / ``**kwargs`` is left out: what it binds is not known here)."""
    calls = []
    for path in DOCS:
        names = {"jaxedit": jaxedit}  # a doc's blocks share its imports
        for block in fenced_blocks(path):
            if block.lang != "python":
                continue
            src = textwrap.dedent("\n".join(block.lines))
            tree = ast.parse(src)
            _imports(tree, names)
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                fn = _resolve(node.func, names)
                if fn is None or inspect.ismodule(fn):
                    continue
                if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
                    continue
                calls.append((f"{block.doc}:{block.line + node.lineno - 1}", ast.get_source_segment(src, node),
                              fn, len(node.args), [k.arg for k in node.keywords]))
    return calls


def test_doc_python_calls_bind():
    calls = doc_python_calls()
    assert len(calls) >= 20
    failures = []
    for where, source, fn, n_pos, keywords in calls:
        first = source.splitlines()[0] + (" ..." if "\n" in source else "")
        if isinstance(fn, Exception):
            failures.append(f"{where}: {first}\n    -> {fn}")
            continue
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            continue  # a builtin without a signature
        try:
            sig.bind(*([None] * n_pos), **{k: None for k in keywords})
        except TypeError as e:
            failures.append(f"{where}: {first}\n    -> {getattr(fn, '__qualname__', fn)}{sig}: {e}")
    print(f"{len(calls)} doc Python calls checked, {len(calls) - len(failures)} bind")
    assert not failures, f"{len(failures)} of {len(calls)} doc Python calls do not bind:\n" + "\n".join(failures)
