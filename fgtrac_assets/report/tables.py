"""Markdown tables for asset metadata (rendered by Dagster's metadata view)."""

from collections.abc import Sequence

Scored = Sequence[tuple[str, float]]


def _cell(text) -> str:
    """Return text safe inside a markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def proponents_opponents_md(described: dict[str, dict[str, str]], tests: Sequence[tuple[str, Scored, Scored]]) -> str:
    """Return a markdown table: each test sample, then its proponents and opponents, described and scored.

    ``described`` maps a sample id to its columns (``Pipeline.describe_samples``); ``tests``
    holds (test id, [(proponent id, score)], [(opponent id, score)]).
    """
    columns = list(dict.fromkeys(c for d in described.values() for c in d))
    head = ["test sample", "kind", "rank", "sample", *columns, "TracInCP score"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def line(test: str, kind: str, rank, sid: str, score: str) -> None:
        d = described.get(sid, {})
        cells = [f"`{test[:12]}`", kind, rank, f"`{sid[:12]}`", *(_cell(d.get(c, "")) for c in columns), score]
        lines.append("| " + " | ".join(map(str, cells)) + " |")

    for test, proponents, opponents in tests:
        line(test, "**test**", "", test, "")
        for kind, scored in (("proponent", proponents), ("opponent", opponents)):
            for rank, (sid, score) in enumerate(scored, 1):
                line(test, kind, rank, sid, f"{score:+.4g}")
    return "\n".join(lines)
