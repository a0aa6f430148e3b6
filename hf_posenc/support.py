"""The README's "Supported architectures x encodings" table, rendered from the code.

Every cell comes from a row of :data:`~hf_posenc.architectures.ARCHITECTURES` and the rules that
conversion applies (native RoPE, refusals, causal-only encodings), so the table cannot promise what
:func:`hf_posenc.convert` refuses. A column is a ``(header, cell function)`` pair: another column (for
example the task heads of an architecture) is one more entry in :data:`COLUMNS`.

Regenerate the README section with ``python -m hf_posenc.support README.md``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

from . import registry
from .architectures import ARCHITECTURES, Architecture

BEGIN = "<!-- architectures: begin -->"
END = "<!-- architectures: end -->"


def _name(row: Architecture) -> str:
    label = row.name or row.model_type
    label += " (image encoder)" if row.patch_grid else " (encoder)" if row.causal is not True else ""
    return f"{label}: {row.notes}" if row.notes else label


def _own(row: Architecture) -> str:
    if row.rope == "none":
        return "learned absolute" if row.absolute else "none"
    own = "partial RoPE" if row.rope == "native_partial" else "RoPE"
    own += " (interleaved)" if row.rope_layout == "interleaved" else ""
    own += f", ALiBi where `{row.native_alibi.config_flag}` says" if row.native_alibi else ""
    return own + (f", NoPE where `{row.nope_layers[0]}` says" if row.nope_layers else "")


def _always_refused(row: Architecture, kind: str) -> bool:
    return any(r.refuses(kind) and not r.when for r in row.refusals)


def _rope(row: Architecture) -> str:
    if _always_refused(row, "rope"):
        return "✗"
    if row.rope == "none":
        return "plug-in"
    cell = "native (partial)" if row.rope == "native_partial" else "native"
    if row.rope_types is not None:
        cell += f" for {', '.join(row.rope_types)}; plug-in otherwise"
    return cell


def _kind(kind: str) -> Callable[[Architecture], str]:
    def cell(row: Architecture) -> str:
        if _always_refused(row, kind):
            return "✗"
        if registry.get(kind).capabilities.patch_grid and not row.patch_grid:
            return "✗ no patch grid"
        if registry.get(kind).capabilities.extends_rope and row.rope == "none":
            return "✗ no RoPE"
        if row.causal is not True:
            # Encoders (and BERT-like models whose config may make them decoders).
            entry = registry.get(kind)
            if entry.capabilities.causal_only:
                return "✗ causal-only"
            return f"✓ {entry.encoder_note}" if entry.encoder_note else "✓"
        conditional = [r.when for r in row.refusals if r.refuses(kind) and r.when]
        return "✓" + "".join(f" (✗ with `{when}`)" for when in conditional)

    return cell


#: The table's columns, in order: (header, cell of one architecture row).
COLUMNS: list[tuple[str, Callable[[Architecture], str]]] = [
    ("architecture", _name),
    ("own encoding", _own),
    *[(kind, _kind(kind) if kind != "rope" else _rope) for kind in registry.kinds()],
]


def support_table(columns=None) -> str:
    """The Markdown table, one line per architecture in the order of ``ARCHITECTURES``."""
    columns = COLUMNS if columns is None else columns
    lines = ["| " + " | ".join(header for header, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in ARCHITECTURES.values():
        lines.append("| " + " | ".join(cell(row) for _, cell in columns) + " |")
    return "\n".join(lines)


def replace_section(text: str, table: str | None = None) -> str:
    """``text`` with the part between :data:`BEGIN` and :data:`END` replaced by the table.

    Raises:
        ValueError: The markers are missing.
    """
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"No {BEGIN} ... {END} section found.")
    table = support_table() if table is None else table
    return pattern.sub(lambda _: f"{BEGIN}\n{table}\n{END}", text)


if __name__ == "__main__":  # python -m hf_posenc.support README.md
    path = Path(sys.argv[1])
    path.write_text(replace_section(path.read_text()))
