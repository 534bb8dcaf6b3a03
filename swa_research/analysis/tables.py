"""Markdown tables of the reports, and the ensembles and soups a sweep's report shows (the
final rows of ``python -m swa_research.ensemble``'s ensemble.csv)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path


def md_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def read_combined(root: Path) -> list[dict[str, str]]:
    """The final ensemble, uniform soup and greedy soup of each kind in ``root/ensemble.csv``
    (python -m swa_research.ensemble); empty when there is none or it cannot be read."""
    try:
        with open(root / "ensemble.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error):
        return []
    out = []
    for kind in dict.fromkeys(r.get("kind", "") for r in rows):
        of = [r for r in rows if r.get("kind") == kind]
        for combination in ("ensemble", "uniform_soup", "greedy_soup"):
            chosen = [r for r in of if r.get("combination") == combination
                      and r.get("accepted") in ("", "1", None)]
            if chosen:
                out.append(chosen[-1])
    return out


def format_combined(rows: Sequence[dict[str, str]]) -> str:
    def pct(v: str | None) -> str:
        return "-" if not v else f"{100 * float(v):.2f}"

    return md_table(["weights", "combination", "members", "test acc %", "test NLL",
                      "test ECE %"],
                     [[r["kind"].upper(), r["combination"].replace("_", " "), r["members"],
                       pct(r.get("test_acc")), "-" if not r.get("test_nll") else
                       f"{float(r['test_nll']):.4f}", pct(r.get("test_ece"))] for r in rows])
