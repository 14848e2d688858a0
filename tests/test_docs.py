"""The README and docs/ stay true to the repository.

Every relative link in README.md and docs/*.md resolves to a file (and a `#anchor` to a heading of it, by
GitHub's slug rule), and every command they quote, in inline code or a code block, that starts with
`fedse `, `make ` or `prefect ` exists: `fedse <subcommand> --help` exits 0 (in-process, typer's runner),
`make <target>` names a Makefile target, `prefect <words> --help` exits 0 (the venv's prefect, once per
command). The checker's own tests below show it can fail.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fedse.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOOLS = ("fedse", "make", "prefect")


# ------------------------------------------------------------------ reading a Markdown page
@dataclass
class Page:
    path: Path
    prose: list[str] = field(default_factory=list)  # lines outside fenced code blocks
    blocks: list[tuple[str, list[str]]] = field(default_factory=list)  # (info string, lines) of each block

    def paragraphs(self) -> list[str]:
        """The prose joined into paragraphs (an inline code span or a link may wrap onto the next line); each
        table row is a paragraph of its own."""
        out, current = [], []
        for line in self.prose:
            if not line.strip() or line.lstrip().startswith(("|", "#")):
                out.append(" ".join(current))
                current = []
                out.append(line)
            else:
                current.append(line.strip())
        out.append(" ".join(current))
        return [p for p in out if p.strip()]


def read_page(path: Path) -> Page:
    page, fence, lang, lines = Page(path), "", "", []
    for line in path.read_text(encoding="utf-8").splitlines():
        marker = re.match(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)", line)
        if not fence and marker:
            fence, lang, lines = marker.group(1), marker.group(2).lower(), []
        elif fence and line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
            page.blocks.append((lang, lines))
            fence = ""
        elif fence:
            lines.append(line)
        else:
            page.prose.append(line)
    return page


CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def code_spans(line: str) -> list[str]:
    return [m.group(2).strip() for m in CODE_SPAN.finditer(line)]


# ------------------------------------------------------------------ links
def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text, lower-cased, everything but letters, digits, `_`,
    `-` and spaces removed, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = re.sub(r"<[^>]+>", "", text)  # HTML tags show nothing
    text = text.replace("`", "").replace("*", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """Every heading anchor of a page; a repeated slug gets -1, -2, … as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for line in read_page(path).prose:
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target) and ![alt](target)
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")  # [label]: target


def links(page: Page) -> list[str]:
    found = []
    for text in page.paragraphs():
        bare = CODE_SPAN.sub("", text)  # a link inside inline code is text
        found += LINK.findall(bare)
    for line in page.prose:
        found += REFERENCE.findall(line)
    return found


def broken_links(path: Path) -> list[str]:
    """Each relative link of the page whose file, or whose anchor in a Markdown file, does not exist."""
    problems = []
    for target in links(read_page(path)):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http(s), mailto, …: not checked here
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path.resolve()
        if not dest.exists():
            problems.append(f"{target}: no such file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    return problems


# ------------------------------------------------------------------ commands
PLACEHOLDER = re.compile(r"[<>…\[\]{}|$*=\"']|\.\.\.|^[A-Z][A-Z0-9_]*$")


def command_lines(page: Page) -> list[str]:
    """Every inline code span of the prose and every line of each code block (a trailing `# comment` cut,
    `a && b` and `a; b` split), normalised: `.venv/bin/fedse` reads as `fedse`, `\\|` in a table as `|`."""
    candidates = [span for text in page.paragraphs() for span in code_spans(text.replace("\\|", "|"))]
    for lang, lines in page.blocks:
        if lang in ("mermaid", "json", "yaml"):
            continue
        candidates += [re.sub(r"\s+#.*$", "", line) for line in lines]
    out = []
    for text in candidates:
        for part in re.split(r"&&|;", text):
            part = re.sub(r"^(\./)?\.venv/bin/", "", part.strip())
            if part.split(" ", 1)[0] in TOOLS and " " in part:
                out.append(part)
    return out


def command_words(command: str) -> tuple[str, tuple[str, ...]]:
    """(tool, the words after it up to the first option or placeholder); fedse's global options
    (`--set k=v`, `--params FILE`) are skipped first."""
    tool, *rest = command.split()
    if tool == "fedse":
        while rest and rest[0].split("=")[0] in ("--set", "--params"):
            rest = rest[1:] if "=" in rest[0] else rest[2:]
    words = []
    for word in rest:
        if word.startswith("-") or PLACEHOLDER.search(word):
            break
        words.append(word)
    return tool, tuple(words)


@cache
def make_targets() -> frozenset[str]:
    text = (ROOT / "Makefile").read_text()
    return frozenset(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, flags=re.M)) - {".PHONY"}


def fedse_path(words: tuple[str, ...]) -> list[str]:
    """The words that name a (sub)command: they stop where a command takes arguments instead of
    subcommands, or at the first unknown one (kept, so that the runner reports it)."""
    cmd = typer.main.get_command(app)
    path = []
    for word in words:
        commands = getattr(cmd, "commands", None)  # a group's subcommands (typer vendors its own click)
        if commands is None:
            break
        path.append(word)
        sub = commands.get(word)
        if sub is None:
            break
        cmd = sub
    return path


@cache
def check_command(tool: str, words: tuple[str, ...]) -> str | None:
    """None when the command exists, else why not."""
    if tool == "make":
        target = words[0] if words else "all"
        return None if target in make_targets() else f"make: no target {target!r} in the Makefile"
    if tool == "fedse":
        path = fedse_path(words)
        result = CliRunner().invoke(app, [*path, "--help"])
        if result.exit_code != 0:
            return f"fedse {' '.join(path)} --help: exit {result.exit_code}: {result.output.strip()[-300:]}"
        return None
    prefect = Path(sys.executable).parent / "prefect"
    if not prefect.exists():
        pytest.skip("prefect is not installed beside this Python")
    env = os.environ | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    result = subprocess.run([str(prefect), *words, "--help"], capture_output=True, text=True, timeout=120,
                            env=env, cwd=ROOT)
    if result.returncode != 0:
        return f"prefect {' '.join(words)} --help: exit {result.returncode}: {result.stderr.strip()[-300:]}"
    return None


def quoted_commands() -> dict[tuple[str, tuple[str, ...]], list[str]]:
    """Each distinct (tool, words) quoted in the pages, with where it was quoted."""
    found: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for path in PAGES:
        for command in command_lines(read_page(path)):
            found.setdefault(command_words(command), []).append(f"{path.relative_to(ROOT)}: {command}")
    return found


COMMANDS = quoted_commands()


# ------------------------------------------------------------------ the checks
@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path: Path) -> None:
    assert broken_links(path) == []


@pytest.mark.parametrize("key", sorted(COMMANDS), ids=lambda k: " ".join([k[0], *k[1]]))
def test_every_quoted_command_exists(key: tuple[str, tuple[str, ...]]) -> None:
    problem = check_command(*key)
    assert problem is None, f"{problem} (quoted in {COMMANDS[key][0]})"


def test_the_pages_quote_commands_of_every_tool() -> None:
    tools = {tool for tool, _ in COMMANDS}
    assert tools == set(TOOLS), f"no quoted command found for {set(TOOLS) - tools}: is the collector broken?"
    assert ("make", ("run",)) in COMMANDS and ("fedse", ("run",)) in COMMANDS


# ------------------------------------------------------------------ the checker can fail
def test_a_made_up_command_is_flagged() -> None:
    assert check_command(*command_words("fedse nosuchcommand --flag")) is not None
    assert check_command(*command_words("fedse envs nosuch")) is not None
    assert check_command(*command_words("make nosuchtarget")) is not None
    assert check_command(*command_words("fedse envs play ENV --task N")) is None  # ENV is a placeholder


def test_command_words_stop_at_options_and_placeholders() -> None:
    assert command_words("fedse --set learner.lr=0.003 train --env maze") == ("fedse", ("train",))
    assert command_words("fedse report RUN… [--out reports]") == ("fedse", ("report",))
    assert command_words("prefect deployment run fedse/round-loop --param method=fedse") == (
        "prefect", ("deployment", "run", "fedse/round-loop"))
    assert fedse_path(("report", "runs/a", "runs/b")) == ["report"]  # a leaf command's arguments
    page = Page(Path("x.md"), prose=["run `.venv/bin/fedse eval --json` or `make stop`"],
                blocks=[("bash", ["make run    # comment", "cd x && fedse seed"]), ("mermaid", ["fedse nope"])])
    assert command_lines(page) == ["fedse eval --json", "make stop", "make run", "fedse seed"]


def test_a_broken_link_is_flagged(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# Title\n\n## How `quick` was calibrated\n\n## Same\n\n## Same\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[ok](there.md#how-quick-was-calibrated) [ok](there.md#same-1) [ok](#page)\n"
                    "[gone](missing.md) [bad anchor](there.md#nowhere) ![img](img/none.png)\n"
                    "`[in code](missing-too.md)` [web](https://example.com/x)\n\n"
                    "```\n[in a block](missing-three.md)\n```\n")
    problems = broken_links(page)
    assert len(problems) == 3, problems
    assert any("missing.md" in p for p in problems) and any("#nowhere" in p for p in problems)
    assert any("img/none.png" in p for p in problems)


def test_slug_follows_github() -> None:
    assert slug("How `quick` was calibrated") == "how-quick-was-calibrated"
    assert slug("Full profile, seed 0 (20 rounds, five clients)") == "full-profile-seed-0-20-rounds-five-clients"
    assert slug("On a GPU: SmolLM2-135M") == "on-a-gpu-smollm2-135m"
    assert slug("The object store of `make serve`") == "the-object-store-of-make-serve"
