"""`diffuse <command> --help`, read from the config tree at run time: the command's own keys, every config group it
composes with its options (each file of conf/<group>/), and the keys of the groups that have one option."""

from __future__ import annotations

import re
from importlib.resources import files

from omegaconf import OmegaConf

# Hydra's own settings: a group of the tree, not one a user chooses.
HIDDEN_GROUPS = {"hydra"}
_KEY_LINE = re.compile(r"^( *)([A-Za-z_][\w]*):\s*([^#]*?)\s*(?:#\s*(.*))?$")


def conf_root():
    return files("diffuse.conf")


def groups_of(command: str) -> list[tuple[str, str | None]]:
    """(group, default option or None) in the order of the command's defaults list."""
    primary = OmegaConf.to_container(OmegaConf.load(str(conf_root() / f"{command}.yaml")))
    out = []
    for entry in primary.get("defaults", []):
        if isinstance(entry, dict):
            for group, option in entry.items():
                if not group.startswith("override ") and group not in HIDDEN_GROUPS:
                    out.append((group, option))
    return out


def options(group: str) -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in (conf_root() / group).iterdir() if p.name.endswith(".yaml"))


def keys(path) -> list[tuple[str, str, str]]:
    """(key, value, comment) of the top-level keys of a YAML file, from its text (the comments are the docs)."""
    out, parent = [], None
    for line in path.read_text().splitlines():
        m = _KEY_LINE.match(line)
        if not m:
            continue
        indent, name, value, comment = len(m.group(1)), m.group(2), m.group(3), m.group(4) or ""
        if indent == 0:
            parent = name if value == "" else None  # a block: its keys are listed as block.key
            if name != "defaults" and value != "":
                out.append((name, value, comment))
        elif parent is not None and parent != "defaults" and indent == 2:
            out.append((f"{parent}.{name}", value, comment))
    return out


def help_text(command: str) -> str:
    """Plain lines: the command's keys, then its groups, then the keys of the one-option groups."""
    groups = groups_of(command)
    names = {g for g, _ in groups}
    lines = ["Keys (key=value; the default shown):"]
    lines += _rows([(f"{k}={v}", c) for k, v, c in keys(conf_root() / f"{command}.yaml") if k not in names])
    lines += ["", "Groups (group=option; * marks the default):"]
    rows, singles = [], []
    for group, default in groups:
        opts = options(group.split("@")[0])  # sampler@tune.reference: the sampler group, chosen for another key
        shown = [f"{o}*" for o in opts if o == default] + [o for o in opts if o != default]
        rows.append((group, " | ".join(shown) + ("" if default else "  (none by default)")))
        if opts == ["default"]:
            singles.append(group)
    lines += _rows(rows)
    for group in singles:
        lines += ["", f"{group}.* (group {group}):"]
        lines += _rows([(f"{group}.{k}={v}", c) for k, v, c in keys(conf_root() / group / "default.yaml")])
    for (
        group,
        _,
    ) in groups:  # groups of a few options (inpaint, edit, schedule, method -> distill.*): each option's keys
        if "@" in group:  # sampler@tune.reference: another key's choice, listed under its own group
            continue
        opts = options(group)
        if len(opts) > FEW:
            continue
        for opt in opts:
            path = conf_root() / group / f"{opt}.yaml"
            package = _package(path) or group
            if package != "_global_" and opts != ["default"]:
                lines += ["", f"{package}.* with {group}={opt}:"]
                lines += _rows([(f"{package}.{k}={v}", c) for k, v, c in option_keys(path)])
    return "\n".join(lines)


FEW = 3  # groups with at most this many options list every option's keys in --help


def option_keys(path) -> list[tuple[str, str, str]]:
    """An option file's keys, those it inherits from options of its own group in its defaults list included
    (edit=invert extends sdedit); its own value wins."""
    inherited: list[tuple[str, str, str]] = []
    in_defaults = False
    for line in path.read_text().splitlines():
        if line.startswith("defaults:"):
            in_defaults = True
            continue
        m = re.match(r"\s+-\s+([A-Za-z0-9_]+)\s*(#.*)?$", line) if in_defaults else None
        if m and m.group(1) != "_self_" and (path.parent / f"{m.group(1)}.yaml").is_file():
            inherited += option_keys(path.parent / f"{m.group(1)}.yaml")
        elif not line.startswith((" ", "-")):
            in_defaults = False
    own = keys(path)
    names = {k for k, _, _ in own}
    return [row for row in inherited if row[0] not in names] + own


def _package(path) -> str | None:
    for line in path.read_text().splitlines():
        m = re.match(r"#\s*@package\s+(\S+)", line)
        if m:
            return m.group(1)
    return None


def _rows(rows: list[tuple[str, str]]) -> list[str]:
    width = min(max((len(a) for a, _ in rows), default=0), 40)
    return [
        f"  {a:<{width}}  {b}".rstrip() if len(a) <= width else f"  {a}\n  {'':<{width}}  {b}".rstrip() for a, b in rows
    ]
