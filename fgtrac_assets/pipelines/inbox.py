"""The inbox: files dropped under FGTRAC_HOME/inbox/<pipeline>/, identified by content."""

from pathlib import Path

from ..ledger.artifacts import sha256_file
from .tables import name_text


def scan_inbox(root: Path, known: dict[str, list] | None = None) -> dict[str, list]:
    """Return {relative path: [size, mtime_ns, sha256]} for regular files under root (no links, nothing hidden).

    Entries of `known` whose size and mtime are unchanged are reused instead of hashing the file again.
    A path that is not UTF-8 is keyed with its bytes escaped (\\xNN); a file that vanishes or cannot be
    read while scanning is left out (ingestion reports it).
    """
    known = known or {}
    out: dict[str, list] = {}
    if not root.is_dir():
        return out
    base = root.resolve()
    for path in sorted(root.rglob("*")):
        rel = name_text(path.relative_to(root).as_posix())
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        if path.is_symlink() or not path.is_file() or not path.resolve().is_relative_to(base):
            continue  # a link could point outside the inbox: never follow it
        try:
            st = path.stat()
            prev = known.get(rel)
            if prev and prev[0] == st.st_size and prev[1] == st.st_mtime_ns:
                out[rel] = prev
                continue
            out[rel] = [st.st_size, st.st_mtime_ns, sha256_file(path)]
        except OSError:
            continue
    return out


def new_content(files: dict[str, list], seen: set[str]) -> list[str]:
    """Return the sorted content hashes among files that have not been seen before."""
    return sorted({v[2] for v in files.values()} - seen)
