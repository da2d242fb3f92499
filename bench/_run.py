"""Shared helper of the scripts in bench/: run ``posemb bench`` for some sections."""
from __future__ import annotations

import sys

from posemb.cli import main


def run_sections(sections: str, argv: list[str] | None = None) -> int:
    """``posemb bench --sections SECTIONS`` plus the script's own arguments (``--quick``,
    ``--threads``, ``--repeats``, ``--output``)."""
    return main(["bench", "--sections", sections, *(sys.argv[1:] if argv is None else argv)])
