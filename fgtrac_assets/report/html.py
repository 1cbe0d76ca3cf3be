"""`fgtrac report`: a static HTML audit report of the ledger, pictures included."""

import html
from pathlib import Path

from ..attribution.methods import DEFAULT_METHOD, METHODS
from ..errors import StorageError
from ..ledger.audit import ABOUT_SQL, describe_about
from ..ledger.store import Ledger
from ..ledger.verify import verify_ledger
from . import plots


def _table(cols: list[str], rows: list[tuple]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else str(v)


def _img(png: bytes, alt: str) -> str:
    return plots.markdown_image(png, alt).replace("![", '<img alt="', 1).replace("](", '" src="', 1)[:-1] + '">'


def build_report(ledger: Ledger) -> str:
    """Return the report's HTML: integrity, counts, and per pipeline its latest model version with pictures."""
    report = verify_ledger(ledger, update_witness=False)
    parts = [f"<h1>fgtrac audit report</h1><p>FGTRAC_HOME: {html.escape(str(ledger.home.root))}</p>"]
    status = "OK" if report.ok else f"{len(report.findings)} finding(s)"
    parts.append(f"<h2>Integrity: {status}</h2><p>{report.leaves} leaves, {report.tree_heads} signed tree heads, "
                 f"{report.artifacts} artifacts checked.</p>")
    if report.findings:
        parts.append("<ul>" + "".join(f"<li>{html.escape(f.line())}</li>" for f in report.findings[:100]) + "</ul>")
    head = ledger.latest_tree_head()
    if head:
        parts.append(f"<h3>Latest signed tree head</h3><pre>{html.escape(head['note'])}</pre>")
    with ledger.reader() as con:
        counts = con.execute("SELECT pipeline, kind, count(*) FROM events GROUP BY ALL ORDER BY ALL").fetchall()
        parts.append("<h2>Lifecycle events</h2>" + _table(["pipeline", "kind", "events"], counts))
        runs = con.execute("SELECT pipeline, training_run, size, root FROM training_sets "
                           "QUALIFY row_number() OVER (PARTITION BY pipeline ORDER BY leaf_index DESC) = 1").fetchall()
        for pipeline, run, size, root in runs:
            parts.append(f"<h2>{html.escape(pipeline)}: model version {html.escape(run)}</h2>"
                         f"<p>Trained on {size} samples; committed training-set root <code>{root}</code>.</p>")
            ck = con.execute("SELECT epoch, train_loss, val_loss, selected, lr FROM checkpoint_summary "
                             "WHERE training_run = ? ORDER BY epoch", [run]).fetchall()
            if ck:
                png = plots.loss_curve([(e, t, v) for e, t, v, _, _ in ck], [e for e, _, _, s, _ in ck if s])
                parts.append(_img(png, "loss per epoch") + _table(["epoch", "train loss", "val loss", "selected", "lr"], ck))
            parts.extend(_influence_sections(con, run))
    style = ("<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}pre{background:#f4f4f4;"
             "padding:8px}</style>")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>fgtrac report</title>{style}</head><body>" + \
        "\n".join(parts) + "</body></html>"


def _influence_sections(con, run: str) -> list[str]:
    """Return the HTML of a training run's latest scoring by each influence method: self-influence, top-k."""
    out = []
    scorings = con.execute("SELECT method, run_id FROM influence WHERE training_run = ? "
                           "QUALIFY row_number() OVER (PARTITION BY method ORDER BY leaf_index DESC) = 1 "
                           "ORDER BY method <> ?, method", [run, DEFAULT_METHOD]).fetchall()
    for name, scoring in scorings:
        known = METHODS.get(name)
        out.append(f"<h3>Influence by {html.escape(name)}</h3><p>{html.escape(known.description if known else name)}"
                   f", scored by <code>{html.escape(scoring)}</code>.</p>")
        selfinf = [r[0] for r in con.execute("SELECT score FROM influence WHERE training_run = ? AND run_id = ? "
                                             "AND kind = 'self'", [run, scoring]).fetchall()]
        if selfinf:
            out.append("<h4>Self-influence</h4>" + _img(plots.histogram(selfinf, "self-influence", f"{name}(z, z)"),
                                                       "self-influence distribution"))
            top = con.execute("WITH top AS (SELECT rank, train_sample_id, score FROM influence "
                              "WHERE training_run = ? AND run_id = ? AND kind = 'self' ORDER BY rank LIMIT 15) "
                              "SELECT t.rank, t.train_sample_id, t.score, s.label, s.source, a.about FROM top t "
                              "LEFT JOIN (SELECT DISTINCT ON (sample_id) * FROM samples) s "
                              "ON s.sample_id = t.train_sample_id "
                              f"LEFT JOIN ({ABOUT_SQL.format(ids='SELECT train_sample_id FROM top')}) a "
                              "ON a.sample_id = t.train_sample_id ORDER BY t.rank", [run, scoring]).fetchall()
            out.append("<p>Highest self-influence (candidates for mislabelled or unusual samples):</p>"
                       + _table(["rank", "sample", "self-influence", "label", "source", "about"],
                                [(*r[:-1], describe_about(r[-1])) for r in top]))
        tests = con.execute("WITH top AS (SELECT test_sample_id, kind, rank, train_sample_id, score "
                            "FROM influence WHERE training_run = ? AND run_id = ? AND kind <> 'self' AND rank <= 5 "
                            "AND test_sample_id IN (SELECT DISTINCT test_sample_id FROM influence_top "
                            "WHERE training_run = ? ORDER BY 1 LIMIT 3)) "
                            "SELECT t.*, a.about, b.about FROM top t "
                            f"LEFT JOIN ({ABOUT_SQL.format(ids='SELECT test_sample_id FROM top')}) a "
                            "ON a.sample_id = t.test_sample_id "
                            f"LEFT JOIN ({ABOUT_SQL.format(ids='SELECT train_sample_id FROM top')}) b "
                            "ON b.sample_id = t.train_sample_id ORDER BY 1, 2 DESC, 3", [run, scoring, run]).fetchall()
        if tests:
            out.append("<h4>Proponents and opponents of a few test samples</h4>"
                       + _table(["test sample", "kind", "rank", "train sample", "score", "about the test sample",
                                 "about the train sample"],
                                [(*r[:5], describe_about(r[5]), describe_about(r[6])) for r in tests]))
    return out


def write_report(ledger: Ledger, out_dir: Path) -> Path:
    """Write index.html of the report into out_dir and return its path."""
    text = build_report(ledger)
    path = out_dir / "index.html"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise StorageError(f"{path}: cannot write the report ({exc.strerror or exc})") from None
    return path
