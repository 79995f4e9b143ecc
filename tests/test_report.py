"""The report from the Parquet files alone: pages, escaping, galleries picked right, and a real headless
Chromium that opens it without script errors and draws something."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from markupsafe import escape
from PIL import Image

from pipeline.bench.report import config, write_synthetic_run
from pipeline.data.video import probe, read_frames, write_video
from pipeline.report.gallery import ClipRenderer
from pipeline.report.marks import BoxTable
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
    return html.split(f"<h2>{title}</h2>")[1].split("<h2>")[0]


def test_pages_links_and_assets(built):
    run_dir, result = built
    pages = _pages(run_dir)
    assert len(pages) == 1 + len(CLASSES) == result.figures["pages"]
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
        assert shown("Most confident clips") == mine["clip_id"].head(PER_CLASS).tolist()
        assert shown("Least confident clips") == mine["clip_id"].tail(PER_CLASS).iloc[::-1].tolist()
        wrong = mine[mine["pred"] != mine["label"]]
        assert shown("Misclassified clips") == wrong["clip_id"].head(PER_CLASS).tolist()
        if len(wrong):  # target.mode=pred: the true class's tube does not exist, and the page says so
            assert "did not explain the true class" in _section(page, "Misclassified clips")
        featured = re.search(r"The most confident clip in depth: (clip\d+)", page).group(1)
        assert featured == mine["clip_id"].iloc[0]


def test_size_is_bounded_by_classes_not_clips(built):
    """One animation per gallery clip (the featured clip's MP4 is its gallery animation), four roles at most."""
    run_dir, result = built
    animations = list((run_dir / "report" / "assets").glob("*.mp4"))
    assert result.clips <= 4 * PER_CLASS * len(CLASSES) and len(animations) == result.clips


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


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """A fused run whose boxes cover only video000 and video001 (clips of video002 have none)."""
    run_dir = tmp_path_factory.mktemp("fused") / "run"
    write_synthetic_run(run_dir, 24, ["Sit", "Wave"], videos=3, seed=2, method="fusion-gradcam", layers=["b2", "b3"])
    boxes = pd.read_csv(run_dir / "boxes.csv")
    boxes[boxes["video_id"] != "video002"].to_csv(run_dir / "boxes.csv", index=False)
    cfg = config(clips_per_class=PER_CLASS)
    stats.run(cfg, run_dir)
    report.run(cfg, run_dir)
    return run_dir, cfg


def _white(video) -> int:
    """Near-white pixels over all frames of an animation: only a drawn box is white (frames are grey and red, the
    heat map is jet)."""
    return int((read_frames(video, list(range(probe(video).num_frames))).min(3) > 235).sum())


def _items(html: str) -> list[tuple[str, str, str]]:
    """(clip id, its meta text, its animation) of every gallery item of a page."""
    return re.findall(r'<div class="meta"><b>(clip\d+)</b>(.*?)</div>\s*<video class="anim" src="([^"]+)"', html, re.S)


def test_boxes_are_drawn_where_the_dataset_has_them_and_nowhere_else(fused):
    run_dir, _ = fused
    tubes = read_tubes(run_dir, columns=["clip_id", "video_id", "frame_indices", "frame_peak_x", "frame_peak_y"])
    boxes = pd.read_csv(run_dir / "boxes.csv").set_index(["video_id", "frame"])
    seen = {"boxed": 0, "unboxed": 0}
    for page in (run_dir / "report").glob("c-*.html"):
        for clip_id, meta, animation in _items(page.read_text()):
            row = tubes[tubes["clip_id"] == clip_id].iloc[0]
            if row.video_id == "video002":
                seen["unboxed"] += 1
                assert "peak on the box" not in meta and _white(run_dir / "report" / animation) == 0
                continue
            seen["boxed"] += 1
            hits = sum(  # the pointing game by hand: each step's peak (source pixels) inside that frame's box
                boxes.loc[(row.video_id, f)].x0 <= x < boxes.loc[(row.video_id, f)].x1
                and boxes.loc[(row.video_id, f)].y0 <= y < boxes.loc[(row.video_id, f)].y1
                for f, x, y in zip(row.frame_indices, row.frame_peak_x, row.frame_peak_y)
            )
            assert f"peak on the box in {hits} of {len(row.frame_indices)} steps" in meta
            assert _white(run_dir / "report" / animation) > 10 * len(row.frame_indices)
    assert seen["boxed"] and seen["unboxed"]


def test_class_pages_give_the_pointing_game_per_time_step(fused):
    run_dir, _ = fused
    steps = pd.read_parquet(run_dir / "stats" / "pointing.parquet")
    for name, mine in steps.groupby("label_name"):
        page = next(p.read_text() for p in (run_dir / "report").glob("c-*.html") if f"<h1>{name} " in p.read_text())
        table = page.split("<h2>Pointing game per time step</h2>")[1].split("</table>")[0]
        row = re.search(r'<td class="name">this class</td>(.*?)</tr>', table, re.S).group(1)
        shown = [float(v) for v in re.findall(r">([\d.]+)%</td>", row)]
        expected = (100 * mine.groupby("step")["hit"].mean()).tolist()
        assert len(shown) == 8 and np.allclose(shown, expected, atol=0.051)


def test_a_fused_run_shows_each_layers_tube_beside_the_fused_one(fused, built):
    run_dir, _ = fused
    for page in (run_dir / "report").glob("c-*.html"):
        html = page.read_text()
        assert "What each fused layer contributed" in html and "(b2, b3)" in html
        src = re.search(r'<img class="layers" src="([^"]+)"', html).group(1)
        assert Image.open(run_dir / "report" / src).height > 300  # three rows: fused, b2, b3
    assert all("What each fused layer contributed" not in html for html in _pages(built[0]).values())


def test_without_boxes_nothing_is_drawn(fused):
    run_dir, cfg = fused
    (run_dir / "boxes.csv").unlink()
    stats.run(cfg, run_dir)
    report.run(cfg, run_dir)
    assert not (run_dir / "stats" / "pointing_steps.parquet").exists()
    assert not (run_dir / "stats" / "pointing.parquet").exists()  # no table outlives the boxes it came from
    for page in (run_dir / "report").glob("c-*.html"):
        html = page.read_text()
        assert "Pointing game per time step" not in html and "peak on the box" not in html
        assert all(_white(run_dir / "report" / animation) == 0 for _, _, animation in _items(html))


def _blob(y: float, x: float) -> np.ndarray:
    """One time step of an 8 x 8 native tube: a Gaussian centred on native pixel (y, x)."""
    yy, xx = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    return np.exp(-((yy - y) ** 2 + (xx - x) ** 2)).astype(np.float32)


#: Sit clips (even ids) whose tube misses the box; every other tube is a blob on the box, in the frame's centre
OFF_BOX = {"clip0000002": "interior", "clip0000004": "late", "clip0000006": "corner", "clip0000008": "corner"}


def _off_box_volumes(rng, n):
    centre, corner = _blob(3.5, 3.5), _blob(0, 0)
    volumes = np.stack([np.stack([centre] * 4)] * n)
    volumes[2] = np.stack([_blob(3.5, 6.0)] * 4)  # beside the box, inside the frame: border mass about 25%
    volumes[4] = np.stack([centre, corner, corner, corner])  # on the box in its first 2 of 8 steps only
    volumes[6] = volumes[8] = np.stack([corner] * 4)  # in the top-left corner: off the box and on the border
    return volumes


def _off_box_run(run_dir, boxes: bool = True):
    """40 clips of 2 classes, with a fixed box in the frame's centre or no boxes, stats and report made; clip 8 is
    misclassified (seed 3) and the others of ``OFF_BOX`` are right."""
    write_synthetic_run(run_dir, 40, ["Sit", "Wave"], clips_per_part=40, videos=2, seed=3, volumes=_off_box_volumes)
    fixed = [dict(video_id=f"video{v:03d}", frame=f, x0=14, y0=10, x1=34, y1=30) for v in range(2) for f in range(24)]
    pd.DataFrame(fixed).to_csv(run_dir / "boxes.csv", index=False)
    if not boxes:
        (run_dir / "boxes.csv").unlink()
    cfg = config(clips_per_class=3)
    stats.run(cfg, run_dir)
    report.run(cfg, run_dir)
    tubes = read_tubes(run_dir, columns=["clip_id", "label", "pred"]).set_index("clip_id")
    assert [tubes.loc[c, "pred"] == tubes.loc[c, "label"] == 0 for c in OFF_BOX] == [True, True, True, False]
    assert (tubes["pred"] != tubes["label"]).sum() == 3  # clip 8 and two clips with tubes on the box
    return run_dir, cfg


@pytest.fixture(scope="module")
def off_box(tmp_path_factory):
    return _off_box_run(tmp_path_factory.mktemp("reasons") / "run")


def _class_page(run_dir, name: str) -> str:
    return next(p.read_text() for p in (run_dir / "report").glob("c-*.html") if f"<h1>{name} " in p.read_text())


def _reasons(html: str) -> list[str]:
    return re.findall(r"<b>(clip\d+)</b>", _section(html, "Right for the wrong reasons"))


def test_right_for_the_wrong_reasons_ranks_correct_clips_off_the_box(off_box):
    """With boxes: the correct clips whose peak is off the box in most steps, by miss rate then border mass
    (corner: 8 of 8 steps off, border 89%; interior: 8 of 8, 25%; late: 6 of 8, 57%); not the misclassified
    corner clip, and no clip whose tube is on the box."""
    run_dir, _ = off_box
    sit = _class_page(run_dir, "Sit")
    assert _reasons(sit) == ["clip0000006", "clip0000002", "clip0000004"]
    section = _section(sit, "Right for the wrong reasons")
    assert "off the ground-truth box in more than 50.0% of the clip's boxed steps" in section
    assert "peak on the box in 0 of 8 steps" in section and "peak on the box in 2 of 8 steps" in section
    assert _reasons(_class_page(run_dir, "Wave")) == []
    assert "None." in _section(_class_page(run_dir, "Wave"), "Right for the wrong reasons")


def test_without_boxes_wrong_reasons_go_by_border_mass(tmp_path):
    run_dir, _ = _off_box_run(tmp_path / "run", boxes=False)
    assert not (run_dir / "stats" / "pointing.parquet").exists()
    sit = _class_page(run_dir, "Sit")
    assert _reasons(sit) == ["clip0000006", "clip0000004"]  # the interior clip has 25% on the border: kept out
    assert "Ranked by border mass." in _section(sit, "Right for the wrong reasons")
    assert "ground-truth box" not in _section(sit, "Right for the wrong reasons")


def test_without_labels_the_wrong_reasons_section_says_why_it_is_empty(off_box, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(off_box[0], run_dir)
    for part in (run_dir / "tubes").glob("part-*.parquet"):
        table = pq.read_table(part)
        for name in ("label", "label_name", "model_label"):
            table = table.set_column(
                table.schema.get_field_index(name), name, pa.nulls(len(table), table.schema.field(name).type)
            )
        pq.write_table(table, part, compression="zstd")
    stats.run(off_box[1], run_dir)
    report.run(off_box[1], run_dir)
    page = _class_page(run_dir, "(unlabelled)")
    section = _section(page, "Right for the wrong reasons")
    assert "no prediction is known to be right" in section and _reasons(page) == []
    assert len(re.findall(r"<b>(clip\d+)</b>", _section(page, "Most confident clips"))) == 3


def test_gallery_animations_are_mp4s_at_most_320_wide(built, tmp_path):
    """A 1280 x 720 source is shown at 320 pixels wide, aspect kept, the box still drawn after the shrink; the
    featured clip's MP4 is its gallery animation; a report has no GIF and no animation wider than 320."""
    frames = np.full((8, 720, 1280, 3), 90, np.uint8)
    frames[:, 200:500, 600:800] = (220, 40, 40)
    write_video(tmp_path / "wide.mp4", frames, fps=25)
    boxes = pd.DataFrame([dict(video_id="v", frame=f, x0=560, y0=160, x1=840, y1=540) for f in range(8)])
    (tmp_path / "assets").mkdir()
    renderer = ClipRenderer(tmp_path / "assets", BoxTable(boxes))
    tube = np.zeros((8, 32, 32), np.float32)
    tube[:, 12:20, 14:18] = 1.0
    for crop, size in (([0.0, 0.0, 1280.0, 720.0], (320, 180)), ([280.0, 0.0, 1000.0, 720.0], (320, 320))):
        row = SimpleNamespace(
            clip_id=f"clip{int(crop[0])}",
            method="cam",
            target=0,
            target_name="x",
            volume=tube,
            source=str(tmp_path / "wide.mp4"),
            frame_indices=list(range(8)),
            crop_box=crop,
            video_id="v",
        )
        shown = renderer.overlay(row)
        info = probe(tmp_path / shown["animation"])
        assert shown["animation"].endswith(".mp4") and (info.width, info.height, info.num_frames) == (*size, 8)
        assert _white(tmp_path / shown["animation"]) > 8 * 100  # the box's outline, at least 100 pixels a frame
    assert renderer.featured(row, {})["mp4"] == shown["animation"]

    assets = built[0] / "report" / "assets"
    assert not list(assets.glob("*.gif"))
    animations = {a for html in _pages(built[0]).values() for a in re.findall(r'<video[^>]* src="([^"]+)"', html)}
    assert animations and all(a.endswith(".mp4") for a in animations)
    assert all(probe(built[0] / "report" / a).width <= 320 for a in animations)
