"""The documentation keeps up with the code: every command has its page and its README row, every config option is
in the generated reference, the generated files are what the generator writes now, every relative link resolves,
and the site builds with mkdocs --strict."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


generate = _generator()


def _pages() -> list[Path]:
    top = [ROOT / name for name in ("README.md", "ARCHITECTURE.md", "CONTRIBUTING.md")]
    return top + sorted(p for p in DOCS.rglob("*.md") if "_help" not in p.parts)


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where a bracket is not a link."""
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.S | re.M)
    return re.sub(r"`+[^`\n]*`+", "", text)


def test_every_command_has_a_page_that_shows_its_help_and_a_row_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    rows = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^\| `diffuse ([\w-]+)` \|.*\]\((docs/commands/[\w-]+\.md)\) \|$", readme, re.M)
    }
    commands = generate.commands()
    assert len(commands) >= 12
    for name in commands:
        page = DOCS / "commands" / f"{name}.md"
        assert page.is_file(), f"diffuse {name} has no page {page.relative_to(ROOT)}"
        assert f'--8<-- "commands/_help/{name}.txt"' in page.read_text(), f"{page.name} does not include its --help"
        assert rows.get(name) == f"docs/commands/{name}.md", f"diffuse {name} is not in README.md's command table"
    assert sorted(rows) == commands, "README.md's command table names a command the CLI does not have"


def test_every_config_option_is_in_the_config_reference():
    reference = (DOCS / "reference" / "config.md").read_text()
    files = sorted((ROOT / "conf").glob("*.yaml")) + sorted((ROOT / "conf").glob("*/*.yaml"))
    assert len(files) > 50
    missing = [str(p.relative_to(ROOT)) for p in files if f"`{p.relative_to(ROOT)}`" not in reference]
    assert not missing, f"not in docs/reference/config.md (run .venv/bin/python docs/generate.py): {missing}"


def test_every_key_of_an_option_is_in_the_config_reference():
    page = generate.config_page()
    for path in sorted((ROOT / "conf").glob("*/*.yaml")):
        for key in generate.read_yaml(path).keys:
            if key.value or key.comment:
                assert f"{key.name}`" in page, f"{path.relative_to(ROOT)}: {key.name} is not in the reference"


def test_the_generated_files_are_current():
    files = generate.generated()
    assert set(files) >= {generate.CONFIG_PAGE}
    assert generate.generated() == files, "the generator is not deterministic"
    stale = [str(p.relative_to(ROOT)) for p in generate.stale(files)]
    assert not stale, f"regenerate with .venv/bin/python docs/generate.py: {stale}"


def test_the_yaml_reader_keeps_comments_blocks_and_continuations(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(
        "# @package distill\n"
        "# What the option is.\n"
        "defaults:\n"
        "  - base   # the option it extends\n"
        "  - _self_\n"
        "\n"
        "name: x                # its name\n"
        "url: 'a # b'           # a hash in quotes is the value\n"
        "block:                 # a block\n"
        "  inner: 1             # a key in it, whose comment\n"
        "                       # goes on\n"
        "# about the next key\n"
        "last: ${oc.env:A,#}\n"
    )
    yf = generate.read_yaml(path)
    assert yf.package == "distill" and yf.about == "What the option is."
    assert yf.defaults == [("base", "the option it extends"), ("_self_", "")]
    assert [(k.name, k.value, k.comment) for k in yf.keys] == [
        ("name", "x", "its name"),
        ("url", "'a # b'", "a hash in quotes is the value"),
        ("block", "", "a block"),
        ("block.inner", "1", "a key in it, whose comment goes on"),
        ("last", "${oc.env:A,#}", "about the next key"),
    ]


def test_every_relative_link_points_to_an_existing_file():
    broken = []
    for page in _pages():
        text = page.read_text()
        targets = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _prose(text))
        for target in targets:
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#", 1)[0]).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
        for snippet in re.findall(r'^--8<-- "([^"]+)"$', text, re.M):
            if not any((base / snippet).is_file() for base in (DOCS, ROOT)):
                broken.append(f"{page.relative_to(ROOT)}: snippet {snippet}")
    assert not broken, broken


@pytest.mark.subprocess
def test_the_site_builds_strictly_offline(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("pymdownx")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", "mkdocs.yml", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "commands" / "train" / "index.html").is_file()
