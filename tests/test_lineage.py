"""The lineage recorded in the ledger has exactly the edges of the Dagster asset graph."""

from fgtrac_assets.definitions import defs
from fgtrac_assets.ledger.store import Ledger
from fgtrac_assets.pipelines.chain import CHAIN_NAMES
from fgtrac_assets.studies.catalog import STUDIES


def dagster_edges(group: str, assets=None) -> set[tuple[str, str]]:
    """Return the (upstream, asset) edges of a group's asset graph (only into these assets, if given)."""
    graph = defs.resolve_asset_graph()
    edges = set()
    for key in graph.get_all_asset_keys():
        if graph.get(key).group_name != group:  # the chain and its studies; the sharded path is its own group
            continue
        if assets is not None and key.path[-1] not in assets:
            continue
        for parent in graph.get(key).parent_keys:
            edges.add((parent.path[-1], key.path[-1]))
    return edges


def test_every_study_is_connected_to_the_chain_in_the_asset_graph():
    """No island in the UI: each study asset stands on its pipeline's preprocessed samples."""
    for pipeline, studies in STUDIES.items():
        edges = dagster_edges(pipeline, {s.name for s in studies})
        assert edges == {("preprocessed_samples", s.name) for s in studies}


def test_ledger_lineage_equals_asset_graph(digits_home):
    recorded = {(r["upstream_asset"], r["asset"]) for r in
                Ledger(digits_home).query("SELECT upstream_asset, asset FROM asset_lineage WHERE pipeline='digits_cnn'").to_pylist()}
    expected = dagster_edges("digits_cnn", CHAIN_NAMES)  # the fixture materialises the chain, not the studies
    assert expected, "the asset graph has edges"
    assert recorded == expected


def test_plain_python_run_records_the_same_lineage(tmp_path, capsys):
    """`fgtrac run` drives the same stages without Dagster: same edges, and everything verifies."""
    from fgtrac_assets.cli import main as fgtrac

    assert fgtrac(["--home", str(tmp_path), "run", "digits_cnn", "--limit", "150", "--epochs", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("OK")
    recorded = {(r["upstream_asset"], r["asset"]) for r in
                Ledger(tmp_path).query("SELECT upstream_asset, asset FROM asset_lineage").to_pylist()}
    assert recorded == dagster_edges("digits_cnn", CHAIN_NAMES)
