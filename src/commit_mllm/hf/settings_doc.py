"""The ``CoMMITConfig`` settings table of docs/integrations.md, generated from the dataclass.

Names, types and defaults come from the dataclass fields, meanings from its docstring's
``Attributes:`` section, so the table cannot drift from the code: a test compares the
table in the doc with :func:`config_table`. Regenerate it with::

    python -m commit_mllm.hf.settings_doc docs/integrations.md          # rewrite in place
    python -m commit_mllm.hf.settings_doc --check docs/integrations.md  # exit 1 if stale

The table sits between :data:`BEGIN` and :data:`END` marker lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
from pathlib import Path
from typing import Any

from ..method.strategies import CoMMITConfig

__all__ = ["BEGIN", "END", "config_table", "docstring_attributes", "render_doc", "sync_doc"]

BEGIN = "<!-- BEGIN CoMMITConfig settings (generated: python -m commit_mllm.hf.settings_doc) -->"
END = "<!-- END CoMMITConfig settings -->"


def docstring_attributes(cls: type) -> dict[str, str]:
    """Name -> description from the ``Attributes:`` section of a Google-style docstring."""
    doc = inspect.getdoc(cls) or ""
    out: dict[str, str] = {}
    inside, current = False, None
    for line in doc.splitlines():
        if line.strip() == "Attributes:":
            inside = True
            continue
        if not inside:
            continue
        if line and not line.startswith(" "):  # the next section
            break
        entry = re.match(r"^ {4}(\w+)(?: \([^)]*\))?: ?(.*)$", line)
        if entry:
            current = entry.group(1)
            out[current] = entry.group(2).strip()
        elif current is not None and line.strip():
            out[current] += " " + line.strip()
    return out


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _show(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    if isinstance(value, float) and len(repr(value)) > 8:
        return f"`{value:.6g}`"
    return f"`{value!r}`"


def _cell(text: str, namespace: Any = None) -> str:
    """Docstring markup (reST roles, double backquotes) as Markdown, safe in a table cell.

    A ``:data:`NAME``` reference to a tuple of strings in ``namespace`` (the class's module)
    is spelled out as its values.
    """

    def data(match: re.Match) -> str:
        value = getattr(namespace, match.group(1), None)
        if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
            return ", ".join(f"`{v}`" for v in value)
        return f"`{match.group(1)}`"

    text = re.sub(r":data:`~?([\w.]+)`", data, text)
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`")
    return text.replace("|", "\\|").replace("\n", " ")


def config_table(cls: type = CoMMITConfig) -> str:
    """A Markdown table of every field of ``cls``: setting, type, default, meaning."""
    meanings = docstring_attributes(cls)
    module = sys.modules.get(cls.__module__)
    rows = ["| setting | type | default | meaning |", "|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
        rows.append(
            f"| `{field.name}` | `{_cell(str(kind))}` | {_cell(_show(_default(field)))} "
            f"| {_cell(meanings.get(field.name, ''), module)} |"
        )
    return "\n".join(rows)


def render_doc(text: str, table: str) -> str:
    """``text`` with the block between :data:`BEGIN` and :data:`END` replaced by ``table``.

    Raises:
        ValueError: The markers are missing or out of order.
    """
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the doc has no '{BEGIN}' ... '{END}' block")
    return text[: start + len(BEGIN)] + "\n" + table + "\n" + text[end:]


def sync_doc(path: str | Path, check: bool = False) -> bool:
    """Rewrite the settings table of ``path`` (or only compare, with ``check``).

    Returns:
        True when the doc was already in sync.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    new = render_doc(text, config_table())
    if new != text and not check:
        path.write_text(new, encoding="utf-8")
    return new == text


def main(argv: list[str] | None = None) -> int:
    """Command line: rewrite (or ``--check``) the table in the given Markdown files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="Markdown files with the marker block")
    parser.add_argument("--check", action="store_true", help="only report stale files")
    ns = parser.parse_args(argv)
    stale = [p for p in ns.paths if not sync_doc(p, check=ns.check)]
    for p in stale:
        print(f"{p}: CoMMITConfig table {'is stale' if ns.check else 'updated'}")
    return 1 if stale and ns.check else 0


if __name__ == "__main__":
    sys.exit(main())
