"""COCO instance evaluation (`bbox` and `segm`) with pycocotools' COCOeval semantics, exactly.

The numbers equal `COCOeval(gt, dt, iou_type)` → evaluate → accumulate → summarize run on
the same data (tests assert equality, not closeness). What is the same:

- IoUs come from `pycocotools.mask.iou` (crowd ground truth: intersection over the
  detection's area), detections sorted by score (stable) and cut at maxDets[-1] per image
  and category;
- ground truth is ignored when crowd or outside the area range (by its json `area`);
  unmatched detections outside the area range are ignored. A detection's area is its box
  area w·h for both IoU types by default (`segm_area="box"`): what `COCO.loadRes` computes
  for results that carry a bbox, as `rayseg export coco` and detectron2's COCOEvaluator
  write them, so `segm` APs/APm/APl equal pycocotools on the export and published numbers.
  `segm_area="mask"` puts `segm` detections in the area ranges by their mask area instead
  (what loadRes does for results with a segmentation and no bbox);
- the greedy matching per IoU threshold (highest-scoring detection first, the best-IoU
  available ground truth, ties to the later one, regular ground truth before ignored
  ground truth, crowds matchable many times), and the gt-id-0 quirk (a match to an
  annotation with id 0 counts as unmatched);
- accumulate: per category and area range, detections of all images cut at maxDet per
  image, ordered by score with ties in image-id order then per-image rank (COCOeval's
  mergesort over the concatenation), precision made monotone, sampled at the 101 recall
  thresholds; summarize: the 12 standard numbers.

What is different is the speed: matching runs for all (image, category) groups of a shard
at once — groups with the same number of ground truths are stacked and the detections of
rank r of every group are matched in one set of numpy operations over (group, area range,
IoU threshold, ground truth) — instead of Python loops per image, category, area range,
threshold, detection and ground truth. Per-image results are compact arrays per
detection (matched / ignored flags per area range and threshold), which merge by
concatenation; accumulate sorts them once per category.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import Params

from ..coco_masks import annotation_rle
from ..run_reader import Prediction
from .base import DatasetEvaluator, RankedImage, finite_or_none, fits
from .data import InstanceImage

IOU_TYPES = ("segm", "bbox")
# What puts a `segm` detection in the small / medium / large area ranges (module docstring).
SEGM_AREAS = ("box", "mask")
STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
# The score thresholds of `score_curve` (precision / recall / F1 against the threshold).
SCORE_THRESHOLDS = [round(i / 100, 2) for i in range(101)]
# match_image: a detection or ground truth matched to nothing (a false positive, a miss), and
# one the per-image counts leave out (a detection below the threshold, of a class not
# evaluated or matched to a crowd region; crowd ground truth).
UNMATCHED = -1
NOT_COUNTED = -2


def default_params(iou_type: str = "segm") -> Params:
    """pycocotools' own parameters: IoU thresholds .5:.05:.95, 101 recall points, areas, maxDets."""
    return Params(iouType=iou_type)


@dataclass
class _Group:
    """One (image, category) of one IoU type, ready for matching."""

    order: int  # image order (COCOeval sorts image ids)
    category: int  # index into the category list
    ious: np.ndarray  # (D, G) float64, detections in score order
    scores: np.ndarray  # (D,) float64, descending (stable)
    dt_area: np.ndarray  # (D,)
    gt_area: np.ndarray  # (G,)
    gt_crowd: np.ndarray  # (G,) bool
    gt_nonzero: np.ndarray  # (G,) bool: annotation id != 0
    image: int  # index of the image within this process() call
    first: int = 0  # position of the group's first detection in the image's `dts` (match_image)
    gt_columns: np.ndarray | None = None  # the group's ground truth, as indices into the image's kept annotations


@dataclass
class ImageMatches:
    """How one image's detections and ground truth matched at IoU 0.5, as its ranking counts them."""

    detections: np.ndarray  # per prediction row: index into gt.annotations of its match, UNMATCHED or NOT_COUNTED
    ground_truths: np.ndarray  # per gt annotation: the prediction row matched to it, UNMATCHED or NOT_COUNTED

    @property
    def counts(self) -> dict[str, int]:
        """tp / fp / fn, as in the image's ranking detail."""
        return {
            "tp": int((self.detections >= 0).sum()),
            "fp": int((self.detections == UNMATCHED).sum()),
            "fn": int((self.ground_truths == UNMATCHED).sum()),
        }


class _Records:
    """Per-detection matching records of one IoU type, plus per (category, area) gt counts.

    Chunks (one per process() call) of: category index, image order, rank within the
    image's category group, score, matched (n, A, T) and ignored (n, A, T).
    """

    def __init__(self, categories: int, areas: int) -> None:
        self.chunks: list[tuple[np.ndarray, ...]] = []
        self.npig = np.zeros((categories, areas), dtype=np.int64)
        self.present = np.zeros(categories, dtype=bool)

    def merge(self, other: "_Records") -> None:
        self.chunks.extend(other.chunks)
        self.npig += other.npig
        self.present |= other.present

    def columns(self):
        if not self.chunks:
            return None
        return [np.concatenate([chunk[i] for chunk in self.chunks]) for i in range(6)]


class InstanceEvaluator(DatasetEvaluator):
    """COCO `segm` and `bbox` evaluation (module docstring); categories are the GT json's."""

    task = "instance"

    def __init__(
        self,
        categories: list[dict],
        *,
        iou_types: tuple[str, ...] = IOU_TYPES,
        ranking_k: int = 6,
        ranking_score_threshold: float = 0.5,
        segm_area: str = "box",
    ) -> None:
        unknown = set(iou_types) - set(IOU_TYPES)
        if unknown or not iou_types:
            raise ValueError(f"iou_types must be among {IOU_TYPES}, got {iou_types}")
        if segm_area not in SEGM_AREAS:
            raise ValueError(f"segm_area must be one of {', '.join(SEGM_AREAS)}, got {segm_area!r}")
        self.iou_types = tuple(iou_types)
        self.segm_area = segm_area
        # COCOeval's p.catIds: sorted unique ids of the ground truth's categories.
        by_id = {c["id"]: c for c in categories}
        self.categories = [by_id[i] for i in sorted(by_id)]
        self.category_index = {c["id"]: k for k, c in enumerate(self.categories)}
        self._category_ids = np.array([c["id"] for c in self.categories], dtype=np.int64)
        self.params = default_params()
        self.area_ranges = np.asarray(self.params.areaRng, dtype=np.float64)
        self.iou_thresholds = np.asarray(self.params.iouThrs, dtype=np.float64)
        self.max_dets = sorted(self.params.maxDets)
        self.ranking_score_threshold = ranking_score_threshold
        super().__init__(ranking_k)

    def _reset(self) -> None:
        K, A = len(self.categories), len(self.area_ranges)
        self.records = {iou_type: _Records(K, A) for iou_type in self.iou_types}
        self.detections = np.zeros(K, dtype=np.int64)
        self.ground_truths = np.zeros(K, dtype=np.int64)

    # --- process ----------------------------------------------------------------------------

    def process(self, ground_truths, predictions) -> None:
        """Evaluates a batch of images: groups are built per image, matched together."""
        self._batch_groups = {iou_type: [] for iou_type in self.iou_types}
        self._batch_images: list[tuple[InstanceImage, Prediction]] = []
        self._batch_counts: list[tuple[np.ndarray, np.ndarray]] = []
        super().process(ground_truths, predictions)
        if self._batch_counts:
            K = len(self.categories)
            self.ground_truths += np.bincount(np.concatenate([c[0] for c in self._batch_counts]), minlength=K)
            self.detections += np.bincount(np.concatenate([c[1] for c in self._batch_counts]), minlength=K)
        for iou_type, groups in self._batch_groups.items():
            per_image = self._match_and_store(iou_type, groups)
            if iou_type == self.quality_type:
                self._rank_images(per_image)
        del self._batch_groups, self._batch_images, self._batch_counts

    @property
    def quality_type(self) -> str:
        """The IoU type that ranks the images and marks their thumbnails: segm when evaluated."""
        return "segm" if "segm" in self.iou_types else self.iou_types[0]

    def _process_one(self, gt: InstanceImage, prediction: Prediction) -> None:
        prediction = self._mismatch(prediction, gt.height, gt.width)
        image = len(self._batch_images)
        self._batch_images.append((gt, prediction))
        counts, groups, _ = self._image_groups(gt, prediction, image, self.iou_types)
        self._batch_counts.append(counts)
        for iou_type, image_groups in groups.items():
            self._batch_groups[iou_type].extend(image_groups)

    def _image_groups(self, gt: InstanceImage, prediction: Prediction, image: int, iou_types: tuple[str, ...]):
        """One image's (gt, detection) category counts, its groups per IoU type, and `dts`:
        the prediction rows the groups' detections are, group by group (touches no state)."""
        groups: dict[str, list[_Group]] = {iou_type: [] for iou_type in iou_types}
        # Ground truth of the evaluated categories, in json order (COCO.getAnnIds order).
        index = self.category_index
        anns = [a for a in gt.annotations if a.get("category_id") in index]
        gt_cat = np.array([index[a["category_id"]] for a in anns], dtype=np.int64)
        gt_crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
        # Detections of the evaluated categories, grouped by category, by descending score,
        # ties in row order (COCOeval's stable sort), at most maxDets[-1] per category.
        if len(self._category_ids):
            position = np.minimum(np.searchsorted(self._category_ids, prediction.category_id), len(self._category_ids) - 1)
            known = self._category_ids[position] == prediction.category_id
        else:
            position = known = np.zeros(len(prediction), dtype=bool)
        dts = np.nonzero(known)[0]
        dt_cat = position[dts]
        counts = (gt_cat[~gt_crowd], dt_cat)
        order = np.lexsort((-prediction.score[dts], dt_cat))
        dts, dt_cat = dts[order], dt_cat[order]
        starts = np.searchsorted(dt_cat, dt_cat, side="left")
        keep = (np.arange(len(dts)) - starts) < self.max_dets[-1]
        dts, dt_cat = dts[keep], dt_cat[keep]
        categories = np.array(sorted(set(gt_cat.tolist()) | set(dt_cat.tolist())), dtype=np.int64)
        if not len(categories):
            return counts, groups, dts
        scores = prediction.score[dts]
        crowd_list = gt_crowd.astype(np.uint8)
        gt_area = np.array([a["area"] for a in anns], dtype=np.float64)
        gt_nonzero = np.array([a.get("id") != 0 for a in anns], dtype=bool)
        dt_bounds = np.searchsorted(dt_cat, np.append(categories, len(self.categories)), side="left")
        gt_columns = [np.nonzero(gt_cat == k)[0] for k in categories]
        for iou_type in iou_types:
            # One IoU matrix per image (all detections × all ground truth), sliced per category.
            # loadRes's w·h of the exported float32 box, in float64 as Python computes it.
            box_area = prediction.bbox[dts, 2] * prediction.bbox[dts, 3]
            if iou_type == "segm":
                d = [prediction.rle_dict(i) for i in dts.tolist()]
                g = [annotation_rle(a, gt.height, gt.width) for a in anns]
                if self.segm_area == "box":
                    dt_area = box_area
                else:
                    dt_area = mask_utils.area(d).astype(np.float64) if d else np.zeros(0)
            else:
                # Boxes as (n, 4) arrays: pycocotools takes them as they are.
                d = prediction.bbox[dts]
                g = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(len(anns), 4)
                dt_area = box_area
            ious = np.asarray(mask_utils.iou(d, g, crowd_list)) if len(d) and len(g) else np.zeros(0)
            ious = ious.reshape(len(d), len(g))
            for j, k in enumerate(categories.tolist()):
                a, b = dt_bounds[j], dt_bounds[j + 1]
                cols = gt_columns[j]
                groups[iou_type].append(
                    _Group(
                        gt.order, k, ious[a:b][:, cols], scores[a:b], dt_area[a:b],
                        gt_area[cols], gt_crowd[cols], gt_nonzero[cols], image, int(a), cols,
                    )
                )
        return counts, groups, dts

    def _match_and_store(self, iou_type: str, groups: list[_Group]) -> dict[int, tuple[int, int, int]]:
        """Matches all groups, appends the records; returns per-image (tp, fp, fn) for ranking."""
        records = self.records[iou_type]
        if not groups:
            return {}
        det_group, det_rank, det_score, matched, ignored, npig = match_groups(groups, self.iou_thresholds, self.area_ranges)
        group_cat = np.array([g.category for g in groups], dtype=np.int64)
        group_order = np.array([g.order for g in groups], dtype=np.int64)
        group_image = np.array([g.image for g in groups], dtype=np.int64)
        np.add.at(records.npig, group_cat, npig)
        records.present[group_cat] = True
        if len(det_group):
            records.chunks.append(
                (group_cat[det_group].astype(np.int32), group_order[det_group], det_rank, det_score, matched, ignored)
            )
        # Ranking: IoU .5, all areas, detections scoring at least the threshold.
        images = len(self._batch_images)
        confident = det_score >= self.ranking_score_threshold
        counted = ~ignored[:, 0, 0] & confident
        det_image = group_image[det_group]
        tp = np.bincount(det_image, weights=matched[:, 0, 0] & counted, minlength=images)
        fp = np.bincount(det_image, weights=~matched[:, 0, 0] & counted, minlength=images)
        fn = np.bincount(group_image, weights=npig[:, 0], minlength=images) - tp
        return {i: (int(tp[i]), int(fp[i]), int(fn[i])) for i in range(images)}

    def _rank_images(self, per_image: dict) -> None:
        for image, (gt, prediction) in enumerate(self._batch_images):
            tp, fp, fn = per_image.get(image, (0, 0, 0))
            if tp + fp + fn == 0:
                continue
            f1 = 2 * tp / (2 * tp + fp + fn)
            self.ranking.add(
                RankedImage(f1, str(gt.id), prediction.image_id, prediction.location, {"tp": tp, "fp": fp, "fn": fn})
            )

    def match_image(self, gt: InstanceImage, prediction: Prediction, score_threshold: float | None = None) -> ImageMatches:
        """The matching of one image, by the evaluation's own code (the ranking's IoU type, IoU
        0.5, area all), for drawing it: which detections scoring at least `score_threshold`
        (default: the ranking's) matched which ground truth. Changes no state.

        Detections are matched by descending score, so those above the threshold match as
        they did among all of them, and the counts equal the image's ranking detail.
        """
        threshold = self.ranking_score_threshold if score_threshold is None else score_threshold
        if not fits(prediction, gt.height, gt.width):
            prediction = prediction.without_segments()
        iou_type = self.quality_type
        _, groups, dts = self._image_groups(gt, prediction, 0, (iou_type,))
        kept = np.array([i for i, a in enumerate(gt.annotations) if a.get("category_id") in self.category_index], dtype=np.int64)
        detections = np.full(len(prediction), NOT_COUNTED, dtype=np.int64)
        ground_truths = np.full(len(gt.annotations), NOT_COUNTED, dtype=np.int64)
        regular = [i for i in kept.tolist() if not gt.annotations[i].get("iscrowd", 0)]
        ground_truths[regular] = UNMATCHED
        groups = groups[iou_type]
        if groups:
            det_group, det_rank, det_score, matched, ignored, _, det_gt = match_groups(
                groups, self.iou_thresholds, self.area_ranges, with_gt=True
            )
            # [:, 0, 0]: area range "all", IoU threshold 0.5 (the ranking's).
            counted = ~ignored[:, 0, 0] & (det_score >= threshold)
            for d in np.nonzero(counted)[0].tolist():
                group = groups[det_group[d]]
                row = int(dts[group.first + det_rank[d]])
                if matched[d, 0, 0]:
                    annotation = int(kept[group.gt_columns[det_gt[d, 0, 0]]])
                    detections[row] = annotation
                    ground_truths[annotation] = row
                else:
                    detections[row] = UNMATCHED
        return ImageMatches(detections, ground_truths)

    def score_curve(self, iou_type: str) -> dict:
        """Precision, recall and F1 of the detections scoring at least t, for t in SCORE_THRESHOLDS.

        From the records accumulate reads (each image's top 100 detections per class, matched
        by COCOeval's rules) at IoU 0.5, area all, pooled over classes: a detection of a class
        without ground truth is a false positive, one matched to a crowd region is not counted.
        None where undefined (no detection at t: precision; no ground truth: recall and F1).
        """
        records = self.records[iou_type]
        ground_truths = int(records.npig[:, 0].sum())
        columns = records.columns()
        if columns is None:
            scores, hits = np.zeros(0), np.zeros(0, dtype=bool)
        else:
            _, _, _, score, matched, ignored = columns
            counted = ~ignored[:, 0, 0]
            scores, hits = score[counted], matched[counted, 0, 0]
        order = np.argsort(-scores, kind="stable")
        # tp among the n best-scoring detections; those scoring ≥ t are the n(t) best.
        tp_of_n = np.concatenate([[0], np.cumsum(hits[order])])
        n = len(scores) - np.searchsorted(np.sort(scores), np.array(SCORE_THRESHOLDS), side="left")
        tp = tp_of_n[n]
        fp = n - tp
        fn = ground_truths - tp
        return {
            "iou": 0.5,
            "thresholds": list(SCORE_THRESHOLDS),
            "precision": [float(t / k) if k else None for t, k in zip(tp, n)],
            "recall": [float(t / ground_truths) if ground_truths else None for t in tp],
            "f1": [float(2 * t / (2 * t + f + m)) if ground_truths else None for t, f, m in zip(tp, fp, fn)],
            "tp": [int(t) for t in tp],
            "fp": [int(f) for f in fp],
            "ground_truths": ground_truths,
        }

    def _merge(self, other: "InstanceEvaluator") -> None:
        for iou_type in self.iou_types:
            self.records[iou_type].merge(other.records[iou_type])
        self.detections += other.detections
        self.ground_truths += other.ground_truths

    # --- accumulate and summarize ------------------------------------------------------------

    def accumulate(self, iou_type: str) -> dict:
        """COCOeval.accumulate's precision (T,R,K,A,M), recall (T,K,A,M) and scores arrays."""
        p = self.params
        T, R, K, A, M = len(p.iouThrs), len(p.recThrs), len(self.categories), len(p.areaRng), len(self.max_dets)
        precision = -np.ones((T, R, K, A, M))
        recall = -np.ones((T, K, A, M))
        scores_out = -np.ones((T, R, K, A, M))
        records = self.records[iou_type]
        columns = records.columns()
        if columns is not None:
            cat, order, rank, score, matched, ignored = columns
            by_category = np.argsort(cat, kind="stable")
            bounds = np.searchsorted(cat[by_category], np.arange(K + 1), side="left")
        for k in range(K):
            if not records.present[k]:
                continue
            if columns is not None:
                idx = by_category[bounds[k] : bounds[k + 1]]
                # COCOeval: concatenation in image order (then per-image rank), then a stable
                # sort by descending score.
                idx = idx[np.lexsort((rank[idx], order[idx], -score[idx]))]
            else:
                idx = np.zeros(0, dtype=np.int64)
            for a in range(A):
                npig = int(records.npig[k, a])
                if npig == 0:
                    continue
                for m, max_det in enumerate(self.max_dets):
                    sel = idx[rank[idx] < max_det] if len(idx) else idx
                    nd = len(sel)
                    dt_scores = score[sel] if nd else np.zeros(0)
                    if nd:
                        dtm = matched[sel, a, :].T
                        dtig = ignored[sel, a, :].T
                    else:
                        dtm = dtig = np.zeros((T, 0), dtype=bool)
                    tps = np.logical_and(dtm, np.logical_not(dtig))
                    fps = np.logical_and(np.logical_not(dtm), np.logical_not(dtig))
                    tp_sum = np.cumsum(tps, axis=1).astype(dtype=float)
                    fp_sum = np.cumsum(fps, axis=1).astype(dtype=float)
                    rc = tp_sum / npig
                    pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
                    recall[:, k, a, m] = rc[:, -1] if nd else 0
                    if nd:
                        # The precision envelope (COCOeval's backwards loop): suffix maxima.
                        pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
                    for t in range(T):
                        inds = np.searchsorted(rc[t], p.recThrs, side="left")
                        valid = inds < nd
                        q = np.zeros(R)
                        ss = np.zeros(R)
                        q[valid] = pr[t, inds[valid]]
                        ss[valid] = dt_scores[inds[valid]]
                        precision[t, :, k, a, m] = q
                        scores_out[t, :, k, a, m] = ss
        return {"precision": precision, "recall": recall, "scores": scores_out, "counts": [T, R, K, A, M]}

    def summarize(self, accumulated: dict, categories: slice | None = None) -> np.ndarray:
        """COCOeval.summarize's 12 numbers (-1 where undefined), optionally for some categories."""
        p = self.params
        precision_all = accumulated["precision"]
        recall_all = accumulated["recall"]
        if categories is not None:
            precision_all = precision_all[:, :, categories]
            recall_all = recall_all[:, categories]
        max_dets = self.max_dets

        def _summarize(ap=1, iouThr=None, areaRng="all", maxDets=100):
            aind = [i for i, aRng in enumerate(p.areaRngLbl) if aRng == areaRng]
            mind = [i for i, mDet in enumerate(max_dets) if mDet == maxDets]
            if ap == 1:
                s = precision_all
                if iouThr is not None:
                    t = np.where(iouThr == p.iouThrs)[0]
                    s = s[t]
                s = s[:, :, :, aind, mind]
            else:
                s = recall_all
                if iouThr is not None:
                    t = np.where(iouThr == p.iouThrs)[0]
                    s = s[t]
                s = s[:, :, aind, mind]
            if len(s[s > -1]) == 0:
                mean_s = -1
            else:
                mean_s = np.mean(s[s > -1])
            return mean_s

        stats = np.zeros((12,))
        stats[0] = _summarize(1)
        stats[1] = _summarize(1, iouThr=0.5, maxDets=max_dets[2])
        stats[2] = _summarize(1, iouThr=0.75, maxDets=max_dets[2])
        stats[3] = _summarize(1, areaRng="small", maxDets=max_dets[2])
        stats[4] = _summarize(1, areaRng="medium", maxDets=max_dets[2])
        stats[5] = _summarize(1, areaRng="large", maxDets=max_dets[2])
        stats[6] = _summarize(0, maxDets=max_dets[0])
        stats[7] = _summarize(0, maxDets=max_dets[1])
        stats[8] = _summarize(0, maxDets=max_dets[2])
        stats[9] = _summarize(0, areaRng="small", maxDets=max_dets[2])
        stats[10] = _summarize(0, areaRng="medium", maxDets=max_dets[2])
        stats[11] = _summarize(0, areaRng="large", maxDets=max_dets[2])
        return stats

    def evaluate(self) -> dict:
        """Per IoU type: the 12 COCO stats (named and raw), per-category numbers, PR curves."""
        results: dict = {"iou_types": list(self.iou_types), "segm_area": self.segm_area}
        recall_thresholds = [float(r) for r in self.params.recThrs]
        for iou_type in self.iou_types:
            accumulated = self.accumulate(iou_type)
            stats = self.summarize(accumulated)
            precision = accumulated["precision"]
            per_category = []
            curves = {}
            for k, category in enumerate(self.categories):
                category_stats = self.summarize(accumulated, slice(k, k + 1))
                per_category.append(
                    {
                        "id": category["id"],
                        "name": category.get("name", str(category["id"])),
                        **{name: _metric(v) for name, v in zip(STAT_NAMES, category_stats)},
                        "ground_truths": int(self.ground_truths[k]),
                        "detections": int(self.detections[k]),
                    }
                )
                curves[str(category["id"])] = {
                    "iou50": _curve(precision[0, :, k, 0, -1]),
                    "iou75": _curve(precision[5, :, k, 0, -1]),
                }
            results[iou_type] = {
                "stats": [float(s) for s in stats],
                **{name: _metric(v) for name, v in zip(STAT_NAMES, stats)},
                "per_category": per_category,
                "pr_curves": {"recall": recall_thresholds, "per_category": curves},
                "score_curve": self.score_curve(iou_type),
            }
        return results


def _metric(value: float) -> float | None:
    """COCO's -1 (no ground truth) becomes null."""
    return None if value == -1 else finite_or_none(value)


def _curve(values: np.ndarray) -> list[float] | None:
    return None if (values == -1).all() else [float(v) for v in values]


def match_groups(groups: list[_Group], iou_thresholds: np.ndarray, area_ranges: np.ndarray, *, with_gt: bool = False):
    """COCOeval.evaluateImg's greedy matching for many (image, category) groups at once.

    Returns, for every detection of every group: its group index, its rank within the
    group, its score, matched (n, A, T) bool (COCOeval's dtMatches != 0) and ignored
    (n, A, T) bool (dtIgnore); and per group the count of non-ignored ground truths
    (groups, A) (what accumulate calls npig). With `with_gt`, also the ground truth each
    detection took, (n, A, T) int: its column in the group's `ious`, -1 for none.

    Groups with the same number G of ground truths are stacked; sorted by their number of
    detections (descending), the groups still having a detection of rank r are a prefix,
    so step r matches all of them at once over (group, area, threshold, gt) arrays.
    """
    A, T = len(area_ranges), len(iou_thresholds)
    # COCOeval: iou = min([t, 1 - 1e-10]); a gt is a candidate when its IoU is not below it.
    thresholds = np.array([min([t, 1 - 1e-10]) for t in iou_thresholds.tolist()], dtype=np.float64)
    lo, hi = area_ranges[:, 0], area_ranges[:, 1]
    npig = np.zeros((len(groups), A), dtype=np.int64)
    out_group, out_rank, out_score, out_matched, out_ignored, out_gt = [], [], [], [], [], []
    buckets: dict[int, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        buckets[group.ious.shape[1]].append(index)
    reverse = slice(None, None, -1)
    for G, members in buckets.items():
        members.sort(key=lambda i: -len(groups[i].scores))
        members_arr = np.array(members, dtype=np.int64)
        P = len(members)
        sizes = np.array([len(groups[i].scores) for i in members], dtype=np.int64)
        D = int(sizes[0])
        if G:
            gt_area = np.stack([groups[i].gt_area for i in members])
            crowd = np.stack([groups[i].gt_crowd for i in members])
            nonzero = np.stack([groups[i].gt_nonzero for i in members])
        else:
            gt_area, crowd, nonzero = np.zeros((P, 0)), np.zeros((P, 0), bool), np.zeros((P, 0), bool)
        # gt ignore per area range: crowd, or area outside the range (P, A, G).
        gt_ignore = crowd[:, None, :] | (gt_area[:, None, :] < lo[None, :, None]) | (gt_area[:, None, :] > hi[None, :, None])
        npig[members_arr] = (~gt_ignore).sum(axis=-1)
        if D == 0:
            continue
        dt_area = np.zeros((P, D))
        scores = np.zeros((P, D))
        ious = np.zeros((P, D, G))
        for row, i in enumerate(members):
            n = sizes[row]
            if n:
                dt_area[row, :n] = groups[i].dt_area
                scores[row, :n] = groups[i].scores
                ious[row, :n] = groups[i].ious
        dt_out = (dt_area[:, :, None] < lo[None, None, :]) | (dt_area[:, :, None] > hi[None, None, :])  # (P, D, A)
        dtm = np.zeros((P, D, A, T), dtype=bool)
        dtig = np.zeros((P, D, A, T), dtype=bool)
        dt_gt = np.full((P, D, A, T), -1, dtype=np.int32) if with_gt else None
        if G:
            gt_taken = np.zeros((P, A, T, G), dtype=bool)
            regular = ~gt_ignore[:, :, None, :]  # (P, A, 1, G)
            for r in range(D):
                n = int((sizes > r).sum())  # groups with a detection of rank r: a prefix
                row = ious[:n, r, :]  # (n, G)
                candidate = (row[:, None, None, :] >= thresholds[None, None, :, None]) & (
                    ~gt_taken[:n] | crowd[:n, None, None, :]
                )  # (n, A, T, G)
                reg = candidate & regular[:n]
                ign = candidate & ~regular[:n]
                values = row[:, None, None, reverse]
                # Best IoU, ties to the later ground truth: argmax over the reversed gt axis;
                # regular ground truth first, ignored ground truth only when none matches.
                best_reg = G - 1 - np.argmax(np.where(reg[..., reverse], values, -1.0), axis=-1)
                best_ign = G - 1 - np.argmax(np.where(ign[..., reverse], values, -1.0), axis=-1)
                best = np.where(reg.any(axis=-1), best_reg, np.where(ign.any(axis=-1), best_ign, -1))  # (n, A, T)
                pi, ai, ti = np.nonzero(best >= 0)
                gi = best[pi, ai, ti]
                gt_taken[pi, ai, ti, gi] = True
                dtig[pi, r, ai, ti] = gt_ignore[pi, ai, gi]
                dtm[pi, r, ai, ti] = nonzero[pi, gi]
                if with_gt:
                    dt_gt[pi, r, ai, ti] = gi
        # Unmatched detections outside the area range are ignored.
        dtig |= ~dtm & dt_out[:, :, :, None]
        pi, ri = np.nonzero(np.arange(D)[None, :] < sizes[:, None])
        out_group.append(members_arr[pi])
        out_rank.append(ri.astype(np.int32))
        out_score.append(scores[pi, ri])
        out_matched.append(dtm[pi, ri])
        out_ignored.append(dtig[pi, ri])
        if with_gt:
            out_gt.append(dt_gt[pi, ri])
    if not out_group:
        empty = np.zeros((0, A, T), dtype=bool)
        out = (np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0), empty, empty, npig)
        return out + (np.zeros((0, A, T), np.int32),) if with_gt else out
    out = (
        np.concatenate(out_group),
        np.concatenate(out_rank),
        np.concatenate(out_score),
        np.concatenate(out_matched),
        np.concatenate(out_ignored),
        npig,
    )
    return out + (np.concatenate(out_gt),) if with_gt else out
