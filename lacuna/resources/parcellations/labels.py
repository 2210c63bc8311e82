"""Labels files of parcellations: region ids and names from four formats.

One name per line (ids 1..N); ``id name`` lines; a TSV with ``index`` and ``name``
columns (TemplateFlow ``_dseg.tsv``); a Connectome Workbench label table (a name line,
then an ``id r g b a`` line, as published with the Tian atlases). Blank lines are
ignored, label 0 (background) is dropped.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

from lacuna.core.errors import ParcellationError

log = logging.getLogger(__name__)

_ID_NAME_LINE = re.compile(r"^\s*(\d+)\s+(\S.*?)\s*$")
_WORKBENCH_KEY_LINE = re.compile(r"^\s*(\d+)(\s+\d+){3,4}\s*$")
_MAX_LISTED = 10


def read_labels(path: str | Path) -> tuple[list[int], list[str]]:
    """Region ids and names from a labels file (formats in the module docs).

    Raises
    ------
    ParcellationError
        If the file cannot be read, is empty, or has malformed or duplicate entries.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ParcellationError(
            f"cannot read the labels file {path}: {exc}. Give a UTF-8 text file with one "
            "region name per line, 'id name' lines, or a TSV with index and name columns."
        ) from exc
    lines = [(number, line.rstrip()) for number, line in enumerate(text.splitlines(), 1)]
    lines = [(number, line) for number, line in lines if line.strip()]
    if not lines:
        raise ParcellationError(
            f"the labels file {path} is empty; list one region name per line (in label "
            "order 1..N) or give 'id name' lines."
        )
    header = [cell.strip().lower() for cell in lines[0][1].split("\t")]
    if "index" in header and "name" in header:
        pairs = _parse_tsv(path, header, lines[1:])
    elif _is_workbench_table(lines):
        pairs = [
            (int(lines[i + 1][1].split()[0]), lines[i][1].strip())
            for i in range(0, len(lines), 2)
        ]
    elif all(_ID_NAME_LINE.match(line) for _, line in lines):
        pairs = [_id_name(line) for _, line in lines]
    else:
        pairs = [(i, line.strip()) for i, (_, line) in enumerate(lines, 1)]
    return _checked_pairs(path, pairs)


def _parse_tsv(path: Path, header: list[str], rows: list[tuple[int, str]]) -> list:
    index_col, name_col = header.index("index"), header.index("name")
    pairs = []
    for number, line in rows:
        cells = line.split("\t")
        try:
            pairs.append((int(cells[index_col].strip()), cells[name_col].strip()))
        except (IndexError, ValueError) as exc:
            raise ParcellationError(
                f"{path}, line {number}: expected an integer 'index' and a 'name' column "
                f"separated by tabs, got {line!r}. Fix the line or remove it."
            ) from exc
    return pairs


def _is_workbench_table(lines: list[tuple[int, str]]) -> bool:
    """Whether lines alternate ``name`` and ``id r g b [a]`` (Workbench label table)."""
    if len(lines) % 2:
        return False
    names, keys = lines[0::2], lines[1::2]
    return all(_WORKBENCH_KEY_LINE.match(line) for _, line in keys) and not any(
        _WORKBENCH_KEY_LINE.match(line) for _, line in names
    )


def _id_name(line: str) -> tuple[int, str]:
    match = _ID_NAME_LINE.match(line)
    return int(match.group(1)), match.group(2)


def _checked_pairs(path: Path, pairs: list[tuple[int, str]]) -> tuple[list[int], list[str]]:
    """Drop the background (id 0), reject duplicates and empty tables, sort by id."""
    if any(region_id == 0 for region_id, _ in pairs):
        log.debug("%s: ignoring label 0 (background)", path)
        pairs = [(region_id, name) for region_id, name in pairs if region_id != 0]
    counts = Counter(region_id for region_id, _ in pairs)
    duplicates = sorted(region_id for region_id, n in counts.items() if n > 1)
    if duplicates:
        raise ParcellationError(
            f"the labels file {path} lists region ids {short_list(duplicates)} more than "
            "once; give every region exactly one line."
        )
    if not pairs:
        raise ParcellationError(f"the labels file {path} names no region (only background).")
    names = [name for _, name in pairs]
    if len(set(names)) < len(names):
        log.warning("%s: some region names occur more than once", path)
    pairs.sort()
    return [region_id for region_id, _ in pairs], [name for _, name in pairs]


def short_list(values: list) -> str:
    shown = ", ".join(str(v) for v in values[:_MAX_LISTED])
    extra = len(values) - _MAX_LISTED
    return f"{shown} (and {extra} more)" if extra > 0 else shown
