"""The challenge's scores on numpy volumes (no I/O): resampling, semantic and instance metrics.

Current scoring (reference section f, toolbox ``utils/eval_utils`` at HEAD): semantic
tp/fp/fn pooled over crops, IoU per class; instance predictions relabelled by 26-connected
components and matched one-to-one to the truth by minimum cost (⌊(1 − IoU)·10⁶⌋ per matched
pair, 10⁶+1 per unmatched truth), F1 from pooled counts, Hausdorff distances (nm, capped)
normalised as 1.01^(−d/‖voxel‖), combined = √(F1·H); overall = √(instance mean · semantic mean).

The legacy option reproduces the 2025-04 release (commit 6b5a29d) used for the baseline's
published figures: per-crop scores, voxel accuracy after Hungarian matching, mean uncapped
Hausdorff, crop-volume-weighted class means, empty/empty IoU = 1, ratio cutoff 50.

Both reproduce the toolbox's quirks where they change a score, each marked "as the toolbox
does" below, so that figures here can be compared with the leaderboard's.

Geometry has two modes. The default (``resample_to``) maps voxel centres exactly. The
leaderboard's (``toolbox_align``, ``--leaderboard``) is the toolbox's own at commit
``TOOLBOX_COMMIT``: ``skimage.transform.rescale`` (anti-aliased when shrinking, clipped to the
input's range), floor-snapped translations, centre pad/crop when the voxel size is unknown,
and its instance matching by OR-Tools min-cost flow on the same arcs (``ortools_matching``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

MATCH_SCALE = 1_000_000
MAX_OVERLAP_PAIRS = 5_000_000
LEGACY_RATIO_CUTOFF = 50.0

TOOLBOX_REPOSITORY = "janelia-cellmap/cellmap-segmentation-challenge"
TOOLBOX_COMMIT = "6b9ad68"  # the evaluator that current scoring and --leaderboard follow
LEGACY_COMMIT = "6b5a29d"  # the 2025-04 release that --scoring legacy follows
# The toolbox refuses a source more than 16³ times larger than the crop, and resamples a
# source over 500 MB (counted as float32) in cubes of ⌊(100 MiB / 4 B)^⅓⌋ = 297 voxels.
MAX_VOLUME_RATIO = 16.0**3
CHUNKED_ABOVE_VOXELS = 500 * 1024 * 1024 // 4
CHUNK_EDGE = max(32, int((100 * 1024 * 1024 / 4) ** (1 / 3)))
# Beyond this many truth ids the toolbox's flow graph (one node per id up to the largest)
# is not built; matching falls back to scipy.
MAX_FLOW_TRUTH_NODES = 10_000_000


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
    # 'grid-constant' treats each source voxel as a cube, so target centres within half a
    # source voxel of the border still sample it ('constant' would return 0 there), as
    # skimage's rescale in the toolbox does.
    if instance:
        return ndimage.affine_transform(pred, matrix, offset=offset, output_shape=tuple(shape), order=0, mode="grid-constant", cval=0)
    mask = (pred > 0).astype(np.float32)
    resampled = ndimage.affine_transform(mask, matrix, offset=offset, output_shape=tuple(shape), order=1, mode="grid-constant", cval=0.0)
    return (resampled > 0.5).astype(np.uint8)


def extent(scale, translation, shape) -> tuple[np.ndarray, np.ndarray]:
    """World box (nm) covered by a grid whose voxel 0 is centred at ``translation``."""
    low = np.asarray(translation, float) - np.asarray(scale, float) / 2
    return low, low + np.asarray(scale, float) * np.asarray(shape, float)


def covers(pred_scale, pred_translation, pred_shape, scale, translation, shape) -> bool:
    """Whether a prediction's box contains the target's, within half a prediction voxel."""
    low, high = extent(pred_scale, pred_translation, pred_shape)
    want_low, want_high = extent(scale, translation, shape)
    slack = np.asarray(pred_scale, float) / 2
    return bool(np.all(low - slack <= want_low) and np.all(high + slack >= want_high))


def aligned_translation(pred_scale, shape, scale, translation) -> tuple[float, ...]:
    """A prediction without a translation starts where the crop starts: box corners aligned."""
    low = np.asarray(translation, float) - np.asarray(scale, float) / 2
    return tuple((low + np.asarray(pred_scale, float) / 2).tolist())


def centre_pad_crop(image: np.ndarray, shape) -> np.ndarray:
    """Pad with 0 or crop, centred, to ``shape``: the toolbox's guess when a voxel size is unknown."""
    pads = [((t - s) // 2, t - s - (t - s) // 2) if s < t else (0, 0) for s, t in zip(image.shape, shape)]
    if any(p for pair in pads for p in pair):
        image = np.pad(image, pads, mode="constant", constant_values=0)
    starts = [(s - t) // 2 if s > t else 0 for s, t in zip(image.shape, shape)]
    return image[tuple(slice(a, a + t) for a, t in zip(starts, shape))]


# ---------------------------------------------------------------- the leaderboard's geometry


def toolbox_rescale(image: np.ndarray, factors, order: int) -> np.ndarray:
    """``skimage.transform.rescale(image, factors, order, mode="constant", preserve_range=True)``.

    As scikit-image documents and does: the output shape is round(factor · shape), at least
    1; unless the input is bool, or integer with order 0, shrinking any axis first smooths
    with a Gaussian of sigma = max(0, (in/out − 1)/2) per axis (0 outside); then
    ``ndimage.zoom`` in grid mode (voxel boxes, not centres, span the same extent; 0 outside);
    last, values are clipped to the input's range, widened to 0 only where the output
    reaches 0. So an all-foreground mask stays all foreground, border blending included.
    """
    shape_in = np.array(image.shape)
    shape_out = np.maximum(np.round(np.asarray(factors, float) * shape_in), 1).astype(int)
    source_type = image.dtype
    if source_type == np.float16:
        image = image.astype(np.float32)
    smooth = source_type != bool and not (np.issubdtype(source_type, np.integer) and order == 0) and bool(np.any(shape_out < shape_in))
    if order > 0 and image.dtype.char not in "df":
        image = image.astype(np.float64)
    ratio = shape_in / shape_out
    filtered = ndimage.gaussian_filter(image, np.maximum(0, (ratio - 1) / 2), mode="grid-constant", cval=0) if smooth else image
    out = ndimage.zoom(filtered, 1 / ratio, order=order, mode="grid-constant", cval=0, grid_mode=True)
    lowest, highest = (np.nanmin, np.nanmax) if np.isnan(np.min(image)) else (np.min, np.max)
    low, high = lowest(image), highest(image)
    if not low <= 0 <= high and lowest(out) <= 0 <= highest(out):
        low, high = min(low, image.dtype.type(0)), max(high, image.dtype.type(0))
    np.clip(out, np.asarray(low), np.asarray(high), out=out)
    return out


def toolbox_resample(image: np.ndarray, factors, instance: bool) -> np.ndarray:
    """The toolbox's resampling of one array: nearest ids, or linear then > 0.5."""
    if instance:
        return toolbox_rescale(image, factors, 0).astype(image.dtype)
    if image.dtype == bool:
        image = image.astype(np.float32)
    return toolbox_rescale(image, factors, 1) > 0.5


def toolbox_resample_chunked(array, factors, instance: bool) -> np.ndarray:
    """A large source resampled cube by cube, each on its own, as the toolbox does above 500 MB.

    Each cube of ``CHUNK_EDGE`` voxels is rescaled alone (so smoothing and clipping stop at
    its faces) and placed at ⌊start · factor⌋; masks are thresholded once at the end.
    """
    factors = np.asarray(factors, float)
    shape_out = tuple(max(1, int(np.round(s * f))) for s, f in zip(array.shape, factors))
    output = np.zeros(shape_out, dtype=array.dtype if instance else np.float32)
    for start in np.ndindex(*(math.ceil(s / CHUNK_EDGE) for s in array.shape)):
        low = [i * CHUNK_EDGE for i in start]
        chunk = array[tuple(slice(a, min(a + CHUNK_EDGE, s)) for a, s in zip(low, array.shape))]
        if instance:
            small = toolbox_rescale(chunk, factors, 0).astype(chunk.dtype)
        else:
            small = toolbox_rescale(chunk.astype(np.float32) if chunk.dtype == bool else chunk, factors, 1)
        at = [int(a * f) for a, f in zip(low, factors)]
        size = [min(a + n, s) - a for a, n, s in zip(at, small.shape, shape_out)]
        output[tuple(slice(a, a + n) for a, n in zip(at, size))] = small[tuple(slice(0, n) for n in size)]
    return output if instance else output > 0.5


def toolbox_offset(translation, scale, target_translation) -> np.ndarray:
    """Whole-voxel shift of a prediction on the crop grid, as the toolbox computes it.

    The prediction's translation is floor-snapped to the crop's voxel size, and the distance
    to the crop's (unsnapped) translation is truncated toward zero in whole voxels; so a crop
    at a half-voxel translation can see a prediction one voxel away from where it belongs.
    """
    scale = np.asarray(scale, float)
    target = np.asarray(target_translation, float)
    difference = (np.asarray(translation, float) // scale) * scale - target
    return ((np.abs(difference) // scale) * np.sign(difference)).astype(int)


def toolbox_place(image: np.ndarray, offset, shape) -> np.ndarray:
    """``image`` shifted by ``offset`` voxels onto a zero grid of ``shape`` (the toolbox's crop/pad)."""
    offset = np.asarray(offset, int)
    shape = tuple(int(s) for s in shape)
    if not offset.any() and image.shape == shape:
        return image
    result = np.zeros(shape, dtype=image.dtype)
    source, target = [], []
    for shift, have, want in zip(offset, image.shape, shape):
        first = max(-shift, 0)
        at = max(shift, 0)
        length = min(want - at, have - first)
        if length <= 0:
            return result
        source.append(slice(first, first + length))
        target.append(slice(at, at + length))
    result[tuple(target)] = image[tuple(source)]
    return result


def toolbox_align(image: np.ndarray, voxel_size, translation, shape, scale, target_translation, instance: bool, resampled: bool = False) -> np.ndarray:
    """A prediction on the crop grid as the toolbox's ``MatchedCrop.load_aligned`` puts it.

    ``voxel_size`` or ``translation`` may be None (missing metadata): without a voxel size the
    array is centre padded/cropped to the crop's shape, without a translation it is not
    shifted. ``resampled``: already brought to the crop's voxel size (the chunked path).
    Masks come back as they were when not resampled (scored as > 0), else as booleans.
    """
    scale = np.asarray(scale, float)
    shape = tuple(int(s) for s in shape)
    if not resampled and voxel_size is not None:
        voxel_size = np.asarray(voxel_size, float)[-len(scale):]
        if not np.allclose(voxel_size, scale):
            image = toolbox_resample(image, voxel_size / scale, instance)
    elif not resampled and image.shape != shape:
        image = centre_pad_crop(image, shape)
    if translation is None:
        return toolbox_place(image, np.zeros(len(shape), int), shape)
    offset = toolbox_offset(np.asarray(translation, float)[-len(scale):], scale, target_translation)
    return toolbox_place(image, offset, shape)


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
    def _nothing_anywhere(self) -> bool:
        return 2 * self.tp + self.fp + self.fn == 0 and not self.distance_scores

    @property
    def f1(self) -> float:
        denominator = 2 * self.tp + self.fp + self.fn
        if self._nothing_anywhere:
            return 1.0
        return 2 * self.tp / denominator if denominator else 0.0

    @property
    def hausdorff_score(self) -> float:
        if self._nothing_anywhere:
            return 1.0
        return float(np.mean(self.distance_scores)) if self.distance_scores else 0.0

    @property
    def combined(self) -> float:
        return math.sqrt(self.f1 * self.hausdorff_score)

    @property
    def mean_distance(self) -> float | None:
        finite = [d for d in self.distances if math.isfinite(d)]
        return float(np.mean(finite)) if finite else None


def relabel(pred: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """Connected components numbered 1..n in raster order (as skimage.measure.label numbers them)."""
    import cc3d

    return cc3d.connected_components(np.ascontiguousarray(pred), connectivity=connectivity, out_dtype=np.uint64)


def overlap_table(truth: np.ndarray, pred: np.ndarray):
    """Truth ids, predicted ids, and IoU for every overlapping (truth, pred) pair."""
    truth_ids, truth_sizes = np.unique(truth[truth > 0], return_counts=True)
    pred_ids, pred_sizes = np.unique(pred[pred > 0], return_counts=True)
    both = (truth > 0) & (pred > 0)
    pairs, intersections = np.unique(np.stack([truth[both], pred[both]]), axis=1, return_counts=True)
    rows = np.searchsorted(truth_ids, pairs[0]) if pairs.size else np.zeros(0, int)
    cols = np.searchsorted(pred_ids, pairs[1]) if pairs.size else np.zeros(0, int)
    unions = truth_sizes[rows] + pred_sizes[cols] - intersections
    return truth_ids, pred_ids, rows, cols, intersections / np.maximum(unions, 1)


def ratio_cutoff(n_truth: int) -> float:
    """Most predicted instances per true one before a crop is dropped (toolbox default)."""
    return 10.0 + 50.0 * math.exp(-n_truth / 5.0)


def matching_costs(iou: np.ndarray) -> np.ndarray:
    """The toolbox's integer arc costs: IoU as float32, ⌊(1 − IoU)·10⁶⌋."""
    return ((1.0 - iou.astype(np.float32).astype(np.float64)) * MATCH_SCALE).astype(np.int64)


def optimal_matching(n_truth: int, n_pred: int, rows, cols, iou) -> list[tuple[int, int]]:
    """The toolbox's min-cost one-to-one matching (OR-Tools min-cost flow), solved with scipy.

    The flow's total cost is Σ_matched c + (unmatched truths)·(10⁶ + 1)
    = n_truth·(10⁶ + 1) − Σ_matched (10⁶ + 1 − c), with the same integer costs c as the
    toolbox, so a minimum-cost flow is exactly a maximum-weight matching with weights
    10⁶ + 1 − c ≥ 1 on overlapping pairs. Weights add up over the connected components of
    the overlap graph, so each component is solved on its own with
    ``linear_sum_assignment``: non-overlapping pairs inside a component get weight 0,
    which an optimum never needs (any matching of real pairs extends to an assignment of
    the same weight), and are dropped. Only among exactly tied optima may the chosen pairs
    differ from OR-Tools'.
    """
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    if n_truth == 0 or n_pred == 0 or len(rows) == 0:
        return []
    weights = (MATCH_SCALE + 1 - matching_costs(np.asarray(iou))).astype(np.float64)
    graph = coo_matrix((np.ones(len(rows)), (rows, n_truth + cols)), shape=(n_truth + n_pred,) * 2)
    _, component_of = connected_components(graph, directed=False)
    edge_component = component_of[rows]
    order = np.argsort(edge_component, kind="stable")
    boundaries = np.flatnonzero(np.diff(edge_component[order])) + 1
    matches: list[tuple[int, int]] = []
    for edges in np.split(order, boundaries):
        if len(edges) == 1:
            matches.append((int(rows[edges[0]]), int(cols[edges[0]])))
            continue
        local_rows, r_index = np.unique(rows[edges], return_inverse=True)
        local_cols, c_index = np.unique(cols[edges], return_inverse=True)
        block = np.zeros((len(local_rows), len(local_cols)))
        block[r_index, c_index] = weights[edges]
        chosen_rows, chosen_cols = linear_sum_assignment(block, maximize=True)
        matches += [(int(local_rows[r]), int(local_cols[c])) for r, c in zip(chosen_rows, chosen_cols) if block[r, c] > 0]
    return sorted(matches)


def ortools_version() -> str | None:
    """The installed OR-Tools' version, or None: it is an optional extra (``leaderboard``)."""
    try:
        from ortools.graph.python import min_cost_flow  # noqa: F401
        import ortools
    except ImportError:
        return None
    return str(getattr(ortools, "__version__", "unknown"))


def flow_arcs(n_truth_nodes: int, n_pred: int, truth_rows, pred_cols, iou):
    """The toolbox's flow network, arcs in its order: (tails, heads, capacities, costs).

    Node 0 is the source, 1..n_truth_nodes one per truth id up to the largest (absent ids
    included), then one per predicted component, then the sink. Arcs: source → each truth
    (cost 0), each truth → sink (unmatched, 10⁶ + 1), truth → prediction for every
    overlapping pair sorted by (truth id, component) at ⌊(1 − IoU)·10⁶⌋, each prediction →
    sink (0). All capacities 1. OR-Tools breaks ties by this order, so it must be kept.
    """
    truth_rows = np.asarray(truth_rows, np.int64)
    pred_cols = np.asarray(pred_cols, np.int64)
    truth = 1 + np.arange(n_truth_nodes, dtype=np.int64)
    pred = 1 + n_truth_nodes + np.arange(n_pred, dtype=np.int64)
    sink = 1 + n_truth_nodes + n_pred
    tails = np.concatenate([np.zeros(n_truth_nodes, np.int64), truth, 1 + truth_rows, pred])
    heads = np.concatenate([truth, np.full(n_truth_nodes, sink), 1 + n_truth_nodes + pred_cols, np.full(n_pred, sink)])
    costs = np.concatenate([np.zeros(n_truth_nodes, np.int64), np.full(n_truth_nodes, MATCH_SCALE + 1), matching_costs(np.asarray(iou)), np.zeros(n_pred, np.int64)])
    return tails, heads, np.ones(len(tails), np.int64), costs


def ortools_matching(n_truth_nodes: int, n_pred: int, truth_rows, pred_cols, iou) -> list[tuple[int, int]]:
    """(truth row, prediction column) pairs of OR-Tools' min-cost flow on the toolbox's network."""
    from ortools.graph.python import min_cost_flow

    if n_truth_nodes == 0 or n_pred == 0 or len(truth_rows) == 0:
        return []
    tails, heads, capacities, costs = flow_arcs(n_truth_nodes, n_pred, truth_rows, pred_cols, iou)
    solver = min_cost_flow.SimpleMinCostFlow()
    solver.add_arcs_with_capacity_and_unit_cost(tails.astype(np.int32), heads.astype(np.int32), capacities, costs)
    solver.set_node_supply(0, n_truth_nodes)
    solver.set_node_supply(1 + n_truth_nodes + n_pred, -n_truth_nodes)
    status = solver.solve()
    if status != solver.OPTIMAL:
        raise RuntimeError(f"OR-Tools min-cost flow ended with status {status}")
    first_pred = 1 + n_truth_nodes
    pairs = []
    for arc in range(solver.num_arcs()):
        tail, head = solver.tail(arc), solver.head(arc)
        if solver.flow(arc) == 1 and 1 <= tail < first_pred <= head < first_pred + n_pred:
            pairs.append((tail - 1, head - first_pred))
    return sorted(pairs)


def hausdorff(a: np.ndarray, b: np.ndarray, voxel_size) -> float:
    """Symmetric Hausdorff distance (nm) between two boolean masks; inf if either is empty."""
    if not a.any() or not b.any():
        return math.inf
    region = np.argwhere(a | b)
    lo, hi = region.min(axis=0), region.max(axis=0) + 1
    box = tuple(slice(l, h) for l, h in zip(lo, hi))
    a, b = a[box], b[box]
    # Every voxel of both masks lies in the box, so the transforms there are exact.
    to_b = ndimage.distance_transform_edt(~b, sampling=voxel_size)
    to_a = ndimage.distance_transform_edt(~a, sampling=voxel_size)
    return float(max(to_b[a].max(), to_a[b].max()))


def distance_score(distance: float, voxel_size) -> float:
    if not math.isfinite(distance):
        return 0.0
    return float(1.01 ** (-distance / np.linalg.norm(voxel_size)))


def _ranks(ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """1-based position of each value among the sorted ``ids``; 0 for values not in it."""
    values = np.asarray(values)
    if len(ids) == 0:
        return np.zeros(values.shape, dtype=np.uint32)
    position = np.searchsorted(ids, values)
    found = ids[np.minimum(position, len(ids) - 1)] == values
    return np.where(found, position + 1, 0).astype(np.uint32)


def _renumber(volume: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``volume`` (labels among ``ids`` and 0) with labels 1..n, so find_objects stays small."""
    if len(ids) == 0 or int(ids[-1]) == len(ids):
        return volume  # already 1..n
    if int(ids[-1]) < (1 << 24):
        table = np.zeros(int(ids[-1]) + 1, dtype=np.uint32)
        table[ids] = np.arange(1, len(ids) + 1, dtype=np.uint32)
        return table[volume]
    return _ranks(ids, volume)


def _match(n_truth: int, truth_ids: np.ndarray, n_pred: int, rows, cols, iou, matcher: str) -> list[tuple[int, int]]:
    """Matched (truth index, prediction index) pairs; ``matcher`` "ortools" builds the toolbox's graph."""
    if matcher == "ortools" and n_truth and int(truth_ids[-1]) <= MAX_FLOW_TRUTH_NODES:
        pairs = ortools_matching(int(truth_ids[-1]), n_pred, truth_ids[rows] - 1, cols, iou)
        return sorted((int(np.searchsorted(truth_ids, t + 1)), p) for t, p in pairs)
    return optimal_matching(n_truth, n_pred, rows, cols, iou)


def instance_counts(truth: np.ndarray, pred: np.ndarray | None, voxel_size, connectivity: int = 26, matcher: str = "scipy", float32_distances: bool = False) -> InstanceCounts:
    """tp/fp/fn and normalised Hausdorff scores of one crop (current scoring).

    ``matcher``: "scipy" (exact optimum, per overlap component) or "ortools" (the toolbox's
    own solver and graph, so that ties between equally cheap matchings fall the same way).
    ``float32_distances``: keep distances as the toolbox stores them (float32).
    """
    voxel_size = tuple(float(v) for v in voxel_size)
    truth_ids = np.unique(truth[truth > 0])
    n_truth = len(truth_ids)
    if pred is None:
        return InstanceCounts(0, 0, n_truth, [0.0] * n_truth, [math.inf] * n_truth, skipped="not submitted")
    pred = relabel(pred, connectivity)
    n_pred = int(pred.max()) if pred.size else 0
    if n_truth == 0 and n_pred == 0:
        return InstanceCounts()
    d_max = min(v * s for v, s in zip(voxel_size, truth.shape)) / 2
    # As the toolbox does, the guard counts truth objects as the largest id.
    truth_max = int(truth_ids[-1]) if n_truth else 0
    if n_truth and n_pred and n_pred / truth_max > ratio_cutoff(truth_max):
        return InstanceCounts(skipped=f"too many predicted instances ({n_pred} for {n_truth})")
    _, pred_ids, rows, cols, iou = overlap_table(truth, pred)
    if len(rows) > MAX_OVERLAP_PAIRS:
        return InstanceCounts(skipped=f"too many overlapping pairs ({len(rows)})")
    matches = _match(n_truth, truth_ids, len(pred_ids), rows, cols, iou, matcher)

    # The toolbox relabels matched predictions to their truth id and leaves every other
    # component's id as it is (fastremap, preserve_missing_labels), so an unmatched
    # component whose id equals a truth id counts toward that object's distance. Both
    # volumes are renumbered 1..n_truth in truth-id order to keep that exact.
    truth_dense = _renumber(truth, truth_ids)
    pred_lookup = np.zeros(n_pred + 1, dtype=np.uint32)
    pred_lookup[1:] = _ranks(truth_ids, np.arange(1, n_pred + 1))
    for t_index, p_index in matches:
        pred_lookup[int(pred_ids[p_index])] = t_index + 1
    pred_dense = pred_lookup[pred]
    truth_boxes = ndimage.find_objects(truth_dense, max_label=n_truth)
    pred_boxes = ndimage.find_objects(pred_dense, max_label=n_truth)
    distances = []
    for k in range(1, n_truth + 1):
        t_box, p_box = truth_boxes[k - 1], pred_boxes[k - 1]
        if p_box is None:
            distances.append(d_max)
            continue
        box = tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(t_box, p_box))
        distances.append(min(hausdorff(truth_dense[box] == k, pred_dense[box] == k, voxel_size), d_max))
    tp = len(matches)
    distances += [d_max] * (n_pred - tp)
    if float32_distances:
        distances = [float(np.float32(d)) for d in distances]
    return InstanceCounts(tp, n_pred - tp, n_truth - tp, [distance_score(d, voxel_size) for d in distances], distances)


# ---------------------------------------------------------------- legacy (2025-04)


def legacy_semantic(truth: np.ndarray, pred: np.ndarray | None) -> dict:
    if pred is None:
        return {"iou": 0.0, "dice": 0.0}
    counts = semantic_counts(truth, pred)
    return {"iou": counts.iou, "dice": counts.dice}


LEGACY_NOT_SUBMITTED = {"accuracy": 0.0, "hausdorff_distance": 0.0, "normalized_hausdorff_distance": 0.0, "combined_score": 0.0}


def legacy_instance(truth: np.ndarray, pred: np.ndarray | None, voxel_size, connectivity: int = 26) -> dict:
    """One crop's scores as the 2025-04 release computed them, quirks included."""
    voxel_size = tuple(float(v) for v in voxel_size)
    if pred is None:
        return dict(LEGACY_NOT_SUBMITTED)
    pred = relabel(pred, connectivity)
    truth_ids, pred_ids, rows, cols, iou = overlap_table(truth, pred)
    if len(truth_ids) > 0 and len(pred_ids) / len(truth_ids) > LEGACY_RATIO_CUTOFF:
        return {"accuracy": 0.0, "hausdorff_distance": math.inf, "normalized_hausdorff_distance": 0.0, "combined_score": 0.0}
    matched = np.zeros(truth.shape, dtype=np.uint64)
    distances = []
    if len(pred_ids):
        # As the release did: Hungarian assignment on the dense IoU matrix, and every
        # assigned pair relabelled, also pairs that do not overlap at all.
        score = np.zeros((len(truth_ids), len(pred_ids)))
        score[rows, cols] = iou
        assigned_rows, assigned_cols = linear_sum_assignment(score, maximize=True)
        lookup = np.zeros(int(pred_ids[-1]) + 1, dtype=np.uint64)
        lookup[pred_ids[assigned_cols]] = truth_ids[assigned_rows]
        matched = lookup[pred]
        truth_dense, matched_dense = _renumber(truth, truth_ids), _renumber(matched, truth_ids)
        truth_boxes = ndimage.find_objects(truth_dense, max_label=len(truth_ids))
        matched_boxes = ndimage.find_objects(matched_dense, max_label=len(truth_ids))
        for k in range(1, len(truth_ids) + 1):
            t_box, m_box = truth_boxes[k - 1], matched_boxes[k - 1]
            if m_box is None:
                distances.append(math.inf)
                continue
            box = tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(t_box, m_box))
            distances.append(hausdorff(truth_dense[box] == k, matched_dense[box] == k, voxel_size))
    accuracy = float(np.count_nonzero(truth == matched) / truth.size)
    # With no predicted object at all the release averaged no distances: 0 nm, score 1.
    mean_distance = float(np.mean(distances)) if distances else 0.0
    normalized = distance_score(mean_distance, voxel_size)
    return {
        "accuracy": accuracy,
        "hausdorff_distance": mean_distance,
        "normalized_hausdorff_distance": normalized,
        "combined_score": math.sqrt(accuracy * normalized),
    }


def overall(instance_scores: list[float], semantic_scores: list[float], toolbox_rule: bool = False) -> dict:
    """Plain means per group; overall is their geometric mean.

    Where a group has no class (validation crops may annotate only semantic classes) the
    toolbox takes its mean as 0 and so the overall as 0 (``toolbox_rule``, the
    leaderboard's); by default the overall is then the other group's mean, and the missing
    group's is reported as None.
    """
    if toolbox_rule:
        instance = float(np.mean(instance_scores)) if instance_scores else 0.0
        semantic = float(np.mean(semantic_scores)) if semantic_scores else 0.0
        return {"overall_score": math.sqrt(instance * semantic), "overall_instance_score": instance, "overall_semantic_score": semantic}
    instance = float(np.mean(instance_scores)) if instance_scores else None
    semantic = float(np.mean(semantic_scores)) if semantic_scores else None
    if instance is not None and semantic is not None:
        total = math.sqrt(instance * semantic)
    else:
        total = instance if instance is not None else semantic
    return {"overall_score": total, "overall_instance_score": instance, "overall_semantic_score": semantic}
