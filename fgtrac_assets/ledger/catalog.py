"""The ledger's schema objects as the code defines them: installed on every read, compared by verify.

Views and macros are stored in the DuckDB file, so anyone who can write the file can
redefine them (``CREATE OR REPLACE VIEW influence_top AS ...``) and make an audit lie.
Two defences, both from the code's DDL in schema.py:

* every read-only connection creates the code's views and macros as TEMP objects, which
  DuckDB resolves before the file's own (the temp catalog comes first on the search path),
  so audits, checks and user SQL always read the code's definitions;
* ``verify`` compares every object in the file (schemas, tables with their columns and
  constraints, views, macros, indexes, sequences, types) with a reference catalog built
  from the same DDL in memory: a changed or missing object is a finding naming it, and so
  is an object the code does not define.
"""

import functools
import re

import duckdb

from .schema import all_ddl, view_ddl

_TEMP = [(re.compile(r"^\s*CREATE OR REPLACE VIEW", re.I), "CREATE OR REPLACE TEMP VIEW"),
         (re.compile(r"^\s*CREATE OR REPLACE MACRO", re.I), "CREATE OR REPLACE TEMP MACRO")]

#: the file's catalog, one query per kind of object: (kind, name, definition) rows
_OBJECTS = {
    "schema": "SELECT schema_name, '' FROM duckdb_schemas() WHERE database_name = current_database() AND NOT internal",
    "table": "SELECT schema_name || '.' || table_name, sql FROM duckdb_tables() "
             "WHERE database_name = current_database() AND NOT temporary",
    "view": "SELECT schema_name || '.' || view_name, sql FROM duckdb_views() "
            "WHERE database_name = current_database() AND NOT internal AND NOT temporary",
    "macro": "SELECT schema_name || '.' || function_name, function_type || '(' || array_to_string(parameters, ', ') "
             "|| ') ' || coalesce(macro_definition, '') FROM duckdb_functions() "
             "WHERE database_name = current_database() AND function_type IN ('macro', 'table_macro') AND NOT internal",
    "index": "SELECT schema_name || '.' || index_name, sql FROM duckdb_indexes() WHERE database_name = current_database()",
    "sequence": "SELECT schema_name || '.' || sequence_name, sql FROM duckdb_sequences() "
                "WHERE database_name = current_database() AND NOT temporary",
    "type": "SELECT schema_name || '.' || type_name, logical_type FROM duckdb_types() "
            "WHERE database_name = current_database() AND NOT internal",
}


def temp_definitions() -> list[str]:
    """Return the code's views and macros as TEMP statements (they shadow whatever the file stores)."""
    out = []
    for ddl in view_ddl():
        for pattern, temp in _TEMP:
            ddl = pattern.sub(temp, ddl, count=1)
        out.append(ddl)
    return out


def install_code_definitions(con: duckdb.DuckDBPyConnection) -> None:
    """Create the code's views and macros as TEMP objects on this connection, so reads never use the file's."""
    for ddl in temp_definitions():
        try:
            con.execute(ddl)
        except (duckdb.CatalogException, duckdb.BinderException):
            pass  # a table or column it reads is missing (an empty, old or damaged file): verify names it


def schema_objects(con: duckdb.DuckDBPyConnection) -> dict[tuple[str, str], str]:
    """Return every user-defined object of the connection's database as {(kind, schema.name): definition}."""
    out: dict[tuple[str, str], str] = {}
    for kind, sql in _OBJECTS.items():
        for name, definition in con.execute(sql).fetchall():
            out[(kind, name)] = definition or ""
    return out


@functools.cache
def reference_objects() -> dict[tuple[str, str], str]:
    """Return the objects the code's DDL defines, from an in-memory database built with it."""
    con = duckdb.connect(":memory:")
    try:
        for ddl in all_ddl():
            con.execute(ddl)
        con.execute("CREATE TABLE fgtrac_schema AS SELECT ''::VARCHAR AS digest")
        return schema_objects(con)
    finally:
        con.close()


def is_legacy_layout(objects: dict[tuple[str, str], str]) -> bool:
    """Return whether the file is in the layout written before event groups (a plain `events` table)."""
    return ("table", "main.events") in objects and ("table", "main.group_members") not in objects


#: tables added since ledgers were first written: a file from an older fgtrac lacks them until its next write
LATER_TABLES = {("table", "main.log_keys"), ("table", "main.cosignatures")}


def schema_differences(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
    """Return (object, what differs) for every object of the file that is not exactly the code's."""
    found, expected = schema_objects(con), dict(reference_objects())
    for key in LATER_TABLES - found.keys():
        expected.pop(key)
    if is_legacy_layout(found):  # its tables and indexes are the old ones until fgtrac next writes to it
        expected = {k: v for k, v in expected.items() if k[0] not in ("table", "index") and k != ("view", "main.events")}
        found = {k: v for k, v in found.items() if k[0] not in ("table", "index")}
    out = []
    for key in sorted(expected.keys() | found.keys()):
        kind, name = key
        label = f"{kind} {name.removeprefix('main.')}"
        if key not in found:
            out.append((label, "missing: the code defines it but the file does not have it"))
        elif key not in expected:
            out.append((label, "not defined by fgtrac: an object added to the ledger file outside fgtrac"))
        elif found[key] != expected[key]:
            out.append((label, "differs from the code's definition (redefined outside fgtrac)"))
    return out


def damaged_tables(differences: list[tuple[str, str]]) -> list[str]:
    """Return the differences that make the ledger's tables unreadable as fgtrac's (missing or changed tables)."""
    return [label for label, what in differences if label.startswith("table ") and "not defined" not in what]
