"""Report stage: Parquet tables -> ``report/index.html`` + one page per method and class (static, offline, no
model needed: ``make report`` rebuilds it from the run's files and the source videos' frames).

The overview has the run's totals, faithfulness against the random baseline, a class table sortable by any
column, temporal profiles, results per split, agreement with other runs, the failures and the configuration.
A class page has the class's profile and spatial density against the dataset's, its deletion / insertion
curves, galleries of its most and least confident clips, of its misclassified clips (with the tube of the
predicted class and, when the run stored it, of the true class) and of its clips that are right for the wrong
reasons (see :func:`pipeline.report.selection.wrong_reasons`), and for its most confident clip an MP4, the
paper-style tube picture, an isosurface view, the tube of every compared run side by side and, for a fused
run, each fused layer's own tube beside the fused one. Where the dataset has ground-truth boxes, the frames
show them with the tube's peak marked as a hit or a miss, and the class page gives the pointing game per time
step.

Scale: plots come from the aggregate tables; galleries are picked from a projection of a few small columns
(and, with boxes, each clip's pointing game from ``stats/pointing.parquet``, one part at a time), and only the
picked clips' volumes and frames are read, so the report's time and size grow with the number of
classes, not of clips.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from jinja2 import Environment, PackageLoader, select_autoescape
from tqdm import tqdm

from pipeline.data.video import VideoError
from pipeline.errors import ConfigError, MissingInput
from pipeline.explain.clipstats import BORDER
from pipeline.report import render
from pipeline.report.gallery import ClipRenderer, asset_name
from pipeline.report.marks import BoxTable
from pipeline.report.selection import BORDER_LIMIT, MISS_LIMIT, ROLES, pick_gallery, read_clip_pointing, read_summary
from pipeline.stages.result import StageResult
from pipeline.store import (
    ALL_LABEL,
    REPAIR,
    UNLABELLED_NAME,
    boxes_path,
    read_boxes,
    read_failures,
    read_index,
    read_table,
    read_tubes,
    readable,
    replace_folder,
    tube_files,
)
from pipeline.store.provenance import check_tubes_made_by
from pipeline.store.run_dir import RunDir

log = logging.getLogger(__name__)

DETAIL_COLUMNS = [
    "clip_id",
    "video_id",
    "source",
    "label",
    "label_name",
    "model_label",
    "method",
    "target_rank",
    "target",
    "target_name",
    "target_prob",
    "pred",
    "pred_name",
    "pred_prob",
    "frame_indices",
    "crop_box",
    "top10_mass",
    "entropy",
    "border_mass",
    "volume",
]
#: optional columns of the contract (absent from runs written before they existed)
OPTIONAL_DETAILS = ["layer_volumes"]


def anchor(method: str, label: str) -> str:
    """An HTML id and page name for a class (label names may hold spaces or markup characters)."""
    return "c-" + asset_name(str(label), method)


def _optional(path: Path) -> pd.DataFrame | None:
    repair = "rebuild it with stage=evaluate" if path.name.startswith("faith") else REPAIR["stats"]
    return read_table(path, repair) if path.is_file() else None


def _clip_item(row, role: str, renderer: ClipRenderer, true_row) -> dict:
    item = dict(
        clip_id=row.clip_id,
        role=role,
        label=row.label_name if pd.notna(row.label_name) else UNLABELLED_NAME,
        pred=row.pred_name,
        prob=float(row.pred_prob),
        target=row.target_name,
        top10=float(row.top10_mass),
        entropy=float(row.entropy),
        border=float(row.border_mass),
        correct=pd.isna(row.model_label) or int(row.pred) == int(row.model_label),
    )
    try:
        item.update(renderer.overlay(row))
        if not item["correct"]:
            if true_row is None:
                item["true_missing"] = True
            else:
                item["true"] = renderer.overlay(true_row)
    except VideoError as err:
        item["error"] = str(err)
    return item


def _other_tubes(run_dir: Path, others: list[str], featured: pd.DataFrame) -> dict[tuple[str, str, int], np.ndarray]:
    """The compared runs' tubes of the featured clips (same clip and target class), at input size."""
    found = {}
    for name in others:
        other_dir = run_dir.parent / str(name)
        if not tube_files(other_dir) or featured.empty:
            continue
        rows = read_tubes(
            other_dir,
            columns=["clip_id", "method", "target", "volume"],
            upsample=True,
            filters=[("clip_id", "in", featured["clip_id"].tolist())],
        )
        for r in rows.itertuples():
            found[(str(name), r.clip_id, int(r.target))] = (f"{r.method} ({name})", r.volume)
    return found


def _records(frame: pd.DataFrame | None) -> list[dict]:
    if frame is None:
        return []
    return [
        {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
        for r in frame.to_dict("records")
    ]


def _shown_config(run_dir: Path) -> str:
    """The configuration that made the tubes (kept by the extract stage), else the run's latest command's."""
    for path in (RunDir(run_dir).tubes_config, RunDir(run_dir).config):
        if path.is_file():
            return path.read_text()
    return ""


def _step_pointing(steps: pd.DataFrame | None, method: str, label_name: str) -> list[dict]:
    """The class's pointing game per time step beside all classes' (rows of ``stats/pointing_steps.parquet``)."""
    if steps is None:
        return []
    mine = steps[(steps["method"] == method) & (steps["label_name"] == label_name)].set_index("step")
    everyone = steps[(steps["method"] == method) & (steps["label"] == ALL_LABEL)].set_index("step")
    return [
        dict(
            step=int(step),
            game=float(r.pointing_game),
            frames=int(r.pointing_frames),
            all=float(everyone["pointing_game"].get(step, np.nan)),
        )
        for step, r in mine.sort_index().iterrows()
    ]


def validate(cfg, upstream: tuple[str, ...] = ()) -> None:
    """Settings of this stage, checked before any work starts."""
    if int(cfg.report.clips_per_class) < 1:
        raise ConfigError(f"report.clips_per_class must be >= 1, got {cfg.report.clips_per_class}")


def run(cfg, run_dir: Path, client=None) -> dict:
    """Build the report in a temporary folder beside ``report/`` and put it in place only when complete: a
    report run that fails leaves the previous report as it was."""
    for left in run_dir.glob(".report.*"):  # what an interrupted build left
        shutil.rmtree(left, ignore_errors=True)
    check_tubes_made_by(run_dir, cfg, "report")
    out = RunDir(run_dir).report
    building = RunDir(run_dir).report.with_name(f".report.tmp-{os.getpid()}")
    try:
        result = _build(cfg, run_dir, building)
        replace_folder(building, out)  # rebuilt whole, so no picture of an older run lingers
    finally:
        shutil.rmtree(building, ignore_errors=True)
    log.info("report: %s (%d pages, %.1f MB)", RunDir(run_dir).report_page, result["pages"], result["bytes"] / 1e6)
    return StageResult("report", clips=result["clips"], figures=dict(pages=result["pages"], bytes=result["bytes"]))


def _build(cfg, run_dir: Path, out: Path) -> dict:
    """Render the whole report into the folder ``out``."""
    assets = out / "assets"
    assets.mkdir(parents=True)
    _, meta = read_index(run_dir)
    run = RunDir(run_dir)
    if not run.table("per_class").is_file():
        raise MissingInput(f"{run.table('per_class')}: no statistics; run the stats stage first (stage=stats)")
    per_class = read_table(run.table("per_class"), REPAIR["stats"])
    overall = read_table(run.table("overall"), REPAIR["stats"])
    per_split = _optional(run.table("per_split"))
    faith = _optional(run.table("faithfulness"))
    agreement = _optional(run.table("agreement_per_class"))
    failures = read_failures(run_dir)
    others = list(cfg.stats.compare_runs)

    box_file = boxes_path(cfg, meta)
    boxes = read_boxes(box_file) if box_file else None
    steps = _optional(run.table("pointing_steps")) if boxes is not None else None
    with readable(tube_files(run_dir), REPAIR["tubes"]):
        summary = read_summary(run_dir)
    if steps is not None and run.table("pointing").is_dir():
        summary = summary.merge(read_clip_pointing(run.table("pointing")), on=["method", "clip_id"], how="left")
    gallery = pick_gallery(summary, int(cfg.report.clips_per_class))
    present = set(pq.read_schema(tube_files(run_dir)[0]).names)
    details = read_tubes(
        run_dir,
        columns=DETAIL_COLUMNS + [c for c in OPTIONAL_DETAILS if c in present],
        upsample=True,
        filters=[("clip_id", "in", sorted(set(gallery["clip_id"])))],
    )
    if boxes is not None:
        boxes = boxes[boxes["video_id"].isin(set(details["video_id"]))]
    first = {(r.clip_id, r.method): r for r in details[details["target_rank"] == 0].itertuples()}
    by_target = {(r.clip_id, r.method, int(r.target)): r for r in details.itertuples()}
    featured = gallery[gallery["role"] == "confident"].groupby(["method", "label_name"]).head(1)
    other_tubes = _other_tubes(run_dir, others, featured)

    renderer = ClipRenderer(assets, BoxTable(boxes, float(cfg.stats.pointing_tolerance)))
    pages: dict[tuple[str, str], dict] = {}
    for g in tqdm(list(gallery.itertuples()), desc="report", unit="clip"):
        row = first[(g.clip_id, g.method)]
        true_row = by_target.get((g.clip_id, g.method, int(row.model_label))) if pd.notna(row.model_label) else None
        page = pages.setdefault((g.method, g.label_name), {role: [] for role in ROLES})
        page[g.role].append(_clip_item(row, g.role, renderer, true_row))
    for f in featured.itertuples():
        row = first[(f.clip_id, f.method)]
        compared = dict(
            other_tubes[(n, row.clip_id, int(row.target))]
            for n in others
            if (n, row.clip_id, int(row.target)) in other_tubes
        )
        try:
            pages[(f.method, f.label_name)]["featured"] = dict(
                clip_id=row.clip_id,
                target=row.target_name,
                **renderer.featured(row, compared),
                missing_runs=[n for n in others if (n, row.clip_id, int(row.target)) not in other_tubes],
            )
        except VideoError as err:
            pages[(f.method, f.label_name)]["featured"] = dict(clip_id=row.clip_id, error=str(err))

    for method, rows in per_class.groupby("method"):
        render.profile_plot(
            rows["label_name"].tolist(), rows["temporal_profile"].tolist(), assets / f"profile-{method}.png"
        )
    everyone = {r.method: r for r in overall.itertuples()}
    for r in overall.itertuples():
        render.class_plots(
            r.temporal_profile, r.temporal_profile, getattr(r, "density", None), assets / f"all-{r.method}.png"
        )
    hists = [c for c in per_class.columns if c.endswith("_hist")]
    labels = {"top10_mass_hist": "top-10% mass", "entropy_hist": "entropy", "border_mass_hist": "border mass"}
    for r in per_class.itertuples():
        render.class_plots(
            r.temporal_profile,
            everyone[r.method].temporal_profile,
            getattr(r, "density", None),
            assets / f"{anchor(r.method, r.label_name)}.png",
        )
        if hists:
            render.distribution_plot(
                {labels.get(h, h): getattr(r, h) for h in hists},
                {labels.get(h, h): getattr(everyone[r.method], h) for h in hists},
                assets / f"{anchor(r.method, r.label_name)}-hist.png",
            )
    if faith is not None:
        for r in faith.itertuples():
            name = "all" if r.label == -1 else anchor(r.method, r.label_name)
            render.curve_plot(
                {
                    "deletion": r.deletion_curve,
                    "random deletion": r.random_deletion_curve,
                    "insertion": r.insertion_curve,
                    "random insertion": r.random_insertion_curve,
                },
                assets / f"curves-{name}-{r.method}.png",
            )

    classes = per_class.drop(columns=hists)
    classes["anchor"] = [anchor(m, n) for m, n in zip(classes["method"], classes["label_name"])]
    if faith is not None:
        classes = classes.merge(
            faith.drop(columns=[c for c in faith if c.endswith("_curve")] + ["clips"]),
            on=["method", "label", "label_name"],
            how="left",
        )
    if agreement is not None:
        wide = (
            agreement.pivot_table(index=["method", "label", "label_name"], columns="other_run", values="spearman")
            .add_prefix("agree_")
            .reset_index()
        )
        classes = classes.merge(wide, on=["method", "label", "label_name"], how="left")
    agree_columns = [c for c in classes.columns if c.startswith("agree_")]
    faith_all = {r["method"]: r for r in _records(faith[faith["label"] == -1])} if faith is not None else {}

    env = Environment(loader=PackageLoader("pipeline.report", "templates"), autoescape=select_autoescape(["html"]))
    common = dict(run_name=run_dir.name, has_pointing="pointing_game" in overall.columns, has_faith=faith is not None)
    class_records = _records(classes)
    template = env.get_template("class.html")
    for record in class_records:
        page = pages.get((record["method"], record["label_name"]), {role: [] for role in ROLES})
        page["steps"] = _step_pointing(steps, record["method"], record["label_name"])
        (out / f"{record['anchor']}.html").write_text(
            template.render(
                **common,
                has_hist=bool(hists),
                c=record,
                all=_records(overall[overall["method"] == record["method"]])[0],
                roles=ROLES,
                miss_limit=MISS_LIMIT,
                border_limit=BORDER_LIMIT,
                uniform_border=1 - (1 - 2 * BORDER) ** 2,
                page=page,
                faith_all=faith_all.get(record["method"]),
                curves=f"assets/curves-{record['anchor']}-{record['method']}.png",
                agree_columns=agree_columns,
            )
        )
    (out / run.report_page.name).write_text(
        env.get_template("overview.html").render(
            **common,
            overall=_records(overall),
            classes=class_records,
            methods=sorted(per_class["method"].unique()),
            per_split=_records(per_split[per_split["label"] == -1]) if per_split is not None else [],
            faith=faith_all,
            agreement=_records(agreement[agreement["label"] == -1]) if agreement is not None else [],
            agree_columns=agree_columns,
            compare_runs=others,
            failures=_records(failures.head(200)),
            failure_count=len(failures),
            num_classes=len(meta["classes"]),
            config=_shown_config(run_dir),
        )
    )
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return dict(
        pages=len(class_records) + 1,
        clips=int(gallery["clip_id"].nunique()),
        bytes=size,
    )
