"""The report from the Parquet files alone: pages, escaping, galleries picked right, and a real headless
Chromium that opens it without script errors and draws something."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from markupsafe import escape
from PIL import Image

from pipeline.bench.report import config, write_synthetic_run
from pipeline.stages import report, stats
from pipeline.store import read_tubes

CLASSES = ['<b>Jump</b> & "Run"', "Sit", "Wave"]
PER_CLASS = 2


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report") / "run"
    write_synthetic_run(run_dir, 90, CLASSES, clips_per_part=40, videos=3, seed=1)
    (run_dir / "config.yaml").write_text("run_name: <script>alert(1)</script>\n")
    cfg = config(clips_per_class=PER_CLASS)
    stats.run(cfg, run_dir)
    result = report.run(cfg, run_dir)
    return run_dir, result


def _pages(run_dir):
    return {p.name: p.read_text() for p in (run_dir / "report").glob("*.html")}


def _section(html: str, title: str) -> str:
    return html.split(f"<h2>{title} clips</h2>")[1].split("<h2>")[0]


def test_pages_links_and_assets(built):
    run_dir, result = built
    pages = _pages(run_dir)
    assert len(pages) == 1 + len(CLASSES) == result["pages"]
    overview = pages["index.html"]
    for name, html in pages.items():
        for target in re.findall(r'(?:src|href)="([^"#]+)"', html):
            assert (run_dir / "report" / target).is_file(), f"{name}: {target}"
    linked = set(re.findall(r'href="(c-[^"]+\.html)"', overview))
    assert linked == set(pages) - {"index.html"}
    assert "1 input could not be used" in overview and "missing0.mp4: cannot open" in overview  # the failure row
    assert "Not measured for this run" in overview  # no evaluate stage ran


def test_label_names_and_config_are_escaped(built):
    run_dir, _ = built
    for html in _pages(run_dir).values():
        assert "<b>Jump</b>" not in html and "<script>alert" not in html
    assert "&lt;b&gt;Jump&lt;/b&gt; &amp; &#34;Run&#34;" in _pages(run_dir)["index.html"]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in _pages(run_dir)["index.html"]


def test_galleries_pick_the_right_clips(built):
    run_dir, _ = built
    tubes = read_tubes(run_dir, columns=["clip_id", "label", "label_name", "pred", "pred_prob"]).sort_values(
        "pred_prob", ascending=False
    )
    pages = _pages(run_dir)
    for name, mine in tubes.groupby("label_name"):
        page = next(html for html in pages.values() if f"<h1>{escape(name)} " in html)
        shown = lambda title, page=page: re.findall(r"<b>(clip\d+)</b>", _section(page, title))
        assert shown("Most confident") == mine["clip_id"].head(PER_CLASS).tolist()
        assert shown("Least confident") == mine["clip_id"].tail(PER_CLASS).iloc[::-1].tolist()
        wrong = mine[mine["pred"] != mine["label"]]
        assert shown("Misclassified") == wrong["clip_id"].head(PER_CLASS).tolist()
        if len(wrong):  # target.mode=pred: the true class's tube does not exist, and the page says so
            assert "did not explain the true class" in _section(page, "Misclassified")
        featured = re.search(r"The most confident clip in depth: (clip\d+)", page).group(1)
        assert featured == mine["clip_id"].iloc[0]


def test_size_is_bounded_by_classes_not_clips(built):
    run_dir, result = built
    gifs = list((run_dir / "report" / "assets").glob("*.gif"))
    assert result["clips"] <= 3 * PER_CLASS * len(CLASSES) and len(gifs) == result["clips"]
    assert len(list((run_dir / "report" / "assets").glob("*.mp4"))) == len(CLASSES)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("SALIENCY_TUBES_SKIP_BROWSER") == "1":
        pytest.skip("no Chromium and SALIENCY_TUBES_SKIP_BROWSER=1")
    pytest.fail(
        "headless Chromium is needed to check the report (apt-get install chromium; .ci/run does it); "
        "set SALIENCY_TUBES_SKIP_BROWSER=1 to skip this test"
    )


def _open(page, tmp_path, *args) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1280,1800",
        "--virtual-time-budget=3000",
    ]
    return subprocess.run([_chromium(), *flags, *args, page.as_uri()], capture_output=True, text=True, timeout=120)


def test_report_opens_in_headless_chromium(built, tmp_path):
    run_dir, _ = built
    pages = [run_dir / "report" / "index.html", next((run_dir / "report").glob("c-*.html"))]
    for i, page in enumerate(pages):
        dom = _open(page, tmp_path, "--dump-dom")
        assert dom.returncode == 0, dom.stderr[-2000:]
        root = re.search(r"<html[^>]*>", dom.stdout).group(0)  # the page's error hook marks <html> on any script error
        assert "</table>" in dom.stdout and "data-js-error" not in root, root
        errors = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
        assert not errors, errors
        shot = tmp_path / f"page{i}.png"
        result = _open(page, tmp_path, f"--screenshot={shot}")
        assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
        pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
        assert pixels.shape == (1800, 1280)
        assert pixels.std() > 20 and (pixels < 200).mean() > 0.03, "the screenshot is (nearly) blank"


def test_the_error_hook_catches_a_script_error(built, tmp_path):
    run_dir, _ = built
    html = (run_dir / "report" / "index.html").read_text().replace("</body>", "<script>null.boom();</script></body>")
    broken = run_dir / "report" / "broken.html"
    broken.write_text(html)
    try:
        dom = _open(broken, tmp_path, "--dump-dom")
    finally:
        broken.unlink()
    assert "data-js-error" in re.search(r"<html[^>]*>", dom.stdout).group(0)


def _tree(folder):
    return {p.relative_to(folder): (p.stat().st_ino, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def test_a_failing_report_leaves_the_last_good_one(built, tmp_path):
    """A truncated tube part, then a truncated statistics table: each report run fails with one line naming the
    file and the command that repairs it, and the previous report stays whole, file for file."""
    from pipeline.errors import OutputError

    run_dir = tmp_path / "run"
    shutil.copytree(built[0], run_dir)
    good = _tree(run_dir / "report")
    part = sorted((run_dir / "tubes").glob("part-*.parquet"))[1]
    whole = part.read_bytes()
    part.write_bytes(whole[: len(whole) // 2])
    cfg = config(clips_per_class=PER_CLASS)
    with pytest.raises(OutputError, match=rf"^{re.escape(str(part))}: cannot be read \(.*\); rerun stage=extract"):
        report.run(cfg, run_dir)
    assert _tree(run_dir / "report") == good
    with pytest.raises(OutputError, match=rf"^{re.escape(str(part))}: cannot be read .*stage=extract"):
        stats.run(cfg, run_dir)

    part.write_bytes(whole)
    table = run_dir / "stats" / "per_class.parquet"
    table.write_bytes(b"not parquet at all")
    with pytest.raises(OutputError, match=rf"^{re.escape(str(table))}: cannot be read .*rebuild it with stage=stats"):
        report.run(cfg, run_dir)
    assert _tree(run_dir / "report") == good
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []  # no half-built folder left

    stats.run(cfg, run_dir)  # the repair the message names; then the report is replaced whole
    report.run(cfg, run_dir)
    rebuilt = _tree(run_dir / "report")
    assert rebuilt.keys() == good.keys() and all(rebuilt[k][0] != good[k][0] for k in good)
