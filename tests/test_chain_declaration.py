"""The chain is declared once (pipelines/chain.py): the Dagster assets and `fgtrac run` both follow that list."""

import io

from fgtrac_assets.definitions import all_assets
from fgtrac_assets.pipelines import chain
from fgtrac_assets.pipelines.registry import PIPELINES


def test_each_pipelines_assets_are_the_declared_chain_with_its_upstream_and_checks():
    for pipeline, _ in PIPELINES:
        by_name = {a.key.path[-1]: a for a in all_assets if a.key.path[0] == pipeline.name}
        for stage in chain.CHAIN + chain.SHARDED:
            a = by_name[stage.name]
            assert {k.path[-1] for k in a.dependency_keys} == set(stage.upstream), stage.name
            assert {c.name for c in a.check_specs} == set(stage.check_names()), stage.name


def test_fgtrac_run_follows_the_declaration(tmp_path, monkeypatch):
    """A stage added to the declaration runs in `fgtrac run` without touching cli_run."""
    from fgtrac_assets.cli_run import Progress, run_pipeline
    from fgtrac_assets.ledger import Ledger

    seen = []
    original = chain.CHAIN

    def spy(stage):
        def run(*args, **kwargs):
            seen.append(stage.name)
            return stage.run(*args, **kwargs)
        return chain.Stage(stage.name, run, stage.upstream, stage.settings, stage.description, stage.row_count,
                           stage.checks)

    monkeypatch.setattr(chain, "CHAIN", tuple(spy(s) for s in original[:3]))
    pipeline, defaults = PIPELINES[0]
    roots = run_pipeline(Ledger(tmp_path / "h"), pipeline, defaults, 120, 1, Progress(io.StringIO()))
    assert seen == list(roots) == [s.name for s in original[:3]]
