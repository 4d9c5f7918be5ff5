"""The documentation's references exist: every relative link, and every script, module, config file and Makefile
target that a command in README.md, docs/ or a folder's README names.

Commands are read from fenced code blocks and from inline code that starts with `python`, `torchrun` or `make`;
a `configs/` path counts anywhere in a code block except a ```text block. Prose and ```text blocks are not read
(a layout description may name modules that are being written), so a file name there only counts when a command
uses it. `check_markdown` is also run on a page with one broken reference of each kind, so that a
checker that finds nothing cannot pass.
"""

from __future__ import annotations

import ast
import glob
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted(
    {
        ROOT / "README.md",
        *ROOT.glob("docs/**/*.md"),
        *ROOT.glob("results/*.md"),
        *(ROOT / d / "README.md" for d in ("bench", "studies", "results")),
    }
)

FENCE = re.compile(r"^```(\w*)\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`([^`]+)`")
COMMAND_START = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(python\S*|torchrun|make)\s")
FROM_IMPORT = re.compile(r"^from\s+([\w.]+)\s+import\s+(.+)$")


def heading_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, fenced = set(), False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.add(heading_anchor(line.lstrip("#")))
    return found


def split_page(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(prose lines, [(language, code lines) per fenced block])."""
    prose, blocks, current = [], [], None
    for line in text.splitlines():
        fence = FENCE.match(line)
        if fence and current is None:
            current = (fence.group(1), [])
        elif line.startswith("```") and current is not None:
            blocks.append(current)
            current = None
        elif current is not None:
            current[1].append(line)
        else:
            prose.append(line)
    return prose, blocks


def shell_commands(lines: list[str]) -> list[str]:
    """Logical command lines of a shell block: continuations joined, comments dropped."""
    commands, pending = [], ""
    for line in lines:
        line = re.sub(r"(^|\s)#.*$", "", line).rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        commands.append(pending + line)
        pending = ""
    return [c.strip() for c in commands + [pending] if c.strip()]


def module_exists(name: str) -> bool:
    parts = name.split(".")
    if (ROOT / parts[0]).is_dir() or (ROOT / f"{parts[0]}.py").is_file():
        base = ROOT.joinpath(*parts)
        return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()
    return importlib.util.find_spec(parts[0]) is not None


def repo_path_exists(path: str) -> bool:
    return bool(glob.glob(str(ROOT / path))) if any(c in path for c in "*?[") else (ROOT / path).exists()


def check_command(command: str) -> list[str]:
    """What a command names that is not in the repository."""
    problems = []
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    starts = [i for i, w in enumerate(words) if re.fullmatch(r"python\S*|torchrun|make", w)]
    for i in starts:
        tool, rest = words[i], words[i + 1 :]
        if tool == "make":
            targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
            problems += [f"make target '{w}' not in Makefile" for w in rest[:1] if w not in targets]
            continue
        for j, word in enumerate(rest):
            if word == "-m" and j + 1 < len(rest):
                if not module_exists(rest[j + 1]):
                    problems.append(f"module '{rest[j + 1]}' not found")
                break
            if word.endswith(".py"):
                if not (ROOT / word).is_file():
                    problems.append(f"script '{word}' not found")
                break
    for flag, value in zip(words, words[1:]):
        if flag == "--config" and not (ROOT / value).is_file():
            problems.append(f"config '{value}' not found")
    return problems


def check_python_block(lines: list[str]) -> list[str]:
    """`from pkg.mod import a, b` in a Python snippet: the module is in the repository and defines a and b."""
    problems = []
    for line in lines:
        match = FROM_IMPORT.match(line.strip())
        if not match or not (ROOT / match.group(1).split(".")[0]).exists():
            continue
        module = ROOT.joinpath(*match.group(1).split("."))
        source = module.with_suffix(".py") if module.with_suffix(".py").is_file() else module / "__init__.py"
        if not source.is_file():
            problems.append(f"module '{match.group(1)}' not found")
            continue
        defined = set()
        for node in ast.parse(source.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                defined.add(node.name)
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                defined |= {t.id for t in targets if isinstance(t, ast.Name)}
            elif isinstance(node, ast.ImportFrom | ast.Import):
                defined |= {(a.asname or a.name).split(".")[0] for a in node.names}
        for name in (n.strip() for n in match.group(2).split(",")):
            if name not in defined:
                problems.append(f"'{name}' not defined in {source.relative_to(ROOT)}")
    return problems


def check_markdown(page: Path) -> list[str]:
    """Every broken reference of one page, as 'page: problem' lines."""
    prose, blocks = split_page(page.read_text())
    problems = []
    for target in LINK.findall("\n".join(prose)):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            problems.append(f"link '{target}': {path} does not exist")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            problems.append(f"link '{target}': no heading '#{fragment}' in {resolved.name}")
    commands = [" ".join(code.split()) for code in INLINE_CODE.findall(" ".join(prose))]
    commands = [c for c in commands if COMMAND_START.match(c + " ")]
    for language, lines in blocks:
        if language == "python":
            problems += check_python_block(lines)
            continue
        if language == "text":
            continue
        commands += shell_commands(lines)
        for line in lines:
            problems += [
                f"'{p}' not found" for p in re.findall(r"(?<![\w/])configs/[\w.*/-]*", line) if not repo_path_exists(p)
            ]
    for command in commands:
        problems += check_command(command)
    return [f"{page.relative_to(ROOT) if page.is_relative_to(ROOT) else page}: {p}" for p in problems]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_reference_of_the_page_exists(page):
    assert page.is_file(), f"{page} is missing"
    problems = check_markdown(page)
    assert not problems, "\n".join(problems)


def test_the_docs_link_every_task_page_from_the_readme():
    linked = {Path(t.partition("#")[0]) for t in LINK.findall((ROOT / "README.md").read_text())}
    pages = {p.relative_to(ROOT) for p in ROOT.glob("docs/*.md")}
    assert pages <= linked, f"not linked from README.md: {sorted(map(str, pages - linked))}"


def test_the_checker_reports_each_kind_of_broken_reference(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# A heading\n")
    page.write_text(
        "# Title\n\nSee [a missing page](missing.md), [a heading](other.md#a-heading), [no heading](other.md#nope)\n"
        "and [here](#title); run `python -m engine.no_such_module --config configs/demo.yaml`.\n\n"
        "```bash\n"
        "python train_retrieval.py --config configs/demo.yaml\n"
        "python no_such_script.py --config configs/no_such.yaml \\\n"
        "    --options a=b   # configs/also_missing.yaml\n"
        "torchrun --nproc_per_node=2 eval_retrieval.py --config configs/retrieval_flickr.yaml\n"
        "make demo && make no-such-target\n"
        "```\n\n"
        "```python\nfrom models.loading import load_model, no_such_function\n```\n\n"
        "```text\nconfigs/planned_module.py   layout prose is not checked\n```\n"
    )
    problems = "\n".join(check_markdown(page))
    for expected in (
        "link 'missing.md'",
        "no heading '#nope' in other.md",
        "module 'engine.no_such_module' not found",
        "script 'no_such_script.py' not found",
        "config 'configs/no_such.yaml' not found",
        "'configs/also_missing.yaml' not found",
        "make target 'no-such-target'",
        "'no_such_function' not defined in models/loading.py",
    ):
        assert expected in problems, f"{expected!r} not reported in:\n{problems}"
    assert "planned_module" not in problems
    assert len(problems.splitlines()) == 9  # the config is named twice: by --config and as a configs/ path
