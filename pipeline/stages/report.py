"""Report stage: Parquet tables -> ``report/index.html`` (static, offline, no model needed).

The overview shows the run's totals, a table per class and the mean temporal profile of each class; each
class gets a gallery of its most confident clips with the tube over the frames (animated GIF) and over time
(PNG strip). Only gallery clips are decoded, so the report's cost does not grow with the dataset.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape
from tqdm import tqdm

from pipeline import render
from pipeline.stages.index import read_index
from pipeline.store import read_failures, read_tubes
from pipeline.video import VideoError, read_frames

log = logging.getLogger(__name__)

GALLERY_COLUMNS = ["clip_id", "video_id", "source", "label", "label_name", "method", "target_rank", "target_name", "target_prob", "pred_name", "pred_prob", "frame_indices", "crop_box", "top10_mass", "entropy"]


def asset_name(clip_id: str, method: str) -> str:
    """A file-system-safe, collision-free name for a clip's pictures."""
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", clip_id)[:60]
    return f"{safe}-{method}-{hashlib.sha1(f'{clip_id}|{method}'.encode()).hexdigest()[:8]}"


def anchor(method: str, label: str) -> str:
    """An HTML id for a class section (label names may hold spaces or markup characters)."""
    return "c-" + asset_name(str(label), method)


def pick_gallery(tubes: pd.DataFrame, per_class: int) -> pd.DataFrame:
    """Per method and class, the ``per_class`` clips the model was most confident about (first targets)."""
    first = tubes[tubes["target_rank"] == 0].copy()
    first["label_name"] = first["label_name"].fillna("(unlabelled)")
    return first.sort_values("pred_prob", ascending=False).groupby(["method", "label_name"], sort=True).head(per_class)


def render_clip(row, volume, assets: Path) -> dict:
    name = asset_name(row.clip_id, row.method)
    frames = render.crop_frames(read_frames(row.source, list(row.frame_indices)), row.crop_box)
    render.save_gif(render.overlay(frames, volume), assets / f"{name}.gif")
    render.tube_strip(frames, volume, row.frame_indices, assets / f"{name}.png")
    return dict(gif=f"assets/{name}.gif", strip=f"assets/{name}.png")


def run(cfg, run_dir: Path, client=None) -> dict:
    out = run_dir / "report"
    assets = out / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    _, meta = read_index(run_dir)
    per_class = pd.read_parquet(run_dir / "stats" / "per_class.parquet")
    overall = pd.read_parquet(run_dir / "stats" / "overall.parquet")
    failures = read_failures(run_dir)

    tubes = read_tubes(run_dir, columns=GALLERY_COLUMNS)
    gallery = pick_gallery(tubes, int(cfg.report.clips_per_class))
    volumes = read_tubes(run_dir, columns=["clip_id", "method", "target_rank", "volume"], upsample=True, filters=[("clip_id", "in", gallery["clip_id"].tolist()), ("target_rank", "=", 0)])
    volumes = {(r.clip_id, r.method): r.volume for r in volumes.itertuples()}
    sections: dict[tuple[str, str], list[dict]] = {}
    for row in tqdm(list(gallery.itertuples()), desc="report", unit="clip"):
        item = dict(clip_id=row.clip_id, label=row.label_name, pred=row.pred_name, target=row.target_name,
                    prob=row.pred_prob, correct=pd.isna(row.label) or row.pred_name == row.label_name, top10=row.top10_mass, entropy=row.entropy)
        try:
            item.update(render_clip(row, volumes[(row.clip_id, row.method)], assets))
        except VideoError as err:
            item["error"] = str(err)
        sections.setdefault((row.method, row.label_name), []).append(item)

    for method, rows in per_class.groupby("method"):
        render.profile_plot(rows["label_name"].tolist(), rows["temporal_profile"].tolist(), assets / f"profile-{method}.png")

    env = Environment(loader=PackageLoader("pipeline", "templates"), autoescape=select_autoescape(["html"]))
    html = env.get_template("report.html").render(
        run_name=run_dir.name,
        overall=overall.to_dict("records"),
        per_class=[dict(r, anchor=anchor(r["method"], r["label_name"])) for r in per_class.to_dict("records")],
        methods=sorted(per_class["method"].unique()),
        sections=[dict(method=m, label=l, anchor=anchor(m, l), clips=c) for (m, l), c in sorted(sections.items())],
        failures=failures.head(200).to_dict("records"),
        failure_count=len(failures),
        has_pointing="pointing_game" in overall.columns,
        classes=meta["classes"],
        config=(run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else "",
    )
    (out / "index.html").write_text(html)
    log.info("report: %s", out / "index.html")
    return dict(report=str(out / "index.html"), clips=len(gallery))
