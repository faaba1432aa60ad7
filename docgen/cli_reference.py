"""The CLI reference: every subcommand of `layerprune`, every option with its help and default, read
from the argparse parsers themselves (`layerprune.cli.build_parser`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    command: str
    group: str
    flags: str  # "-o, --output" or the positional's name
    help: str | None
    default: str
    values: str  # choices, a type, or "flag"


def subparsers(parser: argparse.ArgumentParser | None = None) -> dict[str, argparse.ArgumentParser]:
    from layerprune.cli import build_parser

    parser = parser or build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _default(action: argparse.Action) -> str:
    if action.required or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "required" if action.required else "off"
    if action.default is None or action.default == argparse.SUPPRESS:
        return "—"
    return f"`{action.default}`"


def _values(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "flag"
    if action.choices is not None:
        return " \\| ".join(f"`{c}`" for c in action.choices)
    many = " …" if action.nargs in ("*", "+") else ""
    return _type_name(action.type) + many


def _type_name(kind) -> str:
    """What a value must look like, from the argparse type (the CLI's own parsers in cli/common.py)."""
    if kind is None or kind is str:
        return "text"
    closure = getattr(kind, "__closure__", None)
    if getattr(kind, "__qualname__", "").startswith("int_at_least") and closure:
        return f"integer ≥ {closure[0].cell_contents}"  # int_at_least(minimum)'s one cell
    names = {"Path": "path", "int": "integer", "float": "number", "fraction": "number in [0, 1)",
             "int_list": "integers, comma-separated", "mask_bits": "0/1 string"}  # fmt: skip
    name = getattr(kind, "__name__", type(kind).__name__)
    return names.get(name, name.replace("_", " "))


def options(parser: argparse.ArgumentParser | None = None) -> list[Option]:
    """Every argument of every subcommand (--help excluded), in the order of `--help`."""
    out = []
    for name, sp in subparsers(parser).items():
        for group in sp._action_groups:
            for a in group._group_actions:
                if isinstance(a, argparse._HelpAction):
                    continue
                flags = ", ".join(a.option_strings) or a.dest
                title = "arguments" if group.title in ("positional arguments", "options") else group.title
                out.append(Option(name, title, flags, a.help, _default(a), _values(a)))
    return out


def _cell(text: str | None) -> str:
    return (text or "").replace("%%", "%").replace("|", "\\|").replace("\n", " ")


def render() -> str:
    """Markdown: per subcommand its help, usage, and a table per option group."""
    subs = subparsers()
    rows = options()
    out = [
        f"{len(rows)} options over {len(subs)} subcommands, generated from `layerprune.cli.build_parser()` "
        "when the site is built. `layerprune COMMAND --help` prints the same.",
        "",
    ]
    for name, sp in subs.items():
        out += [f"## layerprune {name}", "", _cell(sp.description or _summary(name)), ""]
        usage = sp.format_usage().strip().removeprefix("usage: ")
        out += ["```text", usage, "```", ""]
        groups: dict[str, list[Option]] = {}
        for r in rows:
            if r.command == name:
                groups.setdefault(r.group, []).append(r)
        for title, members in groups.items():
            if title != "arguments":
                out += [f"**{title}**", ""]
            out += ["| option | what it does | default | values |", "|---|---|---|---|"]
            out += [f"| `{r.flags}` | {_cell(r.help)} | {r.default} | {r.values} |" for r in members]
            out.append("")
    return "\n".join(out)


def _summary(name: str) -> str:
    from layerprune.cli import build_parser

    (sub,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return next((c.help for c in sub._choices_actions if c.dest == name), "") or ""
