"""Write the generated parts of the documentation from the real CLI and the real config tree.

    .venv/bin/python docs/generate.py           # writes docs/commands/_help/<command>.txt and docs/reference/config.md
    .venv/bin/python docs/generate.py --check   # writes nothing; exit 1 naming each file that is not current

Each command's `--help` is taken from the Typer app in-process (CliRunner, a fixed width), so the pages show what
`diffuse <command> --help` prints. The config reference is read from the text of conf/, because the YAML's comments
are its documentation and a YAML loader drops them. The output depends only on the code and conf/: the same tree
gives the same bytes (tests/contracts/test_docs.py compares a fresh generation with the files).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
HELP_DIR = ROOT / "docs" / "commands" / "_help"
CONFIG_PAGE = ROOT / "docs" / "reference" / "config.md"
WIDTH = 100  # the terminal width the help is rendered at: fixed, so that the files do not depend on the terminal

# Groups that are not chosen on the command line: Hydra's own settings, and blocks other options include.
NOT_CHOSEN = {
    "hydra": "Hydra's settings for every command (run and sweep dirs); `hydra.run.dir=PATH` and "
    "`hydra.sweep.dir=PATH` are the keys users set.",
    "shared": "Blocks that other options include in their defaults list (every sampler includes "
    "`shared/levels`); not a group chosen on the command line.",
}


# --- --help of every command -------------------------------------------------------------------------------------


def commands() -> list[str]:
    """The names of the CLI's commands, as `diffuse --help` lists them."""
    import typer

    from diffuse.cli import app

    return sorted(typer.main.get_command(app).commands)


def help_text(command: str) -> str:
    from typer.testing import CliRunner

    from diffuse.cli import app

    env = {"COLUMNS": str(WIDTH), "NO_COLOR": "1", "TERM": "dumb"}
    result = CliRunner().invoke(app, [command, "--help"], prog_name="diffuse", env=env, terminal_width=WIDTH)
    if result.exit_code != 0:
        raise RuntimeError(f"diffuse {command} --help exited {result.exit_code}:\n{result.output}")
    lines = [line.rstrip() for line in result.output.strip("\n").splitlines()]
    return "\n".join(lines) + "\n"


def help_files() -> dict[Path, str]:
    return {HELP_DIR / f"{name}.txt": help_text(name) for name in commands()}


# --- the config tree, read as text ---------------------------------------------------------------------------------


@dataclass
class Key:
    name: str  # dotted within the file: condition.aug_level
    value: str  # as written in the YAML ("" for a block)
    comment: str


@dataclass
class YamlFile:
    path: Path
    about: str = ""  # the comment lines at the top of the file
    package: str | None = None  # from `# @package X`
    defaults: list[tuple[str, str]] = field(default_factory=list)  # (entry as written, its comment)
    keys: list[Key] = field(default_factory=list)


_KEY = re.compile(r"^(?P<indent> *)(?P<name>[A-Za-z_][\w.\-]*|'[^']*'|\"[^\"]*\"):(?:\s+(?P<rest>.*))?$")
_ITEM = re.compile(r"^(?P<indent> *)- +(?P<rest>.*)$")


def _split_comment(text: str) -> tuple[str, str]:
    """`value  # comment` -> (value, comment); a # inside quotes or ${...} is part of the value."""
    quote, depth = None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "#" and depth == 0 and (i == 0 or text[i - 1] in " \t"):
            return text[:i].strip(), text[i + 1 :].strip()
    return text.strip(), ""


def _read_header(out: YamlFile, lines: list[str]) -> int:
    """The comment lines at the top: `@package X` and the file's description. Returns the first line after them."""
    i, about = 0, []
    while i < len(lines) and lines[i].lstrip().startswith("#"):
        text = lines[i].lstrip()[1:].strip()
        m = re.match(r"@package\s+(\S+)", text)
        if m:
            out.package = m.group(1)
        else:
            about.append(text)
        i += 1
    out.about = " ".join(about).strip()
    return i


def read_yaml(path: Path) -> YamlFile:
    """A YAML file's keys (dotted, in file order) with their values as written and their comments: the comment on
    the key's line, a comment block just above it, and comment lines aligned under its comment that continue it."""
    out = YamlFile(path)
    lines = path.read_text().splitlines()
    i = _read_header(out, lines)
    parents: list[tuple[int, str]] = []  # (indent, name) of the open blocks
    pending: list[str] = []  # a comment block above the next key
    last: Key | None = None
    last_column = -1  # where the last key's inline comment starts: a comment line there continues it
    in_defaults = False
    for line in lines[i:]:
        stripped = line.strip()
        if not stripped:
            pending, last_column = [], -1
            continue
        if stripped.startswith("#"):
            column = len(line) - len(line.lstrip())
            if last is not None and column == last_column and not pending:
                last.comment = f"{last.comment} {stripped[1:].strip()}".strip()
            else:
                pending.append(stripped[1:].strip())
                last_column = -1
            continue
        item = _ITEM.match(line)
        if item and in_defaults:
            entry, comment = _split_comment(item.group("rest"))
            out.defaults.append((entry, " ".join([*pending, comment]).strip()))
            pending, last, last_column = [], None, -1
            continue
        m = _KEY.match(line)
        if item or not m:  # a list item of a key's value: the value then reads as YAML's block list
            if last is not None and item:
                value, _ = _split_comment(item.group("rest"))
                last.value = f"{last.value}, {value}" if last.value.startswith("[") else f"[{value}"
            continue
        indent, name = len(m.group("indent")), m.group("name").strip("'\"")
        value, comment = _split_comment(m.group("rest") or "")
        while parents and parents[-1][0] >= indent:
            parents.pop()
        in_defaults = indent == 0 and name == "defaults"
        if in_defaults:
            pending = []
            continue
        dotted = ".".join([*(p for _, p in parents), name])
        key = Key(dotted, value, " ".join([*pending, comment]).strip())
        out.keys.append(key)
        pending, last = [], key
        last_column = line.index("#", len(line) - len(line.lstrip()) + len(name)) if comment else -1
        if value == "":
            parents.append((indent, name))
    for key in out.keys:  # a block list read item by item is closed here
        if key.value.startswith("[") and not key.value.endswith("]"):
            key.value += "]"
    return out


# --- the config page -----------------------------------------------------------------------------------------------


def _md(text: str) -> str:
    """Plain comment text for a Markdown table cell: code spans kept, the rest escaped."""
    parts = text.split("`")
    for j in range(0, len(parts), 2):  # outside code spans
        parts[j] = re.sub(r"([\\*_\[\]|])", r"\\\1", parts[j]).replace("<", "&lt;").replace(">", "&gt;")
    if len(parts) % 2 == 0:  # an unmatched backtick: show it literally
        parts[-2] += "\\`" + parts.pop()
    return "`".join(parts)


def _code(text: str) -> str:
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _keys_table(keys: list[Key], prefix: str) -> list[str]:
    if not keys:
        return ["No keys of its own."]
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key in keys:
        if not key.value and not key.comment:  # a bare block: its keys below carry the dotted name
            continue
        name = f"{prefix}{key.name}"
        value = _code(key.value) if key.value else "(a block)"
        rows.append(f"| {_code(name)} | {value} | {_md(key.comment)} |")
    return rows


def _defaults_list(entries: list[tuple[str, str]]) -> list[str]:
    if not entries:
        return []
    rows = ["Defaults list (in this order; `_self_` is the file's own keys):", ""]
    rows += [f"- {_code(entry)}" + (f": {_md(comment)}" if comment else "") for entry, comment in entries]
    return [*rows, ""]


def command_name(config: str) -> str:
    return config.replace("_", "-")


def _choices(primaries: dict[str, YamlFile]) -> dict[str, list[str]]:
    """group -> 'diffuse train (default shapes)' for every command whose defaults list names it."""
    out: dict[str, list[str]] = {}
    for config, yf in primaries.items():
        for entry, _ in yf.defaults:
            if ":" not in entry or entry.startswith("override "):
                continue
            group, option = (s.strip() for s in entry.split(":", 1))
            base, _, package = group.partition("@")
            default = "none by default" if option == "null" else f"default `{option}`"
            where = f" as `{package}`" if package else ""
            out.setdefault(base, []).append(f"`diffuse {command_name(config)}`{where} ({default})")
    return out


def _primary_section(config: str, yf: YamlFile) -> list[str]:
    lines = [f"### diffuse {command_name(config)}", "", f"`conf/{config}.yaml`", ""]
    if yf.about:
        lines += [_md(yf.about), ""]
    lines += _defaults_list(yf.defaults)
    return [*lines, *_keys_table(yf.keys, ""), ""]


def _option_section(group: str, yf: YamlFile) -> list[str]:
    option = yf.path.stem
    package = yf.package or group
    if group in NOT_CHOSEN:
        title, prefix = f"{group}/{option}", ("hydra." if group == "hydra" else "")
        where = ""
    else:
        title = f"{group}={option}"
        prefix = "" if package in ("_global_", "_here_") else f"{package}."
        where = " (keys at the top level)" if package == "_global_" else f" (keys under `{package}.`)"
    lines = [f"#### {title}", "", f"`conf/{group}/{option}.yaml`{where}", ""]
    if yf.about:
        lines += [_md(yf.about), ""]
    lines += _defaults_list(yf.defaults)
    return [*lines, *_keys_table(yf.keys, prefix), ""]


def config_page(conf: Path = CONF) -> str:
    primaries = {p.stem: read_yaml(p) for p in sorted(conf.glob("*.yaml"))}
    groups = sorted(p.name for p in conf.iterdir() if p.is_dir() and any(p.glob("*.yaml")))
    chosen_by = _choices(primaries)
    lines = [
        "# Config reference",
        "",
        "<!-- Generated by docs/generate.py from conf/: edit the YAML files, then run "
        "`.venv/bin/python docs/generate.py`. -->",
        "",
        "Every key of every command and config group, with its default and the comment the YAML gives it. "
        "On the command line a group is chosen with `group=option` (`sampler=unipc`) and a key is set with "
        "`key=value` (`sampler.steps=20` is written `steps=20` where the command has its own `steps`). "
        "[Config groups](groups.md) explains what each group is for; `diffuse <command> --cfg job` prints the "
        "composed config of one run.",
        "",
        "## Commands",
        "",
        "One primary config per command: its defaults list picks the groups, then its own keys.",
        "",
    ]
    for config, yf in primaries.items():
        lines += _primary_section(config, yf)
    lines += ["## Groups", ""]
    for group in groups:
        files = sorted((conf / group).glob("*.yaml"))
        lines += [f"### {group}", ""]
        if group in NOT_CHOSEN:
            lines += [NOT_CHOSEN[group], ""]
        else:
            options = ", ".join(f"`{p.stem}`" for p in files)
            lines += [f"Options: {options}.", ""]
            if chosen_by.get(group):
                lines += ["Chosen by " + "; ".join(chosen_by[group]) + ".", ""]
        for path in files:
            lines += _option_section(group, read_yaml(path))
    return "\n".join(lines).rstrip("\n") + "\n"


# --- writing -------------------------------------------------------------------------------------------------------


def generated() -> dict[Path, str]:
    return {**help_files(), CONFIG_PAGE: config_page()}


def stale(files: dict[Path, str]) -> list[Path]:
    """Files that differ from a fresh generation, and help files of commands that are gone."""
    out = [path for path, text in files.items() if not path.is_file() or path.read_text() != text]
    out += [p for p in sorted(HELP_DIR.glob("*.txt")) if p not in files]
    return out


def main(argv: list[str]) -> int:
    files = generated()
    if "--check" in argv:
        old = stale(files)
        for path in old:
            print(f"not current: {path.relative_to(ROOT)} (run .venv/bin/python docs/generate.py)", file=sys.stderr)
        return 1 if old else 0
    for path in sorted(HELP_DIR.glob("*.txt")):
        if path not in files:
            path.unlink()
    for path, text in files.items():
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
