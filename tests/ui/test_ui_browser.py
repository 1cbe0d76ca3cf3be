"""The Dagster UI in a real browser: `dagster dev` on 127.0.0.1, the digits chain materialised, headless Chromium.

One module-scoped server (its own process group, always stopped by id in teardown) serves every test here.
Screenshots go to <repo>/.ui-screenshots/ (git-ignored) and to pytest's tmp dir.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    from . import ui_helpers as h
except ImportError:
    import ui_helpers as h

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = h.find_chromium()
GROUP, LOCATION = "digits_cnn", "fgtrac"


def _group_assets(group: str) -> tuple[str, ...]:
    """Return the names of every asset in a Dagster group (the chain and the pipeline's studies)."""
    from fgtrac_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    return tuple(sorted(k.path[-1] for k in graph.get_all_asset_keys() if graph.get(k).group_name == group))


ASSETS = _group_assets(GROUP)
CHECK_NAMES = {"tree_head_verifies", "lineage_complete", "numbers_sane"}
STATUSES = {"Succeeded", "Failed", "Skipped", "Errored", "Execution failed", "Not evaluated", "In progress", "Warning"}
JOB_CONFIG = """\
ops:
  digits_cnn__raw_samples: {config: {limit: 300}}
  digits_cnn__training_checkpoints: {config: {epochs: 2}}
loggers:
  console: {config: {log_level: INFO}}
"""
NUX_TEXT = "Join the Dagster community"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` binary on PATH (`make test` installs it when run as root on Debian)"),
]


def _bin(name: str) -> Path:
    """The venv's console script: next to this interpreter, else <repo>/.venv/bin."""
    here = Path(sys.executable).parent / name
    return here if here.exists() else REPO / ".venv" / "bin" / name


class UI:
    """What the tests share: the server's URL, the run, and where screenshots go."""

    def __init__(self, base_url: str, run_id: str, shot_dirs: list[Path], work: Path):
        self.base_url, self.run_id, self.shot_dirs, self.work = base_url, run_id, shot_dirs, work

    def url(self, route: str) -> str:
        return f"{self.base_url}/{route.lstrip('/')}"

    def gql(self, query: str, variables: dict | None = None) -> dict:
        return h.graphql(self.base_url, query, variables)

    def snapshot(self, route: str, shot: str | None = None) -> str:
        """Return the rendered DOM of a route; with shot, also save a screenshot under that name."""
        png = self.work / f"{shot}.png" if shot else None
        dom = h.chromium_snapshot(CHROMIUM, self.url(route), png=png)
        assert NUX_TEXT not in dom, f"the community modal covers {route}"
        if png is not None:
            self.keep(png)
        return dom

    def keep(self, png: Path) -> None:
        """Copy a screenshot into every screenshot folder, checking it is a real, non-trivial PNG."""
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"
        assert len(data) > 20_000, f"{png} is only {len(data)} bytes: a blank page?"
        for d in self.shot_dirs:
            if d != png.parent:
                shutil.copyfile(png, d / png.name)


LATEST = """query Latest($keys: [AssetKeyInput!]) {
  assetNodes(assetKeys: $keys) {
    assetKey { path }
    assetMaterializations(limit: 1) {
      runId
      metadataEntries { label __typename
        ... on TextMetadataEntry { text } ... on IntMetadataEntry { intValue } }
    }
    assetChecksOrError { __typename ... on AssetChecks { checks {
      name executionForLatestMaterialization { runId status evaluation { success } } } } }
  }
}"""


def _keys(*names: str) -> dict:
    return {"keys": [{"path": [GROUP, n]} for n in names]}


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    work = tmp_path_factory.mktemp("ui")
    fgtrac_home, dagster_home = work / "fgtrac-home", work / "dagster-home"
    dagster_home.mkdir()
    shutil.copyfile(REPO / "dagster.yaml", dagster_home / "dagster.yaml")
    shots = REPO / ".ui-screenshots"
    shots.mkdir(exist_ok=True)
    env = {**os.environ, "FGTRAC_HOME": str(fgtrac_home), "DAGSTER_HOME": str(dagster_home)}
    server = h.DagsterDev(_bin("dagster"), REPO, env, h.free_port(), work / "dagster-dev.log")
    t0 = time.monotonic()
    server.start()
    try:
        server.wait_up(timeout=90)  # the instance's storage exists before the job writes to it
        config = work / "config.yaml"
        config.write_text(JOB_CONFIG)
        job = subprocess.run([str(_bin("dagster")), "job", "execute", "-m", "fgtrac_assets.definitions",
                              "-j", "digits_cnn_job", "-c", str(config)],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert job.returncode == 0, f"digits_cnn_job failed:\n{job.stdout[-3000:]}\n{job.stderr[-3000:]}"

        found = re.search(r"digits_cnn_job - ([0-9a-f]{8}-[0-9a-f-]{27}) - ", job.stdout + job.stderr)
        assert found, f"no run id in the job's output:\n{job.stderr[-2000:]}"
        run_id = found.group(1)

        def loaded():
            data = h.graphql(server.base_url, """query Ready($ids: [String!]) { workspaceOrError { ... on Workspace {
                locationEntries { name loadStatus } } }
              runsOrError(filter: {runIds: $ids}) { ... on Runs { results { runId status } } } }""",
                             {"ids": [run_id]})
            entries = {e["name"]: e["loadStatus"] for e in data["workspaceOrError"]["locationEntries"]}
            runs = data["runsOrError"]["results"]
            return entries.get(LOCATION) == "LOADED" and len(runs) == 1 and runs[0]
        run = h.wait_until(loaded, 90, f"code location {LOCATION} loaded and run {run_id} recorded")
        assert run["status"] == "SUCCESS", run
        assert h.graphql(server.base_url, "mutation { setNuxSeen }")["setNuxSeen"] is True
        assert h.graphql(server.base_url, "{ shouldShowNux }")["shouldShowNux"] is False
        print(f"\nUI ready at {server.base_url} after {time.monotonic() - t0:.1f}s (run {run['runId']})")
        yield UI(server.base_url, run["runId"], [shots, work], work)
    finally:
        server.stop()
        assert server.proc.poll() is not None, "dagster dev survived SIGKILL"


def test_asset_graph_lists_every_asset_of_the_group(ui):
    """The group's lineage graph has a node per asset (labels may be elided), the group's list names them all."""
    dom = ui.snapshot(f"locations/{LOCATION}/asset-groups/{GROUP}", shot="asset-graph")
    labels = re.findall(r'class="AssetNode_assetName[^"]*"[^>]*>([^<]+)<', dom)
    assert len(labels) == len(ASSETS), labels

    def shows(label: str, name: str) -> bool:  # the graph elides long names as "preproces…_samples"
        if "…" not in label:
            return label == name
        head, tail = label.split("…", 1)
        return name.startswith(head) and name.endswith(tail)
    for name in ASSETS:
        assert sum(shows(label, name) for label in labels) == 1, (name, labels)

    lines = h.dom_lines(ui.snapshot(f"locations/{LOCATION}/asset-groups/{GROUP}/list", shot="asset-list"))
    for name in ASSETS:
        at = lines.index(f"{GROUP} / {name}")
        assert "Materialized" in lines[at:at + 8], (name, lines[at:at + 8])


def test_asset_page_shows_root_and_row_count(ui):
    """training_checkpoints' page renders its status, the ledger root and row count the run recorded."""
    node = ui.gql(LATEST, _keys("training_checkpoints"))["assetNodes"][0]
    mat = node["assetMaterializations"][0]
    assert mat["runId"] == ui.run_id
    recorded = {e["label"]: e.get("text", e.get("intValue")) for e in mat["metadataEntries"]}
    assert re.fullmatch(r"[0-9a-f]{64}", recorded["root"]), recorded.get("root")

    dom = ui.snapshot(f"assets/{GROUP}/training_checkpoints", shot="asset-page-training_checkpoints")
    lines = h.dom_lines(dom)
    assert "Metadata" in lines and "Latest materialization" in lines
    at = lines.index("root")
    shown_root = next(x for x in lines[at + 1:at + 4] if re.fullmatch(r"[0-9a-f]{64}", x))
    assert shown_root == recorded["root"]
    at = lines.index("Row count")
    assert recorded["dagster/row_count"] > 0 and lines[at + 1] == str(recorded["dagster/row_count"])
    for key in ("training_set_root", "signed_tree_head", "tree_size", "loss_curve"):
        assert key in lines, f"metadata entry {key} not rendered"
    assert "[Show Markdown]" in lines  # long markdown (the plot) sits behind a button


def test_asset_page_shows_loss_curve_plot(ui):
    """Clicking loss_curve's "[Show Markdown]" shows an inline PNG that the browser actually decodes."""
    browser = h.CdpBrowser(CHROMIUM, ui.work / "chromium-cdp.log")
    try:
        page = browser.new_page()
        browser.navigate(page, ui.url(f"assets/{GROUP}/training_checkpoints"))
        clicked = browser.wait_for(page, r"""(() => {
            const key = [...document.querySelectorAll('td')].find(td => td.textContent.trim() === 'loss_curve');
            if (!key) return null;
            const button = [...key.closest('tr').querySelectorAll('*')]
                .find(e => e.children.length === 0 && e.textContent.trim() === '[Show Markdown]');
            if (!button) return null;
            button.click();
            return 'clicked';
        })()""", 30, "the loss_curve metadata row")
        assert clicked == "clicked"
        images = browser.wait_for(page, r"""(() => {
            const imgs = [...document.querySelectorAll('img')].filter(i => i.src.startsWith('data:image/png'));
            return imgs.length && imgs.every(i => i.complete && i.naturalWidth > 0)
                ? imgs.map(i => ({alt: i.alt, w: i.naturalWidth, h: i.naturalHeight})) : null;
        })()""", 15, "the loss curve image to decode")
        assert len(images) == 1 and images[0]["w"] >= 200 and images[0]["h"] >= 100, images
        dialog = browser.evaluate(page, "[...document.querySelectorAll('[role=dialog]')].map(d => d.innerText)")
        assert any("loss_curve" in d for d in dialog or []), dialog
        time.sleep(0.3)  # let the dialog's open animation finish before the screenshot
        png = ui.work / "loss-curve.png"
        browser.screenshot(page, png)
        ui.keep(png)
    finally:
        browser.close()


def test_asset_checks_passed(ui):
    """Every asset's Checks tab lists its checks as Succeeded; GraphQL agrees, for this run."""
    nodes = ui.gql(LATEST, _keys(*ASSETS))["assetNodes"]
    assert len(nodes) == len(ASSETS)
    expected = {}
    for node in nodes:
        checks = node["assetChecksOrError"]["checks"]
        name = node["assetKey"]["path"][-1]
        expected[name] = sorted(c["name"] for c in checks)
        assert "tree_head_verifies" in expected[name], (name, expected[name])
        for c in checks:
            ex = c["executionForLatestMaterialization"]
            assert ex and ex["runId"] == ui.run_id and ex["status"] == "SUCCEEDED" and ex["evaluation"]["success"], \
                (name, c)
    assert CHECK_NAMES <= set().union(*expected.values()), expected

    # What the browser shows: one tab over every asset's Checks view.
    browser = h.CdpBrowser(CHROMIUM, ui.work / "chromium-cdp-checks.log")
    try:
        page = browser.new_page()
        for name in ASSETS:
            browser.navigate(page, ui.url(f"assets/{GROUP}/{name}?view=checks"))
            want = expected[name]

            def statuses():
                lines = browser.inner_text_lines(page)
                if f"Checks ({len(want)})" not in lines:
                    return None
                found = {}
                for check in want:
                    if check not in lines:
                        return None
                    at = lines.index(check)
                    # the first status word after the check's name (a lone check's page also shows its
                    # "Execute" button and an "Overview" tab first)
                    after = [x for x in lines[at + 1:at + 12] if x in STATUSES]
                    if not after:
                        return None
                    found[check] = after[0]
                return found
            shown = h.wait_until(statuses, 30, f"the Checks tab of {name}", interval=0.25)
            assert shown == {c: "Succeeded" for c in want}, (name, shown)
            if name == "training_checkpoints":
                assert "Passed" in browser.inner_text_lines(page)  # the selected check's latest evaluation
                png = ui.work / "checks-training_checkpoints.png"
                browser.screenshot(page, png)
                ui.keep(png)
    finally:
        browser.close()

    # And the one-shot snapshot of the same tab, as a plain --dump-dom sees it.
    lines = h.dom_lines(ui.snapshot(f"assets/{GROUP}/training_checkpoints?view=checks"))
    for check in expected["training_checkpoints"]:
        at = lines.index(check)
        assert "Succeeded" in lines[at:at + 3], (check, lines[at:at + 3])
