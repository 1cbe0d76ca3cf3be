"""The layering of DESIGN.md, checked on every module's imports (module level and inside functions)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fgtrac_assets"

#: per layer, the project packages it may import (besides itself and errors.py), and third-party roots it must not
RULES = {
    "integrity": ({"errors"}, {"dagster", "torch", "duckdb", "pyarrow"}),
    "attribution": (set(), {"dagster", "duckdb", "pyarrow"}),
    "tracing": ({"integrity"}, {"dagster", "duckdb"}),
    "ledger": ({"integrity", "config", "tracing.ids", "witness"}, {"dagster", "torch"}),
    "witness": ({"integrity", "config"}, {"dagster", "torch"}),
    "session": ({"integrity", "ledger", "tracing", "attribution", "config", "cli"}, {"dagster"}),
    "integrations": ({"session", "tracing", "ledger"}, {"dagster"}),
}


def imports(path: Path) -> list[tuple[str, int]]:
    """Return (imported module, line) for every import in a file, relative ones resolved within fgtrac_assets."""
    here = path.relative_to(PACKAGE.parent).with_suffix("").parts
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[:len(here) - node.level])
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
                out += [(n, node.lineno) for n in names]
            else:
                out.append((node.module, node.lineno))
    return out


def modules_of(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(RULES))
def test_a_layer_imports_only_what_it_may(layer):
    allowed, forbidden = RULES[layer]
    problems = []
    for path in modules_of(layer):
        for name, line in imports(path):
            root = name.split(".")[0]
            if root in forbidden:
                problems.append(f"{path.relative_to(PACKAGE)}:{line} imports {name}")
            if root == "fgtrac_assets":
                inner = name.split(".", 1)[1] if "." in name else ""
                ok = inner.split(".")[0] in (layer, "errors") or any(
                    inner == a or inner.startswith(a + ".") for a in allowed)
                if not ok:
                    problems.append(f"{path.relative_to(PACKAGE)}:{line} imports {name}")
    assert problems == []


def test_the_rules_see_relative_imports():
    found = dict(imports(PACKAGE / "session" / "run.py"))
    assert "fgtrac_assets.ledger.store" in found and "fgtrac_assets.tracing.steps" in found
