"""The user docs cite only what exists, and the generated settings docs are current.

Checked in README.md, engines/README.md and docs/*.md:
- links and images resolve to files (and `#anchors` to headings of the target page);
- paths in inline code that start at a top-level entry of the repository exist, and dated raw
  outputs (`2026-11-22-...json`) exist in bench/results/;
- commands in shell code blocks and inline code: `python -m MODULE` and `python FILE.py` name
  runnable files of the repository, `whisper-*` names a console script of pyproject.toml, and
  every `--flag` they pass is defined in that program's source.
Then docs/configuration.md and README.md's settings table must equal what
`python -m app.config_docs --write` generates, and no page under docs/ may pass 500 lines.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

from app import config_docs
from app.config import Settings

REPO = Path(__file__).resolve().parent.parent
PAGES = sorted([REPO / "README.md", REPO / "engines" / "README.md", *(REPO / "docs").glob("*.md")])
TOP_LEVEL = {p.name for p in REPO.iterdir() if not p.name.startswith(".git")}
#: Built engines are git-ignored build outputs (engines/README.md says so): not checked.
BUILD_OUTPUTS = ("engines/",)
RESULTS = REPO / "bench" / "results"

FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
DATED_RESULT = re.compile(r"^\d{4}-\d{2}-\d{2}-[\w.-]+\.(json|txt|md)$")
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}


def page_id(page: Path) -> str:
    return page.relative_to(REPO).as_posix()


def split_page(text: str) -> tuple[list[tuple[str, str]], str]:
    """(fenced blocks as (language, body), the prose with the blocks removed)."""
    blocks = [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]
    return blocks, FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_\[\]()]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    _, prose = split_page(page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", prose, re.M)}


def console_scripts() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return project["scripts"]


def module_file(module: str) -> Path | None:
    base = REPO / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.is_file():
            return candidate
    return None


def shell_commands(block: str) -> list[list[str]]:
    """Each command of a shell block as words: continuations joined, comments dropped, split
    at `&&` and `;`, leading VAR=value assignments removed."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        command: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", ";", "||"):
                while command and re.match(r"^[A-Z_][A-Z0-9_]*=", command[0]):
                    command.pop(0)
                if command:
                    commands.append(command)
                command = []
            else:
                command.append(word)
    return commands


def check_command(words: list[str]) -> list[str]:
    """Problems with one command: its program or one of its --flags is not in the repository."""
    program, args, source = words[0], words[1:], None
    if program == "python":
        if args[:1] == ["-m"] and len(args) > 1:
            module, args = args[1], args[2:]
            source = module_file(module)
            if source is None:
                return [f"python -m {module}: no such module in the repository"]
            if source.name != "__main__.py" and "__main__" not in source.read_text():
                return [f"python -m {module}: {page_id(source)} has no __main__ entry"]
        elif args and args[0].endswith(".py"):
            source, args = REPO / args[0], args[1:]
            if not source.is_file():
                return [f"python {words[1]}: no such file"]
        else:
            return []
    elif re.match(r"^whisper-[a-z]", program):
        scripts = console_scripts()
        if program not in scripts:
            return [f"{program}: not a console script in pyproject.toml"]
        source = module_file(scripts[program].split(":")[0])
    elif program == "pytest":
        return [f"pytest {arg}: no such path" for arg in args if _missing_repo_path(arg)]
    else:
        return []
    assert source is not None
    text = source.read_text()
    flags = [arg.split("=")[0] for arg in args if arg.startswith("--")]
    return [f"{' '.join(words[:3])}: {flag} is not defined" for flag in flags if flag not in text]


def _missing_repo_path(token: str) -> bool:
    """True for a path that starts at a top-level entry of the repository and does not exist."""
    path = token.split("::")[0].split("#")[0].rstrip(".,;:")
    if not path or " " in path or any(c in path for c in "$<>*{}~"):
        return False
    if path.startswith(BUILD_OUTPUTS) or path.split("/")[0] not in TOP_LEVEL:
        return False
    return not (REPO / path).exists()


def problems(page: Path, text: str | None = None) -> list[str]:
    text = page.read_text() if text is None else text
    blocks, prose = split_page(text)
    found: list[str] = []
    for target in LINK.findall(prose):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            found.append(f"link {target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            found.append(f"link {target}: no such heading")
    for code in INLINE_CODE.findall(prose):
        if _missing_repo_path(code):
            found.append(f"`{code}`: no such path")
        if DATED_RESULT.match(code) and not (RESULTS / code).is_file():
            found.append(f"`{code}`: not in bench/results/")
        if re.match(r"^(python |pytest |whisper-[a-z])", code):  # not the model alias whisper-1
            for words in shell_commands(code):
                found += check_command(words)
    for language, body in blocks:
        if language in SHELL_FENCES:
            for words in shell_commands(body):
                found += check_command(words)
                found += [f"{w}: no such path" for w in words[1:] if _missing_repo_path(w)]
    return found


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_cited_paths_and_commands_exist(page: Path) -> None:
    assert problems(page) == []


def test_the_checks_catch_what_is_missing() -> None:
    page = REPO / "docs" / "probe.md"  # never written: only where relative links resolve from
    text = (
        "[a](missing.md) [b](performance.md#no-such-heading) `app/no_such.py` "
        "`2026-01-01-nothing-cpu.json` `python -m bench.no_such` `whisper-1`\n\n"
        "```bash\nWHISPER_X=1 python bench/gpu.py --no-such-flag\nwhisper-nothing\n```\n"
    )
    assert problems(page, text) == [
        "link missing.md: no such file",
        "link performance.md#no-such-heading: no such heading",
        "`app/no_such.py`: no such path",
        "`2026-01-01-nothing-cpu.json`: not in bench/results/",
        "python -m bench.no_such: no such module in the repository",
        "python bench/gpu.py --no-such-flag: --no-such-flag is not defined",
        "whisper-nothing: not a console script in pyproject.toml",
    ]


def test_every_setting_has_a_description() -> None:
    missing = [name for name, info in Settings.model_fields.items() if not info.description]
    assert missing == [], "give these Settings fields Field(description=...)"


def test_configuration_page_is_generated_from_settings() -> None:
    current = (REPO / "docs" / "configuration.md").read_text()
    assert current == config_docs.render(), "run: python -m app.config_docs --write"


def test_readme_settings_table_is_generated_from_settings() -> None:
    current = (REPO / "README.md").read_text()
    assert current == config_docs.render_readme(current), "run: python -m app.config_docs --write"


def test_docs_pages_stay_short() -> None:
    long = {
        page_id(p): n
        for p in (REPO / "docs").rglob("*.md")
        if (n := len(p.read_text().splitlines())) > 500
    }
    assert long == {}


def test_no_numbered_work_sessions_or_runs() -> None:
    """Measurements are cited by what, how, where and when; the history is in git."""
    ordinals = "ninth|tenth|eleventh|twelfth|thirteenth|[0-9]+th"
    pattern = f"({ordinals}) session|session ?[0-9]+|run [0-9]+"
    try:
        result = subprocess.run(
            ["git", "grep", "-niE", pattern], cwd=REPO, capture_output=True, text=True, timeout=60
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        pytest.skip("git is not available")
    if result.returncode not in (0, 1):
        pytest.skip(f"not a git checkout: {result.stderr.strip()}")
    assert result.stdout == ""
