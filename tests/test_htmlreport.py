"""The HTML report: its content, its self-containment, and its layout as a real browser renders it."""

import html
import json
import os
import re
import shutil
import subprocess

import pytest

from deploykit.bench.records import BenchRecord
from deploykit.core.measure import Measurement
from deploykit.results.htmlreport import html_report
from deploykit.results.store import ResultStore
from deploykit.results.svgplot import log_ticks, nice_ticks

SPARSITIES = (0.0, 0.5, 0.9)
RUNTIMES = (("torch", "cpu"), ("onnxruntime", "CPUExecutionProvider"))
FORMS = ("dense", "csr")
BATCHES = (1, 8)


def _record(model, sparsity, runtime, device, form, batch, p50_us, profile="test-profile", accuracy=None):
    samples = tuple(int(p50_us * 1000) + 10 * (i % 7) for i in range(60))
    return BenchRecord(
        model=model, prune=f"magnitude:{sparsity:g}", sparsity=sparsity, overall_sparsity=sparsity * 0.98, form=form,
        runtime=runtime, profile=profile, stage="forward", runtime_version="1", device=device, batch_size=batch,
        threads=2, measurement=Measurement(samples, 10, batch, 1, 150, True), peak_rss_bytes=10**8,
        baseline_rss_bytes=10**7, disk_bytes=int(1e6 * (1 - sparsity * (form == "csr"))), parameters=266_610,
        nonzero_parameters=int(266_610 * (1 - sparsity)), parity_max_abs_error=0.0, load_s=0.1, timing={},
        artifact=f"/tmp/{model}-{sparsity}-{form}", versions={"torch": "x"}, machine={},
        metrics={} if accuracy is None else {"accuracy": accuracy})


def _records(model="lenet-300-100", profile="test-profile", scale=1.0, accuracy=True):
    return [_record(model, s, rt, dev, form, batch, scale * (40 if rt == "torch" else 15) * batch * (1 - s / 3),
                    profile, (0.98 - 0.15 * s ** 3) if accuracy else None)
            for s in SPARSITIES for rt, dev in RUNTIMES for form in FORMS for batch in BATCHES]


def _run(tmp_path, records, profile="test-profile"):
    store = ResultStore(tmp_path / "r.sqlite")
    run_id = store.save_run(records, started_utc="2026-11-23T00:00:00+00:00", status="complete",
                            command="deploykit bench", profile=profile, conditions={"versions": {"torch": "x"}})
    return store, store.run(str(run_id))


def _svgs(page):
    return {m.group(1): m.group(0) for m in re.finditer(r'<svg id="([^"]+)" class="dk-plot".*?</svg>', page, re.S)}


def _points(svg):
    return svg.count('class="dk-point')


def test_page_has_the_studies_plots_with_one_point_per_configuration(tmp_path):
    _, run = _run(tmp_path, _records())
    page = html_report(run)
    svgs = _svgs(page)
    assert list(svgs) == ["dk-quality-sparsity", "dk-quality-disk", "dk-quality-latency", "dk-size-sparsity",
                          "dk-latency-sparsity", "dk-latency-batch"]
    points = {name: _points(svg) for name, svg in svgs.items()}
    per_batch = len(SPARSITIES) * len(RUNTIMES) * len(FORMS)
    assert points == {
        "dk-quality-sparsity": len(SPARSITIES),  # quality is the weights': one point per plan
        "dk-quality-disk": per_batch,  # one per artifact and runtime
        "dk-quality-latency": per_batch,  # at one batch size (the page says which)
        "dk-size-sparsity": per_batch,
        "dk-latency-sparsity": per_batch,
        "dk-latency-batch": per_batch * len(BATCHES),
    }
    assert "At batch 1." in page
    assert page.count("<tr>") == 1 + len(run.records)  # the measurements table: header + one row each


def test_every_methods_line_starts_at_the_unpruned_model_and_legends_are_whole(tmp_path):
    import dataclasses

    base = [dataclasses.replace(r, prune="none", baseline=True) for r in _records() if r.sparsity == 0
            and r.form == "dense"]
    pruned = [r for r in _records() if r.sparsity > 0]
    records = base + pruned + [dataclasses.replace(r, prune=r.prune.replace("magnitude", "random-structured-long-name"))
                               for r in pruned]
    _, run = _run(tmp_path, records)
    svgs = _svgs(html_report(run))
    for name in ("dk-quality-sparsity", "dk-size-sparsity", "dk-latency-sparsity"):
        lines = re.findall(r'<polyline class="dk-line" points="([^"]+)"', svgs[name])
        # one line per method (and runtime and form): each has the unpruned point (x = 0) first
        assert lines and all(points.split()[0].split(",")[0] == lines[0].split()[0].split(",")[0] for points in lines)
        assert len(lines) == (2 if name == "dk-quality-sparsity" else 2 * len(RUNTIMES) * len(FORMS))
        labels = re.findall(r'data-label="([^"]+)"', svgs[name])
        assert any("random-structured-long-name" in label and "onnxruntime" in label for label in labels) or \
            name == "dk-quality-sparsity"
        assert "\u2026" not in svgs[name]  # never cut


def test_page_is_self_contained_and_escapes_what_it_shows(tmp_path):
    records = _records(model='<img src="http://example.com/x.png">')
    _, run = _run(tmp_path, records)
    page = html_report(run)
    assert "<script" not in page
    assert not re.search(r'(src|href)\s*=\s*"?(https?:|//)', page)  # nothing loaded from anywhere
    assert '<img src="http://example.com/x.png">' not in page
    assert "&lt;img src=&quot;http://example.com/x.png&quot;&gt;" in page


def test_page_without_quality_figures_says_why(tmp_path):
    _, run = _run(tmp_path, _records(model="mlp-sst2", accuracy=False))
    page = html_report(run)
    assert "dk-quality" not in page
    assert "No quality plots: mlp-sst2 reported no accuracy" in page
    assert "dk-latency-sparsity" in page


def test_comparison_of_two_profiles_pairs_configurations(tmp_path):
    store, _ = _run(tmp_path, _records(profile="apple-m1-pro"), "apple-m1-pro")
    store.save_run(_records(profile="intel-i7-11800h", scale=2.0), started_utc="2026-11-23T01:00:00+00:00",
                   status="complete", command="deploykit bench", profile="intel-i7-11800h", conditions={})
    page = html_report(store.run("profile:apple-m1-pro"), [store.run("profile:intel-i7-11800h")])
    svg = _svgs(page)["dk-compare"]
    assert svg.count('class="dk-point dk-bar"') == 2 * len(_records())
    assert "run 1 (apple-m1-pro)" in svg and "run 2 (intel-i7-11800h)" in svg
    assert len(re.findall(r">2\.00x\s*<", page)) == len(_records())  # every latency doubled on the second machine
    assert "<td>lenet-300-100 magnitude:0.5 csr onnxruntime (CPUExecutionProvider) batch 8 threads 2" in page


def test_cli_writes_the_page(tmp_path, cli):
    store, _ = _run(tmp_path, _records())
    out = tmp_path / "report.html"
    result = cli("report", "--store", str(tmp_path / "r.sqlite"), "--format", "html", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(("low", "high"), [(0.0, 0.97), (0.83, 0.98), (3.0, 3.0), (-2.0, 7.5)])
def test_nice_ticks_cover_the_range_in_round_steps(low, high):
    ticks = nice_ticks(low, high)
    assert ticks[0] <= low and ticks[-1] >= high and len(ticks) >= 2
    steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
    assert len(steps) == 1 and re.fullmatch(r"[125]", f"{steps.pop():.0e}"[0])


def test_log_ticks_label_short_ranges_between_decades():
    assert log_ticks(0.014, 0.047) == [0.01, 0.02, 0.05]
    assert log_ticks(0.5, 2000) == [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0]
    assert log_ticks(10, 10) == [10.0, 20.0]


# -- in a real browser ---------------------------------------------------------------------------

#: measured by the browser after layout: each plot's size, its data points centred outside the plot area,
#: its text overflowing the svg, and legend entries overlapping each other
LAYOUT_CHECK = """
<script>
window.addEventListener('load', () => {
  const inside = (b, a) => b.left >= a.left - 1 && b.right <= a.right + 1 && b.top >= a.top - 1 && b.bottom <= a.bottom + 1;
  const centred = (b, a) => { const x = (b.left + b.right) / 2, y = (b.top + b.bottom) / 2;
                              return x >= a.left - 1 && x <= a.right + 1 && y >= a.top - 1 && y <= a.bottom + 1; };
  const overlap = (a, b) => a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
  const plots = [...document.querySelectorAll('svg.dk-plot')].map(svg => {
    const box = svg.getBoundingClientRect();
    const area = svg.querySelector('rect.dk-area').getBoundingClientRect();
    const points = [...svg.querySelectorAll('.dk-point')];
    const legend = [...svg.querySelectorAll('.dk-legend text')].map(t => t.getBoundingClientRect());
    return {
      id: svg.id, width: box.width, height: box.height, points: points.length,
      outside: points.filter(p => !centred(p.getBoundingClientRect(), area)).length,
      overflowing: [...svg.querySelectorAll('text')].filter(t => !inside(t.getBoundingClientRect(), box)).map(t => t.textContent),
      legendOverlaps: legend.filter((a, i) => legend.some((b, j) => j > i && overlap(a, b))).length,
    };
  });
  const out = document.createElement('pre');
  out.id = 'dk-layout';
  out.textContent = JSON.stringify(plots);
  document.body.appendChild(out);
});
</script>
"""


def _chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        if os.environ.get("DEPLOYKIT_REQUIRE_BROWSER"):
            pytest.fail("DEPLOYKIT_REQUIRE_BROWSER is set but no chromium is on PATH")
        pytest.skip("no chromium on PATH (.ci/run installs Debian's)")
    return found


def _render(browser, page_path, tmp_path):
    """The DOM after load, from headless Chromium (flags for a machine with no network)."""
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,1000",
         "--virtual-time-budget=5000", "--dump-dom", page_path.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_report_renders_in_headless_chromium_with_every_point_inside_its_plot(tmp_path):
    browser = _chromium()
    store, _ = _run(tmp_path, _records(profile="apple-m1-pro"), "apple-m1-pro")
    store.save_run(_records(profile="intel-i7-11800h", scale=2.0), started_utc="2026-11-23T01:00:00+00:00",
                   status="complete", command="deploykit bench", profile="intel-i7-11800h", conditions={})
    page = html_report(store.run("1"), [store.run("2")])
    expected = {name: _points(svg) for name, svg in _svgs(page).items()}
    path = tmp_path / "report.html"
    path.write_text(page.replace("</body>", LAYOUT_CHECK + "</body>"), encoding="utf-8")

    dom = _render(browser, path, tmp_path)
    found = re.search(r'<pre id="dk-layout">(.*?)</pre>', dom, re.S)
    assert found, "the layout check did not run: " + dom[:500]
    plots = json.loads(html.unescape(found.group(1)))
    assert {p["id"]: p["points"] for p in plots} == expected  # the browser parsed every plot and point
    for plot in plots:
        assert plot["width"] > 300 and plot["height"] > 150, plot
        assert plot["outside"] == 0, plot
        assert plot["overflowing"] == [], plot
        assert plot["legendOverlaps"] == 0, plot


def _answer_records():
    """Two methods swept against a baseline measured with them: speedups with intervals, accuracy."""
    import dataclasses

    from deploykit.bench.records import Versus

    out = []
    for rt, dev in RUNTIMES:
        base = dataclasses.replace(_record("lenet-300-100", 0.0, rt, dev, "dense", 1, 40, accuracy=0.98),
                                   prune="none", baseline=True)
        out.append(base)
        for method, drop in (("magnitude", 0.05), ("l1-structured-with-a-long-name", 0.3)):
            for s in (0.5, 0.9):
                for form in FORMS:
                    speed = 1 + s * (2 if form == "csr" else 0.5)
                    ratios = tuple(speed * (1 + 0.01 * ((i % 5) - 2) * (4 if method == "magnitude" else 1))
                                   for i in range(10))
                    r = _record("lenet-300-100", s, rt, dev, form, 1, 40 / speed, accuracy=0.98 - drop * s ** 2)
                    out.append(dataclasses.replace(
                        r, prune=f"{method}:{s:g}", versus=Versus(base.artifact, "none", "dense", 0.04, 10**6,
                                                                  {"accuracy": 0.98}, ratios)))
    return out


def test_the_answer_page_has_speedup_intervals_fronts_and_whole_legends_in_chromium(tmp_path):
    _, run = _run(tmp_path, _answer_records())
    page = html_report(run)
    svgs = _svgs(page)
    assert {"dk-speedup-sparsity", "dk-size-sparsity", "dk-quality-latency"} <= set(svgs)
    speedup = svgs["dk-speedup-sparsity"]
    # an interval bar per variant (the baseline, at 1, has none), each method's line from the unpruned point
    assert speedup.count('class="dk-interval"') == len(RUNTIMES) * 2 * 2 * len(FORMS)
    assert speedup.count("the unpruned model (") == len(RUNTIMES) * 2 * len(FORMS)
    assert "dk-noisy" in speedup  # magnitude's wide intervals are hollow
    assert "Pareto front, onnxruntime" in svgs["dk-quality-latency"]
    browser = _chromium()
    path = tmp_path / "answer.html"
    path.write_text(page.replace("</body>", LAYOUT_CHECK + "</body>"), encoding="utf-8")
    dom = _render(browser, path, tmp_path)
    found = re.search(r'<pre id="dk-layout">(.*?)</pre>', dom, re.S)
    assert found, "the layout check did not run: " + dom[:500]
    for plot in json.loads(html.unescape(found.group(1))):
        assert plot["outside"] == 0 and plot["overflowing"] == [] and plot["legendOverlaps"] == 0, plot
    # every series' full label reached the rendered page (wrapped, never cut)
    for label in re.findall(r'data-label="([^"]+)"', page):
        assert f'data-label="{label}"' in dom
    assert any("l1-structured-with-a-long-name" in label for label in re.findall(r'data-label="([^"]+)"', dom))
