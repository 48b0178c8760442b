"""The docs name only what exists: make targets, `opd` commands and flags, files, config fields, variables.

Reads README.md, CHANGELOG.md, every docs/**/*.md and benchmarks/*.md (those
that exist) and fails, listing every `file:line: what: the text` at once, when
something they name is gone. No engine, no server, no script is run: the CLI
is read from the typer app, the configs from their pydantic models, the
Makefile and the scripts as text. A few seconds.

How a document is read (`parse`):
- Fenced code blocks (``` or ~~~) are taken line by line, a line ending in `\\`
  joined with the next; so are 4-space indented blocks, where the text before
  the blank line above is a plain paragraph (not a list, whose indented
  paragraphs are no code). Inline code spans are taken whole, a span that wraps
  across lines joined with spaces; a span's line is the line it starts on.
- Shell commands (`commands`) come from every code span and from the lines of
  bash/sh/shell/zsh and indented blocks; in console, text and untagged blocks
  (program output in these docs) only from lines that start with a `$ ` prompt. A line
  is split with shlex (comments dropped; on unbalanced quotes, at whitespace)
  into segments at `&&`, `||`, `;`, `|`, `(`, `)`. A segment's leading
  `VAR=value` assignments, `$`, `sudo`, `env`, `time`, `exec`, `nice -n N` are
  skipped; then it is `make ...`, `opd ...` (also `.../opd`, `python -m opd`,
  `torchrun ... -m opd`, `docker compose run|exec ... opd`), `python path.py
  ...` (also `python -m opd.x.y`, the script services/x/y.py), `docker compose
  ...`, `export A=1 B=2`, or nothing we check.

The checks:
1. `check_make`: every target of a `make` command is a rule of the Makefile
   (rule lines and .PHONY; `$(VAR)` targets ignored). Assignments
   (`make VLLM_EXTRA=cuda`, `BENCH_ARGS="..."`) and options are not targets.
2. `check_cli`: an `opd` command's words name a command path of `opd.cli:app`
   (walked as click groups), and each `--flag` is an option of that command
   (click's opts and secondary opts; `--help` always). Checking stops at a
   placeholder word (`...`, `<x>`, `[x]`, `WORD`) where a subcommand would be.
   `python some/script.py --flag` (a path under a repository folder; others
   are the reader's own scripts): the script exists, and each flag
   appears quoted ("--flag") in its text, as argparse declares it (`--no-x` is
   fine where "--x" goes with BooleanOptionalAction). Scripts are never run.
   Single-dash options are not checked.
3. `check_paths`: in code spans and blocks, each token that starts with
   services/, tests/, benchmarks/, docs/, docker/ or .ci/ (at a word start:
   not inside `/opt/opd/services/...`), or is docker-compose*.yml,
   pyproject.toml, Makefile, README.md or CHANGELOG.md, exists from the
   repository root (or from the document's folder). A trailing `/` must be a
   folder, `{a,b}` is expanded, a `*` glob must match something; a `:line`
   suffix and trailing punctuation are dropped; tokens with `<`, `$` or `...`
   are placeholders. Run outputs and machine paths (`NOT_REPO`: runs/,
   models/, .venv, checkpoints/, /data, /home, ...) are never repository
   paths. Markdown links and images `[t](path)` outside code resolve from the
   document's folder (a `#anchor` or `?query` dropped; URLs with a scheme and
   pure `#anchor` links skipped).
4. `check_config`: each `--set a.b=v` resolves to a field: for `opd up` and
   the benchmark scripts (which all take `opd up` stack overrides) in the stack
   file model `StackConfig`, whose `run` is `RunConfig`; for `opd train` and
   `opd trainer demo` in `RunConfig`. A code span that is a dotted setting
   alone (optionally `: value` or `=value` after it) whose first part is
   `run`, `teacher`, `trainer`, `restart` (stack), `student`, `teachers`
   (stack or run config: `student.device` is the run's, `student.lora_mode`
   the stack's) or a section of RunConfig (`sampling`, `eval`, ...) resolves
   the same way. Walking `model_fields` unwraps Optional/Annotated; a dict
   field takes any key as its next part (`teachers.<name>`), a list or tuple
   an index; a last part that is a file extension (`trainer.py`) or
   `services.<package>` (a module) is not a setting.
5. `check_env`: every `OPD_*` name (anywhere in the text; a prefix such as
   `OPD_TRAIN_*` is skipped) is read by something: `OPD_TEACHER_X`,
   `OPD_STUDENT_X`, `OPD_TRAINER_X` are variables of that settings class (its
   prefix plus a field name, or the field's validation alias), `OPD_TRAIN_A__B`
   resolves in RunConfig, any other name appears as a word in the code or
   config (services/, tests/ but tests/docs/, benchmarks/, docker/, .ci/,
   docker-compose*.yml, Makefile, pyproject.toml). "`OPD_TEACHER_PORT` /
   `_HOST`" names OPD_TEACHER_HOST too.
   `check_compose_env`: the `VAR=value` assignments before `docker compose`
   (or docker-compose) on its line, and the names an `export` line earlier in
   the same block sets, appear as `${VAR` or `$VAR` in a docker-compose*.yml
   (COMPOSE_* and DOCKER_*, docker's own, are skipped).
"""

from __future__ import annotations

import collections.abc
import functools
import glob
import re
import shlex
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Union
from urllib.parse import unquote

import pytest
import typer
from pydantic import AliasChoices, BaseModel

ROOT = Path(__file__).resolve().parents[2]
REPO_DIRS = ("services", "tests", "benchmarks", "docs", "docker", ".ci")
ROOT_FILES = r"docker-compose[\w.*{},-]*\.yml|pyproject\.toml|Makefile|README\.md|CHANGELOG\.md"
# Run outputs and machine paths: never repository paths, even where one looks like it (a guard: the path
# pattern below only takes tokens that start with a repository folder, at a word start).
NOT_REPO = ("runs/", "models/", ".venv", "checkpoints/", "logs/", "/data", "/home", "/tmp", "/opt", "~")
SHELL_LANGS = {"bash", "sh", "shell", "zsh", "indented"}  # indented: a 4-space code block (commands in these docs)
PROMPT_LANGS = {"", "console", "text", "shell-session"}  # only `$ ` lines are commands there
FILE_EXTENSIONS = {"py", "yaml", "yml", "md", "json", "jsonl", "log", "png", "toml", "txt", "pt", "safetensors", "sh"}

INDENTED = re.compile(r"^(    |\t)")
LIST_ITEM = re.compile(r"^\s*([-*+]|\d+[.)])\s")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([\w+-]*)")
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SEPARATORS = {"&&", "||", ";", "|", "(", ")", "&", ";;"}
PYTHON = re.compile(r"(^|/)python(3(\.\d+)?)?$")
MAKE_RULE = re.compile(r"^([^\s:#=][^:#=]*?)\s*::?(?!=)(.*)$", re.M)
MAKE_OPTIONS_WITH_VALUE = {"-C", "-f", "-j", "-l", "-o", "-W", "-I", "--directory", "--file"}
REPO_PATH = re.compile(rf"(?<![\w./$-])((?:\./)?(?:{'|'.join(re.escape(d) for d in REPO_DIRS)})/[\w./*{{}},@+<>$-]*"
                       rf"|(?:{ROOT_FILES})(?![\w/-]))")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^\"']*[\"'])?\s*\)"
                  r"|^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
SETTING_SPAN = re.compile(r"^(?P<path>[a-z_]+(?:\.[A-Za-z0-9_<>-]+)+)(?:\s*[:=].*)?$", re.S)
STACK_ONLY = {"run", "teacher", "trainer", "restart"}
EITHER = {"student", "teachers"}
OPD_NAME = re.compile(r"(?<![A-Za-z0-9_])OPD_[A-Z0-9_]+")
SHORTHAND = re.compile(r"`(OPD_[A-Z0-9_]+)`((?:\s*/\s*`_[A-Z0-9_]+`)+)")
SETTINGS_PREFIXES = ("OPD_TEACHER_", "OPD_STUDENT_", "OPD_TRAINER_")
TRAIN_PREFIX = "OPD_TRAIN_"
CODE_DIRS = ("services", "tests", "benchmarks", "docker", ".ci")
CODE_FILES = ("Makefile", "pyproject.toml")
COMPOSE_OWN = ("COMPOSE_", "DOCKER_")


# ---------------------------------------------------------------- reading the docs
@dataclass(frozen=True)
class Snippet:
    line: int
    text: str
    kind: str  # "span" (inline code) or "block" (a line of a fenced block)
    lang: str = ""
    block: int = -1  # which fenced block (0, 1, ...) a block line is in


@dataclass
class Doc:
    name: str  # relative to the repository root: file:line in every message
    text: str
    folder: Path
    spans: list[Snippet] = field(default_factory=list)
    blocks: list[Snippet] = field(default_factory=list)
    masked: str = ""  # the text with code blocks and spans blanked (newlines kept): where links are read


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md")),
             *sorted((ROOT / "benchmarks").glob("*.md"))]
    return [f for f in files if f.is_file()]


def parse(name: str, text: str, folder: Path = ROOT) -> Doc:
    doc = Doc(name, text, folder)
    lines = text.split("\n")
    masked = list(lines)
    para: list[tuple[int, str]] = []

    def flush() -> None:
        if not para:
            return
        start, joined = para[0][0], "\n".join(t for _, t in para)
        chars = list(joined)
        for m in CODE_SPAN.finditer(joined):
            line = start + joined.count("\n", 0, m.start())
            doc.spans.append(Snippet(line, " ".join(m.group(2).split("\n")).strip(), "span"))
            for k in range(m.start(), m.end()):
                if chars[k] != "\n":
                    chars[k] = " "
        for (n, _), t in zip(para, "".join(chars).split("\n")):
            masked[n - 1] = t
        para.clear()

    def indented_block_starts(i: int) -> bool:
        """A 4-space indented line after a blank line whose paragraph before is plain text, not a list's."""
        if not INDENTED.match(lines[i]) or not lines[i].strip() or i == 0 or lines[i - 1].strip():
            return False
        before = next((t for t in reversed(lines[:i]) if t.strip()), None)
        return before is None or not (before[:1].isspace() or LIST_ITEM.match(before))

    i = number = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence or indented_block_starts(i):
            flush()
            body = []
            if fence:
                mark, lang = fence.group(1), fence.group(2).lower()
                close = re.compile(rf"^ {{0,3}}{re.escape(mark[0])}{{{len(mark)},}}\s*$")
                j = i + 1
                while j < len(lines) and not close.match(lines[j]):
                    body.append((j + 1, lines[j]))
                    j += 1
                end = min(j + 1, len(lines))
            else:
                lang, j = "indented", i
                while j < len(lines) and (INDENTED.match(lines[j]) or not lines[j].strip()):
                    body.append((j + 1, INDENTED.sub("", lines[j], count=1)))
                    j += 1
                while body and not body[-1][1].strip():
                    body.pop()
                end = j = i + len(body)
                j -= 1  # the loop below goes on at j + 1
            for n in range(i, end):
                masked[n] = ""
            pending: tuple[int, str] | None = None
            for n, t in body:
                if pending is not None:
                    n, t = pending[0], pending[1] + " " + t.strip()
                if t.rstrip().endswith("\\"):
                    pending = (n, t.rstrip()[:-1].rstrip())
                    continue
                pending = None
                doc.blocks.append(Snippet(n, t, "block", lang, number))
            if pending is not None:
                doc.blocks.append(Snippet(pending[0], pending[1], "block", lang, number))
            number += 1
            i = j + 1
            continue
        if lines[i].strip():
            para.append((i + 1, lines[i]))
        else:
            flush()
        i += 1
    flush()
    doc.masked = "\n".join(masked)
    return doc


@functools.lru_cache(maxsize=1)
def repo_docs() -> tuple[Doc, ...]:
    return tuple(parse(str(f.relative_to(ROOT)), f.read_text(encoding="utf-8"), f.parent) for f in doc_files())


def where(doc: Doc, snippet: Snippet | int, text: str | None = None) -> str:
    line = snippet if isinstance(snippet, int) else snippet.line
    shown = text if text is not None else snippet.text  # type: ignore[union-attr]
    shown = shown.strip()
    return f"{doc.name}:{line}: {shown[:160]}{'...' if len(shown) > 160 else ''}"


# ---------------------------------------------------------------- shell commands
@dataclass
class Command:
    kind: str  # make | opd | script | compose | export
    args: list[str]
    env: list[str]  # names assigned before the command word
    snippet: Snippet
    program: str = ""  # script: its path; opd: how it was reached


def shell_words(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
    lex.whitespace_split = True
    lex.commenters = "#"
    try:
        return list(lex)
    except ValueError:  # unbalanced quotes (a placeholder such as <the run's last version>)
        return re.sub(r"(^|\s)#.*", "", line).split()


def segments(words: list[str]) -> list[list[str]]:
    out: list[list[str]] = [[]]
    for w in words:
        if w in SEPARATORS:
            out.append([])
        else:
            out[-1].append(w)
    return [s for s in out if s]


def classify(words: list[str], snippet: Snippet) -> Command | None:
    env: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w in ("$", "sudo", "env", "time", "exec", "command"):
            i += 1
        elif w == "nice":
            i += 3 if words[i + 1:i + 2] == ["-n"] else 1
        elif ASSIGNMENT.match(w):
            env.append(w.split("=", 1)[0])
            i += 1
        else:
            break
    rest = words[i:]
    if not rest:
        return Command("export", [], env, snippet) if env else None
    head, args = rest[0], rest[1:]
    if head == "export":
        return Command("export", [], env + [a.split("=", 1)[0] for a in args if ASSIGNMENT.match(a)], snippet)
    if head == "make" or head.endswith("/make"):
        return Command("make", args, env, snippet)
    if head == "opd" or head.endswith("/opd"):
        return Command("opd", args, env, snippet, "opd")
    if PYTHON.search(head):
        if args[:2] == ["-m", "opd"]:
            return Command("opd", args[2:], env, snippet, "python -m opd")
        if args[:1] == ["-m"] and args[1:2] and args[1].startswith("opd."):  # a module of ours: services/...
            module = "services/" + args[1][len("opd."):].replace(".", "/")
            program = module + "/__main__.py" if (ROOT / module).is_dir() else module + ".py"
            return Command("script", args[2:], env, snippet, program)
        if args and not args[0].startswith("-") and args[0].endswith(".py"):
            return Command("script", args[1:], env, snippet, args[0])
        return None
    if head == "torchrun" or head.endswith("/torchrun"):
        for k in range(len(args) - 1):
            if args[k] == "-m" and args[k + 1] == "opd":
                return Command("opd", args[k + 2:], env, snippet, "torchrun -m opd")
        return None
    compose_args = args[1:] if head == "docker" and args[:1] == ["compose"] else args if head == "docker-compose" else None
    if compose_args is not None:
        if "run" in compose_args or "exec" in compose_args:
            start = compose_args.index("run" if "run" in compose_args else "exec")
            if "opd" in compose_args[start:]:
                k = compose_args.index("opd", start)
                return Command("opd", compose_args[k + 1:], env, snippet, "docker compose run ... opd")
        return Command("compose", compose_args, env, snippet)
    return None


def commands_in(snippet: Snippet) -> list[Command]:
    text = snippet.text
    if snippet.kind == "block":
        if snippet.lang in SHELL_LANGS:
            text = re.sub(r"^\s*\$\s", "", text)
        elif snippet.lang in PROMPT_LANGS:
            m = re.match(r"^\s*\$\s(.*)$", text)
            if not m:
                return []
            text = m.group(1)
        else:
            return []
    out = []
    for seg in segments(shell_words(text)):
        cmd = classify(seg, snippet)
        if cmd is not None:
            out.append(cmd)
    return out


def commands(doc: Doc) -> list[Command]:
    """Every command of the doc's code spans and shell blocks, in document order within each kind."""
    return [c for s in (*doc.spans, *doc.blocks) for c in commands_in(s)]


def placeholder(word: str) -> bool:
    return word in ("...", "…") or any(c in word for c in "<>[]{}$") or bool(re.fullmatch(r"[A-Z][A-Z0-9_.-]*", word))


# ---------------------------------------------------------------- 1. make targets
@functools.lru_cache(maxsize=1)
def make_targets() -> frozenset[str]:
    targets: set[str] = set()
    for m in MAKE_RULE.finditer((ROOT / "Makefile").read_text()):
        names, rest = m.group(1).split(), m.group(2)
        if names == [".PHONY"]:
            targets.update(rest.split())
        else:
            targets.update(n for n in names if "$" not in n and not n.startswith("."))
    return frozenset(targets)


def check_make(docs: typing.Iterable[Doc]) -> list[str]:
    problems = []
    for doc in docs:
        for cmd in commands(doc):
            if cmd.kind != "make":
                continue
            skip = False
            for a in cmd.args:
                if skip:
                    skip = False
                elif a.startswith("-"):
                    skip = a in MAKE_OPTIONS_WITH_VALUE
                elif ASSIGNMENT.match(a) or placeholder(a):
                    continue
                elif a not in make_targets():
                    problems.append(f"{where(doc, cmd.snippet)}  <- no Makefile target {a!r}")
    return problems


# ---------------------------------------------------------------- 2. CLI commands and flags
@functools.lru_cache(maxsize=1)
def cli() -> Any:
    from opd.cli import app

    return typer.main.get_command(app)


def is_group(command: Any) -> bool:
    """A click group (typer vendors its own click: duck-typed)."""
    return isinstance(getattr(command, "commands", None), dict)


def options_of(command: Any) -> set[str]:
    names = {"--help"}
    for p in command.params:
        if p.param_type_name == "option":
            names.update(p.opts)
            names.update(p.secondary_opts)
    return names


def resolve_opd(args: list[str]) -> tuple[list[str], Any | None, str | None]:
    """(the command path, its click command, why not): the command is None where a placeholder stops the walk."""
    command, path, i = cli(), ["opd"], 0
    while is_group(command) and i < len(args) and not args[i].startswith("-"):
        word = args[i]
        if placeholder(word):
            return path, None, None
        sub = command.commands.get(word)
        if sub is None:
            there = ", ".join(sorted(command.commands))
            return path, None, f"no command {' '.join([*path, word])!r} (under {' '.join(path)!r}: {there})"
        command, path, i = sub, [*path, word], i + 1
    return path, command, None


def flags(args: list[str]) -> list[str]:
    out = []
    for a in args:
        if a == "--":
            break
        if a.startswith("--") and len(a) > 2:
            out.append(a.split("=", 1)[0])
    return out


def set_values(args: list[str]) -> list[str]:
    out = []
    for k, a in enumerate(args):
        if a == "--set" and k + 1 < len(args):
            out.append(args[k + 1])
        elif a.startswith("--set="):
            out.append(a[len("--set="):])
    return out


@functools.lru_cache(maxsize=None)
def script_text(path: str) -> str | None:
    file = ROOT / path
    return file.read_text(encoding="utf-8", errors="replace") if file.is_file() else None


def script_has_flag(text: str, flag: str) -> bool:
    quoted = lambda f: f'"{f}"' in text or f"'{f}'" in text  # noqa: E731
    if quoted(flag) or flag == "--help":
        return True
    return flag.startswith("--no-") and quoted("--" + flag[5:]) and "BooleanOptionalAction" in text


def check_cli(docs: typing.Iterable[Doc]) -> list[str]:
    problems = []
    for doc in docs:
        for cmd in commands(doc):
            if cmd.kind == "opd":
                path, command, why = resolve_opd(cmd.args)
                if why:
                    problems.append(f"{where(doc, cmd.snippet)}  <- {why}")
                if command is None:
                    continue
                known = options_of(command)
                for flag in flags(cmd.args[len(path) - 1:]):
                    if flag not in known:
                        problems.append(f"{where(doc, cmd.snippet)}  <- {' '.join(path)!r} has no option {flag} "
                                        f"(it has {', '.join(sorted(known))})")
            elif cmd.kind == "script":
                script = cmd.program.removeprefix("./")
                if placeholder(script) or not script.startswith(tuple(d + "/" for d in REPO_DIRS)):
                    continue  # the user's own script, or a path on some machine
                text = script_text(script)
                if text is None:
                    problems.append(f"{where(doc, cmd.snippet)}  <- no script {script}")
                    continue
                for flag in flags(cmd.args):
                    if not script_has_flag(text, flag):
                        problems.append(f"{where(doc, cmd.snippet)}  <- {script} declares no {flag}")
    return problems


# ---------------------------------------------------------------- 3. file paths and links
def expand_braces(token: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", token)
    if not m:
        return [token]
    return [x for part in m.group(1).split(",") for x in expand_braces(token[:m.start()] + part + token[m.end():])]


def clean_path(token: str) -> str:
    depth, out = 0, []
    for c in token:  # a comma outside braces ends the path
        depth += c == "{"
        depth -= c == "}"
        if c == "," and depth <= 0:
            break
        out.append(c)
    return "".join(out).rstrip(".,;:'\")").removeprefix("./")


def path_exists(path: str, folder: Path) -> bool:
    for base in (ROOT, folder):
        for variant in expand_braces(path):
            want_dir = variant.endswith("/")
            target = variant.rstrip("/")
            if any(c in target for c in "*?["):
                hits = [Path(h) for h in glob.glob(str(base / target))]
                if not any(h.is_dir() or not want_dir for h in hits):
                    break
            elif not ((base / target).is_dir() if want_dir else (base / target).exists()):
                break
        else:
            return True
    return False


def repo_paths(text: str) -> list[str]:
    out = []
    for m in REPO_PATH.finditer(text):
        token = clean_path(m.group(1))
        if not token or token.startswith(NOT_REPO) or any(s in token for s in ("<", ">", "$", "...")):
            continue
        if token in REPO_DIRS or token.rstrip("/") == "":
            continue
        out.append(token)
    return out


def check_paths(docs: typing.Iterable[Doc]) -> list[str]:
    problems = []
    for doc in docs:
        for snippet in (*doc.spans, *doc.blocks):
            for token in repo_paths(snippet.text):
                if not path_exists(token, doc.folder):
                    problems.append(f"{where(doc, snippet)}  <- no such path {token}")
        for m in LINK.finditer(doc.masked):
            target = m.group(1) or m.group(2)
            if not target or target.startswith("#") or URL_SCHEME.match(target):
                continue
            target = unquote(re.split(r"[#?]", target, maxsplit=1)[0])
            base = ROOT if target.startswith("/") else doc.folder
            if not (base / target.lstrip("/")).exists():
                line = doc.masked.count("\n", 0, m.start()) + 1
                problems.append(f"{where(doc, line, m.group(0))}  <- the link's target {target} does not exist")
    return problems


# ---------------------------------------------------------------- 4. config fields
@functools.lru_cache(maxsize=1)
def config_models() -> tuple[type[BaseModel], type[BaseModel]]:
    from opd.trainer.config import RunConfig
    from opd.up.config import StackConfig

    return StackConfig, RunConfig


def field_named(model: type[BaseModel], name: str) -> Any | None:
    for key, info in model.model_fields.items():
        aliases = {key, info.alias}
        va = info.validation_alias
        if isinstance(va, str):
            aliases.add(va)
        elif isinstance(va, AliasChoices):
            aliases.update(c for c in va.choices if isinstance(c, str))
        if name in aliases:
            return key, info.annotation
    return None


def walk(tp: Any, parts: list[str], done: list[str]) -> str | None:
    """None where `parts` names something inside type `tp`; else what is wrong (the first bad part named)."""
    if not parts:
        return None
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return walk(typing.get_args(tp)[0], parts, done)
    if origin in (Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        why = [walk(a, parts, done) for a in arms]
        return None if any(w is None for w in why) else why[0]
    if tp is Any:
        return None
    here = ".".join(done) or "the top level"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        found = field_named(tp, parts[0])
        if found is None:
            fields = ", ".join(tp.model_fields)
            return f"{'.'.join([*done, parts[0]])}: {tp.__name__} has no field {parts[0]!r} (it has {fields})"
        key, annotation = found
        stack, run = config_models()
        if tp is stack and key == "run":
            annotation = run
        return walk(annotation, parts[1:], [*done, parts[0]])
    if origin in (dict, collections.abc.Mapping) or tp is dict:
        args = typing.get_args(tp)
        return walk(args[1] if len(args) == 2 else Any, parts[1:], [*done, parts[0]])
    if origin in (list, tuple, collections.abc.Sequence):
        if not parts[0].isdigit():
            return f"{'.'.join([*done, parts[0]])}: {here} is a list, not a section"
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return walk(args[0] if args else Any, parts[1:], [*done, parts[0]])
    return f"{'.'.join([*done, parts[0]])}: {here} is a value, not a section"


def resolve_setting(path: str, targets: list[type[BaseModel]]) -> str | None:
    parts = path.split(".")
    why = [walk(t, parts, []) for t in targets]
    return None if any(w is None for w in why) else why[0]


def setting_targets(first: str) -> list[type[BaseModel]] | None:
    """Where a dotted setting starting with `first` lives, None when it is not one we check."""
    stack, run = config_models()
    if first in STACK_ONLY:
        return [stack]
    if first in EITHER:
        return [stack, run]
    found = field_named(run, first)
    if found is None:
        return None
    inner = found[1]
    while typing.get_origin(inner) in (Annotated, Union, types.UnionType):
        inner = next(a for a in typing.get_args(inner) if a is not type(None))
    return [run] if isinstance(inner, type) and issubclass(inner, BaseModel) else None


def check_config(docs: typing.Iterable[Doc]) -> list[str]:
    stack, run = config_models()
    problems = []
    for doc in docs:
        for cmd in commands(doc):
            if cmd.kind == "opd":
                path, command, _ = resolve_opd(cmd.args)
                if path in (["opd", "train"], ["opd", "trainer", "demo"]):
                    target = run
                elif path == ["opd", "up"]:
                    target = stack
                else:
                    continue
            elif cmd.kind == "script" and cmd.program.removeprefix("./").startswith("benchmarks/"):
                target = stack  # efficiency.py, step_time.py, task_gap.py: `opd up` stack overrides
            else:
                continue
            for item in set_values(cmd.args):
                key = item.partition("=")[0].strip()
                if not key or not item.count("=") or placeholder(key):
                    continue
                why = walk(target, key.split("."), [])
                if why:
                    problems.append(f"{where(doc, cmd.snippet)}  <- --set {why}")
        for snippet in doc.spans:
            m = SETTING_SPAN.match(snippet.text)
            if not m:
                continue
            parts = m.group("path").split(".")
            if parts[-1] in FILE_EXTENSIONS or (parts[0] == "services" and (ROOT / "services" / parts[1]).is_dir()):
                continue
            targets = setting_targets(parts[0])
            if targets is None:
                continue
            why = resolve_setting(m.group("path"), targets)
            if why:
                problems.append(f"{where(doc, snippet)}  <- {why}")
    return problems


# ---------------------------------------------------------------- 5. environment variables
@functools.lru_cache(maxsize=1)
def settings_variables() -> dict[str, frozenset[str]]:
    from opd.common.settings import StudentSettings, TeacherSettings, TrainerSettings

    out = {}
    for cls in (TeacherSettings, StudentSettings, TrainerSettings):
        prefix = cls.model_config["env_prefix"]
        names = set()
        for name, info in cls.model_fields.items():
            va = info.validation_alias
            if isinstance(va, AliasChoices):
                names.update(c.upper() for c in va.choices if isinstance(c, str))
            elif isinstance(va, str):
                names.add(va.upper())
            else:
                names.add((prefix + name).upper())
        out[prefix] = frozenset(names)
    return out


@functools.lru_cache(maxsize=1)
def code_text() -> str:
    """The repository's code and config, where a variable that no settings class reads must appear."""
    files = [ROOT / f for f in CODE_FILES] + sorted(ROOT.glob("docker-compose*.yml"))
    for d in CODE_DIRS:
        files += [f for f in sorted((ROOT / d).rglob("*")) if f.is_file() and "__pycache__" not in f.parts
                  and (ROOT / "tests" / "docs") not in f.parents]
    texts = []
    for f in files:
        if f.is_file() and f.suffix not in {".png", ".jsonl", ".parquet", ".pyc", ".md"}:
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(texts)


@functools.lru_cache(maxsize=1)
def compose_text() -> str:
    return "\n".join(f.read_text() for f in sorted(ROOT.glob("docker-compose*.yml")))


def variables_named(text: str) -> list[tuple[int, str, str]]:
    """(offset, name, what it was written as) for each OPD_* name; prefixes (`OPD_TRAIN_*`, `OPD_TEACHER_`) skipped."""
    out = []
    for m in OPD_NAME.finditer(text):
        name = m.group(0)
        if name.endswith("_") or text[m.end():m.end() + 1] == "*":
            continue
        out.append((m.start(), name, name))
    for m in SHORTHAND.finditer(text):
        full = m.group(1)
        prefix = next((p for p in (*SETTINGS_PREFIXES, TRAIN_PREFIX) if full.startswith(p)), "OPD_")
        for short in re.findall(r"`_([A-Z0-9_]+)`", m.group(2)):
            out.append((m.start(), prefix + short, m.group(0)))
    return out


def why_unread(name: str) -> str | None:
    for prefix, names in settings_variables().items():
        if name.startswith(prefix):
            if name in names:
                return None
            fields = sorted(n[len(prefix):] for n in names if n.startswith(prefix))
            return f"{name}: the {prefix}* settings have no such field (they have {', '.join(fields)})"
    if name.startswith(TRAIN_PREFIX):
        _, run = config_models()
        why = walk(run, name[len(TRAIN_PREFIX):].lower().split("__"), [])
        return f"{name}: {why}" if why else None
    if re.search(rf"(?<![A-Za-z0-9_]){name}(?![A-Za-z0-9_])", code_text()):
        return None
    return f"{name}: nothing in the code or config reads it"


def check_env(docs: typing.Iterable[Doc]) -> list[str]:
    problems = []
    for doc in docs:
        lines = doc.text.split("\n")
        for offset, name, written in variables_named(doc.text):
            why = why_unread(name)
            if why:
                line = doc.text.count("\n", 0, offset) + 1
                problems.append(f"{where(doc, line, lines[line - 1])}  <- {why}")
    return problems


def check_compose_env(docs: typing.Iterable[Doc]) -> list[str]:
    problems = []
    for doc in docs:
        blocks: dict[int, list[Snippet]] = {}
        for snippet in doc.blocks:
            blocks.setdefault(snippet.block, []).append(snippet)
        for group in [*blocks.values(), *([s] for s in doc.spans)]:
            exported: list[tuple[str, Snippet]] = []  # `export` counts within its own block
            for snippet in group:
                for cmd in commands_in(snippet):
                    if cmd.kind == "export":
                        exported += [(n, snippet) for n in cmd.env]
                    elif cmd.kind == "compose":
                        for name, set_at in [*exported, *((n, snippet) for n in cmd.env)]:
                            if name.startswith(COMPOSE_OWN) or not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
                                continue
                            if not re.search(rf"\$\{{?{name}(?![A-Za-z0-9_])", compose_text()):
                                problems.append(f"{where(doc, set_at)}  <- {name}: no docker-compose*.yml reads it")
                        exported = []
    return problems


CHECKS = {
    "make": check_make,
    "cli": check_cli,
    "paths": check_paths,
    "config": check_config,
    "env": check_env,
    "compose_env": check_compose_env,
}


def report(problems: list[str], what: str) -> str:
    return f"{len(problems)} {what} in the docs:\n" + "\n".join(problems)


# ---------------------------------------------------------------- the tests
def test_make_targets_exist() -> None:
    problems = check_make(repo_docs())
    assert not problems, report(problems, "make targets the Makefile does not define")


def test_cli_commands_and_flags_exist() -> None:
    problems = check_cli(repo_docs())
    assert not problems, report(problems, "commands or flags the CLI or scripts do not have")


def test_paths_and_links_exist() -> None:
    problems = check_paths(repo_docs())
    assert not problems, report(problems, "paths or links to nothing")


def test_config_fields_exist() -> None:
    problems = check_config(repo_docs())
    assert not problems, report(problems, "settings the config models do not have")


def test_environment_variables_are_read() -> None:
    problems = check_env(repo_docs())
    assert not problems, report(problems, "OPD_* variables nothing reads")


def test_compose_variables_are_read() -> None:
    problems = check_compose_env(repo_docs())
    assert not problems, report(problems, "variables set for docker compose that no compose file reads")


PLANTED = """\
# Planted mistakes

Run `opd up --no-such-flag`, then `make nope`; the code is in `services/trainer/nope.py`.
Or `opd teacher nope`, or `python benchmarks/step_time.py --no-such-option`, or `python benchmarks/nope.py`.
A setting: `run.sampling.nope: 3`, and `OPD_TEACHER_NOPE`, `OPD_TRAIN_SAMPLING__NOPE` and `OPD_NOPE_NOPE`.

```bash
opd up --set run.optimizer.nope=1      # a stale setting
opd train services/configs/smollm2.yaml --set optimizer.nope=2
NOPE_VARIABLE=1 docker compose up -d
```

See [the guide](docs/nope-guide.md) and ![a plot](docs/nope.png).
"""

EXPECTED = {
    "cli": ["'opd up' has no option --no-such-flag", "no command 'opd teacher nope'",
            "declares no --no-such-option", "no script benchmarks/nope.py"],
    "make": ["'nope'"],
    "paths": ["services/trainer/nope.py", "docs/nope-guide.md", "docs/nope.png"],
    "config": ["--set run.optimizer.nope:", "planted.md:9: opd train", "--set optimizer.nope:", "run.sampling.nope:"],
    "env": ["OPD_TEACHER_NOPE", "OPD_TRAIN_SAMPLING__NOPE", "OPD_NOPE_NOPE"],
    "compose_env": ["NOPE_VARIABLE"],
}

VALID = """\
# Valid references

```bash
make demo   # comments are not targets: make nope
make VLLM_EXTRA=cuda
make bench-step BENCH_ARGS="--steps 3 --rows default,trl"
opd models prepare smollm2-135m-instruct models/smollm2 --drop-layers 12-21
OPD_API_KEY=secret opd teacher serve --model models/smollm2 --engine vllm --port 8001
python -m opd up services/configs/heal.yaml --set 'run.student.lora.target_modules=[q_proj, v_proj]' --set run.steps=3
opd up --set workdir=runs/other --set student.replicas=2 --set trainer.nproc=2 --set restart.max_restarts=1
opd train services/configs/smollm2.yaml --set sampling.max_tokens=48 --nproc 2 --no-progress
torchrun --nnodes 2 --nproc-per-node 8 -m opd trainer serve --port 8003
python benchmarks/step_time.py --preset gpu --rows gpu,trl --steps 4 \\
    --tokenizer DIR
python benchmarks/efficiency.py --arms opd --seeds 0,1 --set run.optimizer.lr=1e-3 --workdir runs/sweep
export TEACHER_MODEL=Qwen/Qwen3-8B STUDENT_MODEL=Qwen/Qwen3-1.7B OPD_API_KEY=change-me
docker compose up -d --wait
STUDENT_PORT=8010-8011 docker compose up -d --scale student=2
docker compose run --rm --no-deps teacher opd models prepare smollm2-135m-instruct /data/models/smollm2
```

`opd up`, `opd teacher ...`, `opd trainer demo services/configs/smollm2.yaml --plot-to runs/x.png`,
`python -m
opd`, `make` alone, `make
task-gap`, and `opd --help`.
Paths: `services/teacher/`, `tests/{student,teacher}/test_engine_death.py`, `services/configs/*.yaml`,
`docker-compose*.yml`, `pyproject.toml`, `Makefile`, `runs/demo/logs/`, `/opt/opd/services/nope.jsonl`,
`<workdir>/seed<N>/<arm>`, `services/common/hf.py:42`, `.venv/bin/activate`.
Settings: `run.sampling.max_staleness: 1`, `student.lora_mode: auto`, `student.device`,
`run.teachers.<name>`, `teacher_prompt.hint: "Hint: {answer}"`, `eval.measures.correct`,
`services.max_wait_s`, `services.common`, `trainer.py`, `dataset.teacher_field:
topic`.
Variables: `OPD_TEACHER_PORT` / `_HOST`, `OPD_STUDENT_MAX_TOKENS`, `OPD_TRAINER_NPROC`, `OPD_TRAIN_*`,
`OPD_TRAIN_SAMPLING__MAX_TOKENS=32`, `OPD_TRAIN_TEACHER_URLS`, OPD_API_KEY, `OPD_FUZZ_SECONDS`.
Links: [the Makefile](Makefile), [a section](#valid-references), [a file's line](pyproject.toml#L1),
[the web](https://example.com/nope), ![config](services/configs/skill.yaml "the demo").

```python
teacher = TeacherClient("http://127.0.0.1:8001")  # make nope is not a command here
```

```
opd up --no-such-flag   (program output: not a command)
```
"""


def test_checkers_catch_planted_mistakes() -> None:
    doc = parse("planted.md", PLANTED)
    for name, wanted in EXPECTED.items():
        found = "\n".join(CHECKS[name]([doc]))
        missing = [w for w in wanted if w not in found]
        assert not missing, f"check_{name} missed {missing}; it reported:\n{found}"
    assert not any("docs/nope" in p for p in check_paths([parse("ok.md", "`docs/` and [x](README.md)")]))


def test_checkers_pass_valid_references() -> None:
    doc = parse("valid.md", VALID)
    problems = {name: check([doc]) for name, check in CHECKS.items()}
    assert not any(problems.values()), problems
    found = commands(doc)
    kinds = [c.kind for c in found]
    assert kinds.count("make") == 5 and kinds.count("compose") == 2, kinds
    assert sum(c.kind == "opd" for c in found) >= 10, [c.args for c in found if c.kind == "opd"]


@pytest.mark.parametrize("line, kind, args", [
    ("sudo OPD_X=1 nice -n 19 opd up --verbose", "opd", ["up", "--verbose"]),
    ("git checkout abc && make study", "make", ["study"]),
    (".venv/bin/python -m opd teacher demo", "opd", ["teacher", "demo"]),
    ("python -m pytest -m gpu tests/gpu", None, None),
])
def test_command_extraction(line: str, kind: str | None, args: list[str] | None) -> None:
    found = [c for c in commands_in(Snippet(1, line, "span")) if c.kind != "export"]
    assert [(c.kind, c.args) for c in found] == ([(kind, args)] if kind else [])
