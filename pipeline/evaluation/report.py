"""Reports: DIR/report.json (every number), DIR/report.md, DIR/index.html (self-contained).

The HTML page stands alone — plots and thumbnails are embedded as base64 PNGs — so it can
be mailed, attached to a ticket or opened from object storage. The same figures and
thumbnails are also written under DIR/figures/ for report.md to link.
"""

from __future__ import annotations

import base64
import json
import logging
import posixpath
import time
from dataclasses import dataclass
from importlib import resources

import numpy as np

from ... import __version__
from ..run_reader import read_predictions
from ..storage import filesystem, full_uri, remove
from .base import EvaluationError, RankedImage
from .runner import EvaluationResult

log = logging.getLogger("rayseg")

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_HTML = "index.html"
FIGURES = "figures"
# What a report folder holds: what overwrite=True may delete, and nothing else.
REPORT_ENTRIES = (REPORT_JSON, REPORT_MD, REPORT_HTML, FIGURES)

CONVENTIONS = {
    "instance": [
        "COCO 'bbox' and 'segm' with pycocotools COCOeval semantics (IoU .50:.05:.95, 101 recall points, maxDets 1/10/100, crowd regions ignored); numbers are identical to COCOeval run on the same data.",
        "Area ranges (small < 32², medium < 96², large) use the ground truth's json 'area', and for detections {detection_area}.",
        "Per-image F1 (for the best/worst images) counts detections scoring at least the drawing threshold, matched at IoU 0.5.",
    ],
    "semantic": [
        "A confusion matrix over all evaluated pixels; ground-truth pixels with an ignore label are not counted.",
        "Segments are painted lowest score first (the highest-scoring segment wins overlaps); pixels no segment covers are 'unpredicted' and count against their class's accuracy and IoU.",
        "IoU is undefined (—) for a class absent from both ground truth and prediction; a class predicted but absent from the ground truth has IoU 0. mIoU and mAcc average the defined values; fwIoU weights IoU by ground-truth pixel frequency.",
        "Per-image quality (for the best/worst images) is the image's own mIoU over the classes in it.",
    ],
    "panoptic": [
        "panopticapi semantics: a prediction matches a ground-truth segment of its category at IoU > 0.5 (VOID pixels excluded from the union); predictions more than half on VOID or on a crowd region of their class are ignored.",
        "PQ = ΣIoU / (TP + ½FP + ½FN) per class, averaged over classes with any TP/FP/FN; IoU sums are exact, so results do not depend on sharding.",
        "Per-image quality (for the best/worst images) is PQ pooled over the image's segments.",
    ],
}
COMMON_NOTES = [
    "Only images present in both the predictions and the ground truth are evaluated. Prediction rows with status 'error' are evaluated as images with no predictions (their objects count as missed), as are rows whose size differs from the ground truth's.",
]


# How a detection's area was taken (`metrics.segm_area`), in words for the conventions.
_DETECTION_AREAS = {
    "box": "the box area w·h, for 'segm' too (what pycocotools' loadRes does with `rayseg export coco`, and detectron2)",
    "mask": "the mask area ('segm') or the box area ('bbox') (--segm-area mask)",
}


def conventions(result) -> list[str]:
    """The notes that say how the numbers of `result` were computed."""
    notes = CONVENTIONS[result.task]
    if result.task == "instance":
        notes = [note.format(detection_area=_DETECTION_AREAS[result.metrics["segm_area"]]) for note in notes]
    return notes + COMMON_NOTES


@dataclass
class Figure:
    name: str
    title: str
    caption: str
    png: bytes
    wide: bool = False

    @property
    def b64(self) -> str:
        return base64.b64encode(self.png).decode("ascii")


def _fmt(value, scale: float = 100.0, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    return f"{value * scale:.{digits}f}"


# --- report.json ------------------------------------------------------------------------------


def report_data(result: EvaluationResult, *, thumbnails: list[dict] | None = None) -> dict:
    """Everything the report shows, JSON-ready."""
    evaluator = result.evaluator
    run = dict(result.run)
    run.pop("files", None)
    images = result.coverage.to_dict()
    images["size_mismatch"] = evaluator.size_mismatch
    images["examples_size_mismatch"] = evaluator.size_mismatch_examples
    return {
        "rayseg_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "task": result.task,
        "predictions": result.predictions,
        "annotations": result.annotations,
        "run": {
            "run_id": run.get("run_id"),
            "model": run.get("model"),
            "weights": run.get("weights"),
            "weights_sha256": run.get("weights_sha256"),
            **run,
        },
        "images": images,
        "metrics": result.metrics,
        "ranking": {
            "best": [_ranked(r) for r in evaluator.ranking.best],
            "worst": [_ranked(r) for r in evaluator.ranking.worst],
            "quality": _quality_name(result.task),
        },
        "thumbnails": thumbnails or [],
        "evaluation": {
            "seconds": round(result.seconds, 3),
            "shards": result.shards,
            "distributed": result.distributed,
            "conventions": conventions(result),
        },
    }


def _ranked(image: RankedImage) -> dict:
    return {"image_id": image.image_id, "ground_truth": image.key, "quality": image.quality, **image.detail}


def _quality_name(task: str) -> str:
    return {"instance": "F1 @ IoU 0.5", "semantic": "image mIoU", "panoptic": "image PQ"}[task]


# --- headline and tables ----------------------------------------------------------------------


def headline(result: EvaluationResult) -> list[tuple[str, str, str]]:
    """(label, value, hint) tiles for the top of the page."""
    m = result.metrics
    if result.task == "instance":
        tiles = []
        if "segm" in m:
            s = m["segm"]
            tiles += [("mask AP", _fmt(s["AP"]), "segm, IoU .50:.95"), ("mask AP50", _fmt(s["AP50"]), "segm, IoU .50"),
                      ("mask AP75", _fmt(s["AP75"]), "segm, IoU .75"), ("mask AR100", _fmt(s["AR100"]), "segm, 100 dets")]  # fmt: skip
        if "bbox" in m:
            tiles.append(("box AP", _fmt(m["bbox"]["AP"]), "bbox, IoU .50:.95"))
        return tiles
    if result.task == "semantic":
        return [("mIoU", _fmt(m["mIoU"]), "mean class IoU"), ("fwIoU", _fmt(m["fwIoU"]), "frequency-weighted IoU"),
                ("mAcc", _fmt(m["mAcc"]), "mean class accuracy"), ("pAcc", _fmt(m["pAcc"]), "pixel accuracy")]  # fmt: skip
    return [("PQ", _fmt(m["PQ"]), "panoptic quality"), ("SQ", _fmt(m["SQ"]), "segmentation quality"),
            ("RQ", _fmt(m["RQ"]), "recognition quality"), ("PQ things", _fmt(m["Things"]["pq"]), f"{m['Things']['n']} classes"),
            ("PQ stuff", _fmt(m["Stuff"]["pq"]), f"{m['Stuff']['n']} classes")]  # fmt: skip


def summary_tables(result: EvaluationResult) -> list[dict]:
    """Tables of the main numbers: {title, columns, rows}."""
    m = result.metrics
    if result.task == "instance":
        from .instance import STAT_NAMES

        descriptions = [
            "AP @[IoU=0.50:0.95 | area=all | maxDets=100]", "AP @[IoU=0.50 | area=all | maxDets=100]",
            "AP @[IoU=0.75 | area=all | maxDets=100]", "AP @[IoU=0.50:0.95 | area=small | maxDets=100]",
            "AP @[IoU=0.50:0.95 | area=medium | maxDets=100]", "AP @[IoU=0.50:0.95 | area=large | maxDets=100]",
            "AR @[IoU=0.50:0.95 | area=all | maxDets=1]", "AR @[IoU=0.50:0.95 | area=all | maxDets=10]",
            "AR @[IoU=0.50:0.95 | area=all | maxDets=100]", "AR @[IoU=0.50:0.95 | area=small | maxDets=100]",
            "AR @[IoU=0.50:0.95 | area=medium | maxDets=100]", "AR @[IoU=0.50:0.95 | area=large | maxDets=100]",
        ]  # fmt: skip
        types = [t for t in ("segm", "bbox") if t in m]
        rows = [[name, desc] + [_fmt(m[t][name]) for t in types] for name, desc in zip(STAT_NAMES, descriptions)]
        return [{"title": "COCO metrics (%)", "columns": ["metric", "definition"] + types, "rows": rows, "text_columns": 2}]
    if result.task == "semantic":
        rows = [[name, _fmt(m[name])] for name in ("mIoU", "fwIoU", "mAcc", "pAcc")]
        return [{"title": "Metrics (%)", "columns": ["metric", "value"], "rows": rows, "text_columns": 1}]
    rows = [[group, _fmt(m[group]["pq"]), _fmt(m[group]["sq"]), _fmt(m[group]["rq"]), str(m[group]["n"])] for group in ("All", "Things", "Stuff")]
    return [{"title": "Panoptic quality (%)", "columns": ["", "PQ", "SQ", "RQ", "classes"], "rows": rows, "text_columns": 1}]


def per_class_table(result: EvaluationResult) -> dict:
    """The per-class table: {columns, rows: [{cells, bar (0..1 or None), color}]}."""
    from .visualize import category_color

    m = result.metrics
    rows = []
    if result.task == "instance":
        main = "segm" if "segm" in m else "bbox"
        other = "bbox" if main == "segm" and "bbox" in m else None
        columns = ["class", f"{main} AP", "AP50", "AP75", "AR100"] + ([f"{other} AP"] if other else []) + ["ground truth", "detections"]
        others = {c["id"]: c for c in m[other]["per_category"]} if other else {}
        for c in m[main]["per_category"]:
            cells = [c["name"], _fmt(c["AP"]), _fmt(c["AP50"]), _fmt(c["AP75"]), _fmt(c["AR100"])]
            if other:
                cells.append(_fmt(others[c["id"]]["AP"]))
            cells += [str(c["ground_truths"]), str(c["detections"])]
            rows.append({"cells": cells, "bar": c["AP"], "color": _hex(category_color(c["id"]))})
    elif result.task == "semantic":
        columns = ["class", "id", "IoU", "Acc", "ground-truth pixels", "predicted pixels"]
        for c in m["per_class"]:
            cells = [c["name"], str(c["id"]), _fmt(c["IoU"]), _fmt(c["Acc"]), f"{c['gt_pixels']:,}", f"{c['predicted_pixels']:,}"]
            rows.append({"cells": cells, "bar": c["IoU"], "color": _hex(category_color(c["id"]))})
    else:
        columns = ["class", "kind", "PQ", "SQ", "RQ", "TP", "FP", "FN"]
        for c in m["per_class"]:
            cells = [c["name"], "thing" if c["isthing"] else "stuff", _fmt(c["PQ"]), _fmt(c["SQ"]), _fmt(c["RQ"]), str(c["tp"]), str(c["fp"]), str(c["fn"])]
            rows.append({"cells": cells, "bar": c["PQ"], "color": _hex(category_color(c["id"]))})
    return {"columns": columns, "rows": rows}


def _hex(color) -> str:
    return "#%02x%02x%02x" % tuple(color)


# --- figures ----------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 9,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.titleweight": "bold",
            "axes.titlesize": 10,
            "figure.dpi": 110,
        }
    )
    return plt


def _png(fig) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", facecolor="white")
    _pyplot().close(fig)
    return buffer.getvalue()


def figures(result: EvaluationResult) -> list[Figure]:
    """The task's plots (matplotlib, Agg)."""
    try:
        if result.task == "instance":
            return _instance_figures(result)
        if result.task == "semantic":
            return _semantic_figures(result)
        return _panoptic_figures(result)
    except ImportError as e:  # matplotlib missing: a report without plots beats no report
        log.warning("plots skipped: %s", e)
        return []


def _mean_curve(curves: list) -> np.ndarray | None:
    defined = [np.array(c) for c in curves if c is not None]
    return np.mean(defined, axis=0) if defined else None


def _instance_figures(result: EvaluationResult) -> list[Figure]:
    from .visualize import category_color

    plt = _pyplot()
    m = result.metrics
    types = [t for t in ("segm", "bbox") if t in m]
    out = []
    fig, axes = plt.subplots(1, len(types), figsize=(5.2 * len(types), 4.2), squeeze=False)
    for ax, iou_type in zip(axes[0], types):
        metrics = m[iou_type]
        recall = np.array(metrics["pr_curves"]["recall"])
        curves = metrics["pr_curves"]["per_category"]
        categories = metrics["per_category"]
        if len(categories) <= 12:
            for c in categories:
                curve = curves[str(c["id"])]["iou50"]
                if curve is not None:
                    ax.plot(recall, curve, color=_hex(category_color(c["id"])), lw=1.4, label=f"{c['name']} @.50")
        for key, style, label in (("iou50", "-", "mean @.50"), ("iou75", "--", "mean @.75")):
            mean = _mean_curve([curves[str(c["id"])][key] for c in categories])
            if mean is not None:
                ax.plot(recall, mean, color="#222", lw=2.2, ls=style, label=label)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"{iou_type}: precision–recall (area all, 100 dets)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower left", frameon=False)
    fig.tight_layout()
    out.append(Figure("pr_curves", "Precision–recall curves", "Interpolated precision at the 101 COCO recall thresholds, per class at IoU 0.50 and averaged over classes at 0.50 and 0.75.", _png(fig), wide=True))
    out.append(_score_curve_figure(result, types))
    main = "segm" if "segm" in m else "bbox"
    bars = [(c["name"], c["AP"], c["id"]) for c in m[main]["per_category"]]
    out.append(_bars(bars, f"{main} AP per class", "AP (IoU .50:.95)", "ap_per_class", "Average precision per class; classes without ground truth have none."))
    return out


def _score_curve_figure(result: EvaluationResult, types: list[str]) -> Figure:
    """Precision, recall and F1 against the score threshold (metrics[t]["score_curve"])."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(types), figsize=(5.2 * len(types), 3.8), squeeze=False)
    for ax, iou_type in zip(axes[0], types):
        curve = result.metrics[iou_type]["score_curve"]
        thresholds = np.array(curve["thresholds"])
        for key, color in (("precision", "#3b6fb6"), ("recall", "#e15759"), ("f1", "#222")):
            values = np.array([np.nan if v is None else v for v in curve[key]], dtype=np.float64)
            ax.plot(thresholds, values, color=color, lw=2.2 if key == "f1" else 1.5, label=key if key != "f1" else "F1")
        best = _best_f1(curve)
        if best is not None:
            ax.axvline(best[0], color="#999", lw=1, ls=":")
            ax.annotate(f"best F1 {best[1]:.3f} at {best[0]:.2f}", (best[0], best[1]), xytext=(4, 6), textcoords="offset points", fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("score threshold")
        ax.set_title(f"{iou_type}: precision / recall / F1 @ IoU .50")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left", frameon=False)
    fig.tight_layout()
    caption = (
        "Detections scoring at least the threshold, matched to ground truth at IoU 0.50 as COCOeval matches them "
        "(each image's 100 best per class), pooled over classes: precision = TP / detections, recall = TP / ground truth, "
        "F1 = 2TP / (2TP + FP + FN). The dotted line is the threshold of the best F1; report.json has the values (metrics.<type>.score_curve)."
    )
    return Figure("score_curve", "Precision, recall and F1 against the score threshold", caption, _png(fig), wide=True)


def _best_f1(curve: dict) -> tuple[float, float] | None:
    """(threshold, F1) of the best F1, the lowest such threshold; None when F1 is undefined."""
    defined = [(f1, -t) for t, f1 in zip(curve["thresholds"], curve["f1"]) if f1 is not None]
    if not defined:
        return None
    f1, t = max(defined)
    return -t, f1


def _bars(items: list[tuple[str, float | None, int]], title: str, xlabel: str, name: str, caption: str, colors=None) -> Figure:
    from .visualize import category_color

    plt = _pyplot()
    items = sorted(items, key=lambda item: (item[1] is None, -(item[1] or 0)))
    height = max(1.8, 0.28 * len(items) + 0.8)
    fig, ax = plt.subplots(figsize=(6.4, min(height, 24)))
    labels = [item[0] for item in items]
    values = [item[1] or 0 for item in items]
    bar_colors = colors or [_hex(category_color(item[2])) for item in items]
    y = np.arange(len(items))
    ax.barh(y, values, color=bar_colors, height=0.7)
    for yi, item in zip(y, items):
        ax.text((item[1] or 0) + 0.01, yi, "—" if item[1] is None else f"{item[1] * 100:.1f}", va="center", fontsize=8)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return Figure(name, title, caption, _png(fig))


def _semantic_figures(result: EvaluationResult) -> list[Figure]:
    plt = _pyplot()
    m = result.metrics
    ids = m["confusion_matrix"]["class_ids"]
    counts = np.array(m["confusion_matrix"]["counts"], dtype=np.float64).reshape(len(ids), len(ids) + 1)
    names = [c["name"] for c in m["per_class"]]
    out = []
    if ids:
        totals = counts.sum(axis=1, keepdims=True)
        normalised = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
        side = max(3.6, 0.42 * len(ids) + 2.2)
        fig, ax = plt.subplots(figsize=(min(side + 0.8, 22), min(side, 20)))
        image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(ids) + 1), names + ["(unpredicted)"], rotation=45, ha="right")
        ax.set_yticks(range(len(ids)), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("ground truth")
        ax.set_title("Confusion matrix (rows normalised)")
        if len(ids) <= 15:
            for (i, j), value in np.ndenumerate(normalised):
                if counts[i, j]:
                    ax.text(j, i, f"{value * 100:.0f}", ha="center", va="center", fontsize=8, color="white" if value > 0.6 else "#223")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        fig.tight_layout()
        out.append(Figure("confusion_matrix", "Confusion matrix", "Share of each ground-truth class's pixels (rows) predicted as each class (columns), in %; the last column is pixels no segment covered.", _png(fig)))
    bars = [(c["name"], c["IoU"], c["id"]) for c in m["per_class"]]
    if bars:
        out.append(_bars(bars, "IoU per class", "IoU", "iou_per_class", "Intersection over union per class over all evaluated pixels."))
    return out


def _panoptic_figures(result: EvaluationResult) -> list[Figure]:
    m = result.metrics
    items = [(c["name"], c["PQ"], c["id"]) for c in m["per_class"]]
    kinds = {c["name"]: c["isthing"] for c in m["per_class"]}
    ordered = sorted(items, key=lambda item: (item[1] is None, -(item[1] or 0)))
    colors = ["#4e79a7" if kinds[name] else "#f28e2b" for name, _, _ in ordered]
    return [_bars(items, "PQ per class (blue: things, orange: stuff)", "PQ", "pq_per_class", "Panoptic quality per class.", colors=colors)]


# --- thumbnails -------------------------------------------------------------------------------


def thumbnails(result: EvaluationResult, score_threshold: float = 0.5) -> dict[str, list[dict]]:
    """Overlays of the best and worst images: {best|worst: [{image_id, quality, gt, pred, ...}]}."""
    from .visualize import png_bytes, render_pair

    evaluator = result.evaluator
    ignore = getattr(evaluator, "ignore_labels", frozenset())
    out: dict[str, list[dict]] = {"best": [], "worst": []}
    for which in ("best", "worst"):
        for ranked in getattr(evaluator.ranking, which):
            try:
                gt = _ground_truth_record(result, ranked.key)
                if gt is None or ranked.location is None:
                    continue
                fs, _ = filesystem(ranked.location.file, result.storage_options)
                (prediction,) = read_predictions(fs, [(ranked.location.file, ranked.location.row_group, [ranked.location.row])])
                # The evaluation's own matching marks false positives and misses.
                matches = evaluator.match_image(gt, prediction, score_threshold) if result.task == "instance" else None
                gt_panel, pred_panel, readable = render_pair(
                    result.task, gt, prediction, storage_options=result.storage_options,
                    score_threshold=score_threshold, ignore_labels=ignore, matches=matches,
                )
            except Exception as e:  # noqa: BLE001 - a thumbnail is never worth failing a report
                log.warning("thumbnail for %s skipped: %s", ranked.image_id, e)
                continue
            out[which].append(
                {
                    "image_id": ranked.image_id,
                    "quality": ranked.quality,
                    "detail": ranked.detail,
                    "image_readable": readable,
                    "marks": matches.counts if matches is not None else None,
                    "gt_png": png_bytes(gt_panel),
                    "pred_png": png_bytes(pred_panel),
                }
            )
    return out


def _ground_truth_record(result: EvaluationResult, key: str):
    images = result.ground_truth.images
    if key in images:
        return images[key]
    original = result.ground_truth.by_id.get(key)
    return images.get(original) if original is not None else None


# --- writing ----------------------------------------------------------------------------------


def _template(name: str):
    import jinja2

    text = resources.files(__package__).joinpath("templates", name).read_text(encoding="utf-8")
    environment = jinja2.Environment(autoescape=name.endswith(".html.j2"), trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    # A Markdown table cell ends at a bare `|`: pycocotools' metric names hold several.
    environment.filters["cell"] = lambda value: str(value).replace("|", "\\|")
    return environment.from_string(text)


def render(result: EvaluationResult, *, draw_thumbnails: bool = True, score_threshold: float = 0.5) -> dict[str, bytes]:
    """The report's files, name → content (report.json, report.md, index.html, figures/*.png)."""
    figs = figures(result)
    thumbs = thumbnails(result, score_threshold) if draw_thumbnails else {"best": [], "worst": []}
    thumb_files = {}
    listing = []
    for which, items in thumbs.items():
        for index, item in enumerate(items):
            stem = f"{FIGURES}/{which}-{index}"
            thumb_files[f"{stem}-gt.png"] = item["gt_png"]
            thumb_files[f"{stem}-pred.png"] = item["pred_png"]
            item["gt_file"], item["pred_file"] = f"{stem}-gt.png", f"{stem}-pred.png"
            item["gt_b64"] = base64.b64encode(item["gt_png"]).decode("ascii")
            item["pred_b64"] = base64.b64encode(item["pred_png"]).decode("ascii")
            item["which"] = which
            listing.append({"which": which, "image_id": item["image_id"], "quality": item["quality"], "ground_truth_png": item["gt_file"], "prediction_png": item["pred_file"], "image_readable": item["image_readable"], "marks": item["marks"]})
    data = report_data(result, thumbnails=listing)
    context = _context(result, data, figs, thumbs, score_threshold)
    files = {
        REPORT_JSON: (json.dumps(data, indent=2, allow_nan=False) + "\n").encode("utf-8"),
        REPORT_MD: _template("report.md.j2").render(**context).encode("utf-8"),
        REPORT_HTML: _template("report.html.j2").render(**context).encode("utf-8"),
    }
    for figure in figs:
        files[f"{FIGURES}/{figure.name}.png"] = figure.png
    files.update(thumb_files)
    return files


def _context(result: EvaluationResult, data: dict, figs: list[Figure], thumbs: dict, score_threshold: float) -> dict:
    from .visualize import category_color

    coverage = data["images"]
    coverage_rows = [
        ("evaluated images", coverage["evaluated"], "ground-truth images with a prediction row"),
        ("ground-truth images", coverage["ground_truth_images"], ""),
        ("prediction rows", coverage["prediction_rows"], ""),
        ("ground truth without a prediction row", coverage["gt_without_prediction"], ", ".join(coverage["examples_gt_without_prediction"])),
        ("prediction rows without ground truth", coverage["predictions_without_gt"], ", ".join(coverage["examples_without_gt"])),
        ("rows with status error (evaluated as no predictions)", coverage["error_rows"], ", ".join(coverage["examples_error"])),
        ("rows whose size differs from the ground truth", coverage["size_mismatch"], "; ".join(coverage["examples_size_mismatch"])),
        ("duplicate rows (ignored)", coverage["duplicate_rows"], ""),
    ]
    run = data["run"]
    run_rows = [
        (key, value)
        for key, value in (
            ("run id", run.get("run_id")),
            ("model", run.get("model")),
            ("weights", run.get("weights")),
            ("weights sha256", run.get("weights_sha256")),
            ("input", run.get("input")),
            ("run status", run.get("status")),
            ("run images (ok / error)", f"{run['counts'].get('ok')} / {run['counts'].get('error')}" if isinstance(run.get("counts"), dict) else None),
            ("predictions", result.predictions),
            ("ground truth", result.annotations),
            ("evaluated in", f"{result.seconds:.1f} s, {result.shards} shard(s), {'Ray tasks' if result.distributed else 'one process'}"),
            ("rayseg", data["rayseg_version"]),
            ("created", data["created"]),
        )
        if value is not None
    ]
    legend = _legend(result)
    return {
        "title": f"rayseg {result.task} evaluation",
        "task": result.task,
        "model": run.get("model") or "unknown model",
        "run_id": run.get("run_id") or "no _run.json",
        "created": data["created"],
        "tiles": headline(result),
        "tables": summary_tables(result),
        "per_class": per_class_table(result),
        "figures": figs,
        "thumbnails": thumbs,
        "quality_name": _quality_name(result.task),
        "score_threshold": score_threshold,
        "coverage_rows": coverage_rows,
        "run_rows": run_rows,
        "notes": data["evaluation"]["conventions"],
        "legend": [(name, _hex(category_color(i))) for i, name in legend] if result.task == "semantic" else [],
        "marks": _marks_legend(result.task),
        "thumbnail_caption": thumbnail_caption(result.task, score_threshold),
        "fmt": _fmt,
    }


def thumbnail_caption(task: str, score_threshold: float) -> str:
    """What the thumbnails' colours and marks mean (visualize.py draws them)."""
    if task == "semantic":
        return "Each class has its colour (legend); left: ground truth, right: prediction."
    if task == "panoptic":
        return (
            "Each segment has its own colour, chosen far from its neighbours' (colours are not classes); a predicted "
            "segment matching a ground-truth one (same class, IoU > 0.5) takes its colour. Left: ground truth, right: prediction."
        )
    return (
        f"Left: ground truth, right: detections scoring ≥ {score_threshold}. Each object has its own colour, "
        "far from its neighbours' (colours are not classes), so touching objects of one class show as two. "
        "A detection matched to a ground-truth object (same class, IoU ≥ 0.5, the evaluation's own matching) "
        "takes that object's colour. Red-and-white dashed outline: a false positive (a detection matched to no "
        "ground truth, or of the wrong class). Yellow-and-black dashed outline: a missed object (no detection "
        "scoring ≥ the threshold matched it), drawn in both panels. Crowd regions and detections on them are "
        "not marked."
    )


def _marks_legend(task: str) -> list[tuple[str, str, str]]:
    """(name, dash colour, gap colour) of the thumbnails' marks."""
    if task != "instance":
        return []
    from .visualize import FALSE_POSITIVE_MARK, MISSED_MARK

    return [("false positive", _hex(FALSE_POSITIVE_MARK[0]), _hex(FALSE_POSITIVE_MARK[1])),
            ("missed ground truth", _hex(MISSED_MARK[0]), _hex(MISSED_MARK[1]))]  # fmt: skip


def _legend(result: EvaluationResult) -> list[tuple[int, str]]:
    m = result.metrics
    if result.task == "instance":
        main = "segm" if "segm" in m else "bbox"
        return [(c["id"], c["name"]) for c in m[main]["per_category"]]
    return [(c["id"], c["name"]) for c in m["per_class"]]


class ReportDirectoryError(EvaluationError):
    """A report folder that is not empty (without overwrite), or that holds more than a report."""


def check_report_directory(directory: str, storage_options: dict | None = None, *, overwrite: bool = False) -> list[str]:
    """The entries of the report folder `directory` (path or URI), when it may be written.

    A folder that does not exist or is empty may. A non-empty one may only with `overwrite`,
    and only when it holds nothing but a report's own entries (REPORT_ENTRIES): an earlier
    report's files would otherwise be left beside the new ones, and anything else in it is
    not the report's to delete. ReportDirectoryError otherwise. Cheap: one listing.
    """
    fs, root = filesystem(directory, storage_options)
    fs.invalidate_cache(root)  # s3fs/gcsfs cache listings: a report written since is seen
    if fs.isfile(root):
        raise ReportDirectoryError(f"report folder {directory} is a file")
    try:
        entries = sorted(fs.ls(root, detail=False)) if fs.isdir(root) else []
    except FileNotFoundError:
        entries = []
    # Object stores list a folder's own marker object under its name: not an entry.
    entries = [e for e in entries if e.rstrip("/") != root.rstrip("/")]
    if not entries:
        return []
    names = [posixpath.basename(e.rstrip("/")) for e in entries]
    if not overwrite:
        raise ReportDirectoryError(
            f"report folder {directory} is not empty ({', '.join(names[:5])}{', …' if len(names) > 5 else ''}): "
            "an earlier report's figures would stay beside the new ones"
        )
    foreign = [n for n in names if n not in REPORT_ENTRIES]
    if foreign:
        raise ReportDirectoryError(
            f"report folder {directory} holds more than a report ({', '.join(foreign[:5])}{', …' if len(foreign) > 5 else ''}): "
            f"only a folder holding nothing but {', '.join(REPORT_ENTRIES)} is cleared"
        )
    return entries


def write_report(
    result: EvaluationResult,
    directory: str,
    *,
    storage_options: dict | None = None,
    draw_thumbnails: bool = True,
    score_threshold: float = 0.5,
    overwrite: bool = False,
) -> dict[str, str]:
    """Writes the report under `directory` (path or URI); returns {file name: full path}.

    The folder must be empty or new; with `overwrite`, an earlier report in it is deleted
    first (check_report_directory says which folders qualify; ReportDirectoryError if not).
    """
    options = storage_options if storage_options is not None else result.storage_options
    stale = check_report_directory(directory, options, overwrite=overwrite)
    files = render(result, draw_thumbnails=draw_thumbnails, score_threshold=score_threshold)
    fs, root = filesystem(directory, options)
    # Cleared after rendering: a report that fails to render leaves the earlier one whole.
    for entry in stale:
        remove(fs, entry)
    fs.makedirs(posixpath.join(root, FIGURES), exist_ok=True)
    written = {}
    for name, content in files.items():
        path = posixpath.join(root, name)
        with fs.open(path, "wb") as f:
            f.write(content)
        written[name] = full_uri(fs, path)
    return written
