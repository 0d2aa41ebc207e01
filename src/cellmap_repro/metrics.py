"""The challenge's scores on numpy volumes (no I/O): resampling, semantic and instance metrics.

Current scoring (reference section f): semantic tp/fp/fn pooled over crops, IoU per class;
instance predictions relabelled by 26-connected components and matched one-to-one to
the truth by minimum cost ((1 − IoU)·10⁶ per matched pair, 10⁶+1 per unmatched truth),
F1 from pooled counts, Hausdorff distances (nm, capped) normalised as 1.01^(−d/‖voxel‖),
combined = √(F1·H); overall = √(instance mean · semantic mean).

The legacy option reproduces the 2025-04 release used for the baseline's published
figures: per-crop scores, voxel accuracy after Hungarian matching, mean uncapped
Hausdorff, crop-volume-weighted class means, empty/empty IoU = 1, ratio cutoff 50.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

MATCH_SCALE = 1e6
MAX_OVERLAP_PAIRS = 5_000_000
LEGACY_RATIO_CUTOFF = 50.0


def resample_to(pred: np.ndarray, pred_scale, pred_translation, shape, scale, translation, instance: bool) -> np.ndarray:
    """``pred`` on the target grid: nearest for instance ids, linear then > 0.5 for masks.

    Voxel centres map as world = translation + index · scale; target voxels outside the
    prediction get 0. With equal voxel sizes the offset is snapped to whole voxels.
    """
    pred_scale = np.asarray(pred_scale, float)
    scale = np.asarray(scale, float)
    offset = (np.asarray(translation, float) - np.asarray(pred_translation, float)) / pred_scale
    if np.allclose(pred_scale, scale):
        offset = np.round(offset)
        out = np.zeros(tuple(shape), dtype=pred.dtype if instance else np.uint8)
        src_lo = np.maximum(offset, 0).astype(int)
        dst_lo = np.maximum(-offset, 0).astype(int)
        size = np.minimum(np.array(pred.shape) - src_lo, np.array(shape) - dst_lo)
        if np.all(size > 0):
            src = tuple(slice(a, a + s) for a, s in zip(src_lo, size))
            dst = tuple(slice(a, a + s) for a, s in zip(dst_lo, size))
            out[dst] = pred[src] if instance else (pred[src] > 0)
        return out
    matrix = scale / pred_scale
    if instance:
        return ndimage.affine_transform(pred, matrix, offset=offset, output_shape=tuple(shape), order=0, mode="constant", cval=0)
    # One voxel of edge padding: target voxels within half a source voxel of the border
    # interpolate against the border value, not against an implied 0 beyond it.
    padded = np.pad((pred > 0).astype(np.float32), 1, mode="edge")
    resampled = ndimage.affine_transform(padded, matrix, offset=offset + 1, output_shape=tuple(shape), order=1, mode="constant", cval=0.0)
    return (resampled > 0.5).astype(np.uint8)


# ---------------------------------------------------------------- semantic


@dataclass
class SemanticCounts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    voxels: int = 0

    def add(self, other: "SemanticCounts") -> "SemanticCounts":
        return SemanticCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.voxels + other.voxels)

    @property
    def iou(self) -> float:
        denominator = self.tp + self.fp + self.fn
        return 1.0 if denominator == 0 else self.tp / denominator

    @property
    def dice(self) -> float:
        denominator = 2 * self.tp + self.fp + self.fn
        return 1.0 if denominator == 0 else 2 * self.tp / denominator


def semantic_counts(truth: np.ndarray, pred: np.ndarray | None) -> SemanticCounts:
    """Voxel counts for one crop; a missing prediction makes every crop voxel a false negative."""
    if pred is None:
        return SemanticCounts(0, 0, int(truth.size), int(truth.size))
    t, p = truth > 0, pred > 0
    tp = int(np.count_nonzero(t & p))
    return SemanticCounts(tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(t)) - tp, int(truth.size))


# ---------------------------------------------------------------- instance


@dataclass
class InstanceCounts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    distance_scores: list[float] = field(default_factory=list)
    distances: list[float] = field(default_factory=list)
    skipped: str | None = None

    def add(self, other: "InstanceCounts") -> "InstanceCounts":
        return InstanceCounts(
            self.tp + other.tp,
            self.fp + other.fp,
            self.fn + other.fn,
            self.distance_scores + other.distance_scores,
            self.distances + other.distances,
        )

    @property
    def f1(self) -> float:
        denominator = 2 * self.tp + self.fp + self.fn
        if denominator == 0:
            return 1.0
        return 2 * self.tp / denominator

    @property
    def hausdorff_score(self) -> float:
        if not self.distance_scores:
            return 1.0
        return float(np.mean(self.distance_scores))

    @property
    def combined(self) -> float:
        return math.sqrt(self.f1 * self.hausdorff_score)

    @property
    def mean_distance(self) -> float | None:
        finite = [d for d in self.distances if math.isfinite(d)]
        return float(np.mean(finite)) if finite else None


def relabel(pred: np.ndarray, connectivity: int = 26) -> np.ndarray:
    import cc3d

    return cc3d.connected_components(np.ascontiguousarray(pred), connectivity=connectivity, out_dtype=np.uint64)


def overlap_table(truth: np.ndarray, pred: np.ndarray):
    """Truth ids, predicted ids, and IoU for every overlapping (truth, pred) pair."""
    truth_ids, truth_sizes = np.unique(truth[truth > 0], return_counts=True)
    pred_ids, pred_sizes = np.unique(pred[pred > 0], return_counts=True)
    both = (truth > 0) & (pred > 0)
    pairs, intersections = np.unique(np.stack([truth[both], pred[both]]), axis=1, return_counts=True)
    truth_index = {int(i): k for k, i in enumerate(truth_ids)}
    pred_index = {int(i): k for k, i in enumerate(pred_ids)}
    rows = np.array([truth_index[int(i)] for i in pairs[0]], dtype=int) if pairs.size else np.zeros(0, int)
    cols = np.array([pred_index[int(i)] for i in pairs[1]], dtype=int) if pairs.size else np.zeros(0, int)
    unions = truth_sizes[rows] + pred_sizes[cols] - intersections
    return truth_ids, pred_ids, rows, cols, intersections / np.maximum(unions, 1)


def optimal_matching(n_truth: int, n_pred: int, rows, cols, iou) -> list[tuple[int, int]]:
    """The challenge's min-cost one-to-one matching, solved as a maximum-weight assignment.

    Its total cost is Σ_matched (1 − IoU)·10⁶ + (unmatched truths)·(10⁶ + 1)
    = n_truth·(10⁶ + 1) − Σ_matched (1 + IoU·10⁶), so minimising it is maximising
    Σ (1 + 10⁶·IoU) over matchings that use only overlapping pairs. Non-overlapping
    pairs get weight 0, which an optimal assignment never prefers to a real edge, and
    are dropped from the result.
    """
    if n_truth == 0 or n_pred == 0 or len(rows) == 0:
        return []
    weights = np.zeros((n_truth, n_pred))
    weights[rows, cols] = 1.0 + MATCH_SCALE * iou
    chosen_rows, chosen_cols = linear_sum_assignment(weights, maximize=True)
    return [(int(r), int(c)) for r, c in zip(chosen_rows, chosen_cols) if weights[r, c] > 0]


def hausdorff(a: np.ndarray, b: np.ndarray, voxel_size) -> float:
    """Symmetric Hausdorff distance (nm) between two boolean masks; inf if either is empty."""
    if not a.any() or not b.any():
        return math.inf
    region = np.argwhere(a | b)
    lo, hi = region.min(axis=0), region.max(axis=0) + 1
    box = tuple(slice(l, h) for l, h in zip(lo, hi))
    a, b = a[box], b[box]
    to_b = ndimage.distance_transform_edt(~b, sampling=voxel_size)
    to_a = ndimage.distance_transform_edt(~a, sampling=voxel_size)
    return float(max(to_b[a].max(), to_a[b].max()))


def distance_score(distance: float, voxel_size) -> float:
    if not math.isfinite(distance):
        return 0.0
    return float(1.01 ** (-distance / np.linalg.norm(voxel_size)))


def instance_counts(truth: np.ndarray, pred: np.ndarray | None, voxel_size, connectivity: int = 26) -> InstanceCounts:
    """tp/fp/fn and normalised Hausdorff scores of one crop (current scoring)."""
    voxel_size = tuple(float(v) for v in voxel_size)
    truth_ids = np.unique(truth[truth > 0])
    n_truth = len(truth_ids)
    if pred is None:
        return InstanceCounts(0, 0, n_truth, [0.0] * n_truth, [math.inf] * n_truth, skipped="not submitted")
    pred = relabel(pred, connectivity)
    pred_ids = np.unique(pred[pred > 0])
    n_pred = len(pred_ids)
    if n_truth == 0 and n_pred == 0:
        return InstanceCounts()
    d_max = min(v * s for v, s in zip(voxel_size, truth.shape)) / 2
    if n_truth > 0 and n_pred / n_truth > 10 + 50 * math.exp(-n_truth / 5):
        return InstanceCounts(skipped=f"too many predicted instances ({n_pred} for {n_truth})")
    truth_ids, pred_ids, rows, cols, iou = overlap_table(truth, pred)
    if len(rows) > MAX_OVERLAP_PAIRS:
        return InstanceCounts(skipped=f"too many overlapping pairs ({len(rows)})")
    matches = optimal_matching(n_truth, n_pred, rows, cols, iou)
    matched_pred = {t: p for t, p in matches}
    if int(truth.max()) > 4 * n_truth + 1024:
        # sparse ids: renumber so that find_objects' per-id list stays small
        _, dense = np.unique(truth, return_inverse=True)
        truth = dense.reshape(truth.shape).astype(np.uint64)
        truth_ids = np.arange(1, n_truth + 1, dtype=np.uint64)
    # Bounding boxes once, so each distance is computed on the pair's box, not the crop.
    truth_boxes, pred_boxes = ndimage.find_objects(truth), ndimage.find_objects(pred)
    distances = []
    for t_index, t_id in enumerate(truth_ids):
        if t_index in matched_pred:
            p_id = pred_ids[matched_pred[t_index]]
            box = tuple(
                slice(min(a.start, b.start), max(a.stop, b.stop))
                for a, b in zip(truth_boxes[int(t_id) - 1], pred_boxes[int(p_id) - 1])
            )
            d = hausdorff(truth[box] == t_id, pred[box] == p_id, voxel_size)
            distances.append(min(d, d_max))
        else:
            distances.append(d_max)
    distances += [d_max] * (n_pred - len(matches))
    tp = len(matches)
    return InstanceCounts(tp, n_pred - tp, n_truth - tp, [distance_score(d, voxel_size) for d in distances], distances)


# ---------------------------------------------------------------- legacy (2025-04)


def legacy_semantic(truth: np.ndarray, pred: np.ndarray | None) -> dict:
    counts = semantic_counts(truth, pred)
    empty_both = counts.tp + counts.fp + counts.fn == 0
    return {"iou": 1.0 if empty_both else counts.iou, "dice": 1.0 if empty_both else counts.dice}


def legacy_instance(truth: np.ndarray, pred: np.ndarray | None, voxel_size, connectivity: int = 26) -> dict:
    voxel_size = tuple(float(v) for v in voxel_size)
    if pred is None:
        return {"accuracy": 0.0, "hausdorff_distance": math.inf, "normalized_hausdorff_distance": 0.0, "combined_score": 0.0}
    pred = relabel(pred, connectivity)
    truth_ids, pred_ids, rows, cols, iou = overlap_table(truth, pred)
    if len(truth_ids) > 0 and len(pred_ids) / len(truth_ids) > LEGACY_RATIO_CUTOFF:
        return {"accuracy": 0.0, "hausdorff_distance": math.inf, "normalized_hausdorff_distance": 0.0, "combined_score": 0.0}
    remapped = np.zeros_like(truth)
    distances = []
    if len(truth_ids) and len(pred_ids):
        cost = np.zeros((len(truth_ids), len(pred_ids)))
        cost[rows, cols] = iou
        matched_rows, matched_cols = linear_sum_assignment(cost, maximize=True)
        for r, c in zip(matched_rows, matched_cols):
            if cost[r, c] > 0:
                remapped[pred == pred_ids[c]] = truth_ids[r]
    for t_id in truth_ids:
        distances.append(hausdorff(truth == t_id, remapped == t_id, voxel_size))
    accuracy = float(np.mean(truth == remapped))
    mean_distance = float(np.mean(distances)) if distances else 0.0
    normalized = distance_score(mean_distance, voxel_size)
    return {
        "accuracy": accuracy,
        "hausdorff_distance": mean_distance,
        "normalized_hausdorff_distance": normalized,
        "combined_score": math.sqrt(accuracy * normalized),
    }


def overall(instance_scores: list[float], semantic_scores: list[float]) -> dict:
    """Plain means per group; overall is their geometric mean (or the one group scored)."""
    instance = float(np.mean(instance_scores)) if instance_scores else None
    semantic = float(np.mean(semantic_scores)) if semantic_scores else None
    if instance is not None and semantic is not None:
        total = math.sqrt(instance * semantic)
    else:
        total = instance if instance is not None else semantic
    return {"overall_score": total, "overall_instance_score": instance, "overall_semantic_score": semantic}
