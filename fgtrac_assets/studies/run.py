"""Evaluation studies run as assets of a pipeline: a study trains its own models and commits its table and plot.

A study is a plain function returning ``{"table": [row dicts], "plot_png": bytes, "best": str, ...}``
(``mislabel.mislabel_evaluation``, ``final_model.final_model_evaluation``). Running
one here commits the table (Parquet) and the plot (PNG) as artifacts with a signed tree head,
like every other materialisation, so a published figure can be traced to its exact bytes.
"""

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa

from ..errors import InputError
from ..ledger.artifacts import write_artifact
from ..ledger.store import Ledger
from ..report import plots
from ..pipelines.base import Pipeline
from ..pipelines.handles import Handle, StageResult
from ..pipelines.stages import Log, commit_stage, quiet, write_parquet


@dataclass(frozen=True)
class Study:
    """An evaluation asset: its name, what it shows, the function and its named settings."""

    name: str
    description: str
    run: Callable[..., dict]
    table_markdown: Callable[[list[dict]], str]
    presets: dict[str, dict] = field(default_factory=lambda: {"default": {}})
    headline: Callable[[dict], dict] = lambda result: {}


def run_study(ledger: Ledger, pipeline: Pipeline, run_id: str, study: Study, prepared: Handle | None = None,
              preset: str = "default", seed: int = 0, log: Log = quiet) -> StageResult:
    """Run a study with one of its presets and commit its table and plot, downstream of the samples it stands on."""
    if preset not in study.presets:
        raise InputError(f"{study.name}: unknown preset {preset!r} (choose from {', '.join(study.presets)})")
    kwargs = {**study.presets[preset], "seed": seed}
    log(f"{study.name}: running with {json.dumps(kwargs)}")
    started = time.monotonic()
    result = study.run(**kwargs)
    seconds = time.monotonic() - started
    table = pa.Table.from_pylist([{k: _cell(v) for k, v in row.items()} for row in result["table"]])
    base = f"{pipeline.name}/studies/{study.name}-{run_id}"
    arts = {"table": write_parquet(ledger, f"{base}.parquet", "study_table", table)}
    if result.get("plot_png"):
        png = result["plot_png"]
        arts["plot"] = write_artifact(ledger.ensure_home().root, f"artifacts/{base}.png", "study_plot",
                                      lambda p: p.write_bytes(png))
    best = result["best"]
    meta = {"study": study.description, "preset": preset, "settings": kwargs, "best": best,
            "seconds": round(seconds, 2), "table_md": study.table_markdown(result["table"]),
            **study.headline(result)}
    if result.get("plot_png"):
        meta["plot_md"] = plots.markdown_image(result["plot_png"], study.name)
    log(f"{study.name}: best {best} ({seconds:.1f}s)")
    return commit_stage(ledger, pipeline, study.name, run_id, {}, [prepared] if prepared else [], arts, meta)


def _cell(value):
    """Return a table cell Parquet can hold with one type per column (lists and dicts as JSON text)."""
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else value
