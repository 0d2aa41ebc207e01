"""Challenge metrics on small hand-made volumes; expected values worked out by hand."""

import math

import numpy as np
import pytest

from cellmap_repro import metrics

VOXEL = (1.0, 1.0, 1.0)
NORM = math.sqrt(3.0)  # |voxel size|


def box(shape=(10, 10, 10), *regions, value=1, dtype=np.uint16):
    volume = np.zeros(shape, dtype)
    for index, region in enumerate(regions, start=1):
        volume[region] = value if value else index
    return volume


CUBE = np.s_[2:6, 2:6, 2:6]


def test_semantic_perfect_shifted_and_empty():
    truth = box((10, 10, 10), CUBE)
    assert metrics.semantic_counts(truth, truth).iou == 1.0
    shifted = box((10, 10, 10), np.s_[2:6, 2:6, 3:7])
    counts = metrics.semantic_counts(truth, shifted)
    # overlap 4*4*3 = 48, union 64 + 64 - 48 = 80
    assert (counts.tp, counts.fp, counts.fn) == (48, 16, 16)
    assert counts.iou == pytest.approx(48 / 80) and counts.dice == pytest.approx(96 / 128)
    empty = np.zeros_like(truth)
    assert metrics.semantic_counts(empty, empty).iou == 1.0
    assert metrics.semantic_counts(truth, empty).iou == 0.0


def test_semantic_counts_pool_over_crops():
    a = metrics.semantic_counts(box((10, 10, 10), CUBE), box((10, 10, 10), CUBE))  # 64 tp
    b = metrics.semantic_counts(box((10, 10, 10), CUBE), np.zeros((10, 10, 10), np.uint8))  # 64 fn
    assert a.add(b).iou == pytest.approx(64 / 128)  # pooled, not the mean of 1.0 and 0.0


def test_missing_semantic_prediction_counts_every_voxel_as_false_negative():
    counts = metrics.semantic_counts(box((10, 10, 10), CUBE), None)
    assert (counts.tp, counts.fp, counts.fn) == (0, 0, 1000)


def test_instance_perfect_match():
    truth = box((10, 10, 10), np.s_[0:3, 0:3, 0:3], np.s_[6:9, 6:9, 6:9], value=0)
    counts = metrics.instance_counts(truth, truth, VOXEL)
    assert (counts.tp, counts.fp, counts.fn) == (2, 0, 0)
    assert counts.distance_scores == [1.0, 1.0]
    assert counts.f1 == 1.0 and counts.combined == 1.0


def test_one_instance_split_in_two():
    truth = box((10, 10, 10), np.s_[2:6, 2:6, 0:8], value=0)
    pred = box((10, 10, 10), np.s_[2:6, 2:6, 0:4], np.s_[2:6, 2:6, 5:8], value=0)
    counts = metrics.instance_counts(truth, pred, VOXEL)
    # the larger half (IoU 64/128) matches; the other half is a false positive
    assert (counts.tp, counts.fp, counts.fn) == (1, 1, 0)
    assert counts.f1 == pytest.approx(2 / 3)
    # matched: the truth voxel at x=7 is 4 voxels from the half ending at x=3;
    # unmatched prediction: d_max = min(10 * 1) / 2 = 5
    assert counts.distances == pytest.approx([4.0, 5.0])
    h = (1.01 ** (-4 / NORM) + 1.01 ** (-5 / NORM)) / 2
    assert counts.hausdorff_score == pytest.approx(h)
    assert counts.combined == pytest.approx(math.sqrt(2 / 3 * h))


def test_one_missed_instance():
    truth = box((10, 10, 10), np.s_[0:3, 0:3, 0:3], np.s_[6:9, 6:9, 6:9], value=0)
    pred = box((10, 10, 10), np.s_[0:3, 0:3, 0:3], value=0)
    counts = metrics.instance_counts(truth, pred, VOXEL)
    assert (counts.tp, counts.fp, counts.fn) == (1, 0, 1)
    assert counts.f1 == pytest.approx(2 / 3)
    assert counts.hausdorff_score == pytest.approx((1.0 + 1.01 ** (-5 / NORM)) / 2)


def test_prediction_ids_are_ignored_and_relabelled_by_connectivity():
    truth = box((10, 10, 10), np.s_[0:3, 0:3, 0:3], np.s_[6:9, 6:9, 6:9], value=0)
    same_id = box((10, 10, 10), np.s_[0:3, 0:3, 0:3], np.s_[6:9, 6:9, 6:9], value=7)
    counts = metrics.instance_counts(truth, same_id, VOXEL)
    assert (counts.tp, counts.fp, counts.fn) == (2, 0, 0)


def test_instance_empty_cases():
    empty = np.zeros((10, 10, 10), np.uint16)
    both_empty = metrics.instance_counts(empty, empty, VOXEL)
    assert both_empty.f1 == 1.0 and both_empty.hausdorff_score == 1.0 and both_empty.combined == 1.0
    truth = box((10, 10, 10), CUBE, value=0)
    missing = metrics.instance_counts(truth, empty, VOXEL)
    assert (missing.tp, missing.fp, missing.fn) == (0, 0, 1) and missing.combined == 0.0
    not_submitted = metrics.instance_counts(truth, None, VOXEL)
    assert (not_submitted.fn, not_submitted.distance_scores) == (1, [0.0])


def test_matching_is_optimal_not_greedy():
    # truth 0 overlaps pred 0 (IoU .6) and pred 1 (.5); truth 1 overlaps only pred 0 (.4).
    # Greedy takes (0, 0) and leaves truth 1 unmatched; the optimum matches both.
    rows, cols, iou = np.array([0, 0, 1]), np.array([0, 1, 0]), np.array([0.6, 0.5, 0.4])
    assert sorted(metrics.optimal_matching(2, 2, rows, cols, iou)) == [(0, 1), (1, 0)]


def test_ratio_guard_drops_the_crop():
    truth = box((20, 20, 20), np.s_[0:2, 0:2, 0:2], value=0)
    pred = np.zeros((20, 20, 20), np.uint16)
    pred[::2, ::2, ::2] = 1  # 1000 isolated voxels against one true object
    counts = metrics.instance_counts(truth, pred, VOXEL)
    assert counts.skipped and (counts.tp, counts.fp, counts.fn) == (0, 0, 0)


def test_resample_nearest_and_linear():
    pred = np.zeros((4, 4, 4), np.uint16)
    pred[1, 1, 1] = 5
    # 8 nm prediction onto a 4 nm grid with the same origin convention (voxel centres)
    up = metrics.resample_to(pred, (8, 8, 8), (2, 2, 2), (8, 8, 8), (4, 4, 4), (0, 0, 0), instance=True)
    assert up.shape == (8, 8, 8) and set(np.unique(up)) == {0, 5}
    # truth centres 8 and 12 nm fall in the 8 nm voxel centred at 10 nm: 2 x 2 x 2 voxels
    assert np.all(up[2:4, 2:4, 2:4] == 5) and int(up.sum()) == 5 * 8
    mask = metrics.resample_to(pred > 0, (8, 8, 8), (0, 0, 0), (8, 8, 8), (4, 4, 4), (0, 0, 0), instance=False)
    assert mask.dtype == np.uint8 and mask[2, 2, 2] == 1 and mask[0, 0, 0] == 0
    # same voxel size: translation snapped, cropped and padded with 0
    shifted = metrics.resample_to(pred, (4, 4, 4), (4, 4, 4), (4, 4, 4), (4, 4, 4), (0, 0, 0), instance=True)
    assert shifted[2, 2, 2] == 5 and shifted.sum() == 5


def test_overall_is_the_geometric_mean_of_group_means():
    result = metrics.overall([1.0, 0.5], [0.25, 0.75])
    assert result["overall_instance_score"] == 0.75 and result["overall_semantic_score"] == 0.5
    assert result["overall_score"] == pytest.approx(math.sqrt(0.75 * 0.5))


def test_legacy_scoring():
    truth = box((10, 10, 10), np.s_[0:3, 0:3, 0:3], np.s_[6:9, 6:9, 6:9], value=0)
    perfect = metrics.legacy_instance(truth, truth, VOXEL)
    assert perfect["accuracy"] == 1.0 and perfect["combined_score"] == 1.0
    one = box((10, 10, 10), np.s_[0:3, 0:3, 0:3], value=0)
    missed = metrics.legacy_instance(truth, one, VOXEL)
    assert missed["accuracy"] == pytest.approx(1 - 27 / 1000)
    assert missed["normalized_hausdorff_distance"] == 0.0  # a missing object: infinite distance
    assert metrics.legacy_semantic(np.zeros((3, 3, 3)), np.zeros((3, 3, 3)))["iou"] == 1.0


def test_sparse_truth_ids_are_handled():
    truth = box((10, 10, 10), np.s_[0:3, 0:3, 0:3], np.s_[6:9, 6:9, 6:9], value=0).astype(np.uint64)
    truth[truth == 2] = 10**9
    counts = metrics.instance_counts(truth, truth > 0, VOXEL)
    assert (counts.tp, counts.fp, counts.fn) == (2, 0, 0) and counts.combined == 1.0


def test_unmatched_component_sharing_a_truth_id_counts_toward_its_distance():
    # As the toolbox does (fastremap with preserve_missing_labels): after matching, an
    # unmatched predicted component keeps its connected-component id, so one numbered
    # like a truth object joins that object's prediction for the Hausdorff distance.
    truth = box((20, 20, 20), np.s_[4:7, 4:7, 4:7], value=0)
    first = box((20, 20, 20), np.s_[0:1, 0:1, 0:1], np.s_[4:7, 4:7, 4:7], value=0)
    counts = metrics.instance_counts(truth, first, VOXEL)
    # raster order: the stray voxel is component 1, the exact copy component 2 (matched
    # to truth 1); the stray voxel is 4·√3 from the corner (4, 4, 4); d_max = 20/2 = 10
    assert (counts.tp, counts.fp, counts.fn) == (1, 1, 0)
    assert counts.distances == pytest.approx([4 * math.sqrt(3), 10.0])
    assert counts.hausdorff_score == pytest.approx((1.01**-4 + 1.01 ** (-10 / NORM)) / 2)
    # the same stray voxel after the object in raster order is component 2: no collision
    last = box((20, 20, 20), np.s_[4:7, 4:7, 4:7], np.s_[19:20, 19:20, 19:20], value=0)
    assert metrics.instance_counts(truth, last, VOXEL).distances == pytest.approx([0.0, 10.0])


def test_ratio_guard_counts_truth_objects_by_largest_id():
    pred = np.zeros((20, 20, 20), np.uint16)
    pred[0:20:4, 0:20:4, 0:12:4] = 1  # 75 isolated voxels
    truth = np.zeros((20, 20, 20), np.uint16)
    truth[17:20, 17:20, 17:20] = 1
    # one object: cutoff 10 + 50·e^(−1/5) ≈ 50.9 < 75
    assert metrics.instance_counts(truth, pred, VOXEL).skipped
    # the same object numbered 3 counts as 3: cutoff 10 + 50·e^(−3/5) ≈ 37.4 > 75/3
    truth[truth == 1] = 3
    counts = metrics.instance_counts(truth, pred, VOXEL)
    assert counts.skipped is None and (counts.tp, counts.fp, counts.fn) == (0, 75, 1)


def test_matching_costs_are_the_toolbox_integers():
    # IoU is stored as float32: 0.3 becomes 0.30000001192..., so ⌊0.69999998808·10⁶⌋
    assert metrics.matching_costs(np.array([0.3, 0.5, 1.0])).tolist() == [699999, 500000, 0]


def test_optimal_matching_minimises_the_toolbox_cost_on_random_graphs():
    import itertools

    rng = np.random.default_rng(0)

    def cost(n_truth, pairs, costs):
        return sum(costs[p] for p in pairs) + (n_truth - len(pairs)) * (metrics.MATCH_SCALE + 1)

    for _ in range(200):
        n_truth, n_pred = rng.integers(1, 5), rng.integers(1, 5)
        present = rng.random((n_truth, n_pred)) < 0.5
        rows, cols = np.nonzero(present)
        iou = rng.choice([0.2, 0.25, 0.5, 0.75, 1.0], len(rows))
        costs = dict(zip(zip(rows.tolist(), cols.tolist()), metrics.matching_costs(iou).tolist()))
        best = min(
            cost(n_truth, chosen, costs)
            for k in range(min(n_truth, n_pred) + 1)
            for chosen in itertools.combinations(costs, k)
            if len({r for r, _ in chosen}) == k and len({c for _, c in chosen}) == k
        )
        found = metrics.optimal_matching(n_truth, n_pred, rows, cols, iou)
        assert len({r for r, _ in found}) == len(found) == len({c for _, c in found})
        assert all(pair in costs for pair in found)
        assert cost(n_truth, found, costs) == best


def test_legacy_quirks_of_the_2025_04_release():
    truth = box((10, 10, 10), np.s_[0:3, 0:3, 0:3], np.s_[6:9, 6:9, 6:9], value=0)
    # no predicted object: no distance to average, so 0 nm and a normalised score of 1
    empty = metrics.legacy_instance(truth, np.zeros_like(truth), VOXEL)
    assert empty["accuracy"] == pytest.approx(1 - 54 / 1000) and empty["normalized_hausdorff_distance"] == 1.0
    assert empty["combined_score"] == pytest.approx(math.sqrt(1 - 54 / 1000))
    # the Hungarian assignment pairs objects that do not overlap, and they are relabelled
    one_truth = box((10, 10, 10), np.s_[0:3, 0:3, 0:3], value=0)
    far = box((10, 10, 10), np.s_[6:9, 6:9, 6:9], value=0)
    scores = metrics.legacy_instance(one_truth, far, VOXEL)
    assert scores["accuracy"] == pytest.approx(1 - 54 / 1000)
    assert scores["hausdorff_distance"] == pytest.approx(6 * math.sqrt(3))  # (0,0,0) to (6,6,6)
    assert scores["combined_score"] == pytest.approx(math.sqrt((1 - 54 / 1000) * 1.01**-6))
    assert metrics.legacy_instance(truth, None, VOXEL) == {
        "accuracy": 0.0, "hausdorff_distance": 0.0, "normalized_hausdorff_distance": 0.0, "combined_score": 0.0,
    }
    assert metrics.legacy_semantic(truth, None)["iou"] == 0.0


def test_pooled_instance_scores_follow_the_toolbox_rules():
    assert metrics.InstanceCounts().combined == 1.0  # nothing anywhere
    only_false_positive = metrics.InstanceCounts(0, 1, 0, [1.01**-2], [2.0])
    assert only_false_positive.f1 == 0.0 and only_false_positive.combined == 0.0
    pooled = metrics.InstanceCounts(1, 0, 0, [1.0], [0.0]).add(metrics.InstanceCounts(0, 0, 1, [0.0], [math.inf]))
    assert pooled.f1 == pytest.approx(2 / 3) and pooled.hausdorff_score == 0.5


def test_upsampling_keeps_the_border_voxels():
    # 8 nm voxel 0 centred at 800 nm spans 796-804; the 4 nm voxels centred at 798 and 802
    # both lie inside it, so neither may fall off the edge.
    pred = np.ones((3, 3, 3), np.uint16)
    up = metrics.resample_to(pred, (8, 8, 8), (800, 800, 800), (6, 6, 6), (4, 4, 4), (798, 798, 798), instance=True)
    assert np.all(up == 1)
    # Linear interpolation against 0 beyond the border, as skimage's rescale in the toolbox:
    # a border voxel's value is 0.75 per axis that touches the border, so faces (0.75) and
    # edges (0.5625) stay foreground and the 8 crop corners (0.421875) drop out.
    mask = metrics.resample_to(pred, (8, 8, 8), (800, 800, 800), (6, 6, 6), (4, 4, 4), (798, 798, 798), instance=False)
    corners = np.zeros((6, 6, 6), bool)
    corners[np.ix_([0, 5], [0, 5], [0, 5])] = True
    assert np.array_equal(mask == 0, corners)
    # the prediction spans 796-820 nm; half a prediction voxel of slack (predict keeps the
    # voxels centred inside a crop) accepts up to 824 nm
    assert metrics.covers((8, 8, 8), (800, 800, 800), (3, 3, 3), (4, 4, 4), (798, 798, 798), (7, 6, 6))
    assert not metrics.covers((8, 8, 8), (800, 800, 800), (3, 3, 3), (4, 4, 4), (798, 798, 798), (8, 6, 6))
    assert not metrics.covers((8, 8, 8), (800, 800, 800), (3, 3, 3), (4, 4, 4), (790, 798, 798), (6, 6, 6))


# ---------------------------------------------------------------- the leaderboard's rules (toolbox 6b9ad68)
# Expected values are worked out from the toolbox's published source (matched_crop.py,
# instance_matching.py) and scikit-image's documented rescale, not by running them.


def gaussian_weights(sigma):
    """scipy's truncated Gaussian (4 sigma), normalised: weight at offsets 0, 1, 2, ..."""
    radius = int(4 * sigma + 0.5)
    w = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma**2))
    return (w / w.sum())[radius:]


def test_leaderboard_downsampling_anti_aliases_a_thin_sheet_away():
    # 1 nm along z onto 4 nm: factor 1/4, so sigma = (4 - 1)/2 = 1.5 along z only. A sheet
    # two voxels thick (z = 5, 6) falls on the 4 nm voxel 1, sampled at z = 5.5 (grid mode).
    pred = np.zeros((12, 3, 3), np.uint8)
    pred[5:7] = 1
    w = gaussian_weights(1.5)
    smoothed = w[0] + w[1]  # at z = 5 and 6 alike: itself and its neighbour in the sheet
    assert smoothed == pytest.approx(0.4789, abs=1e-4)
    values = metrics.toolbox_rescale(pred, (0.25, 1, 1), order=1)
    assert values.shape == (3, 3, 3) and values[1, 1, 1] == pytest.approx(smoothed)
    board = metrics.toolbox_align(pred, (1, 4, 4), (0, 0, 0), (3, 3, 3), (4, 4, 4), (1.5, 0, 0), instance=False)
    assert not board.any()  # 0.479 < 0.5: the sheet is gone on the leaderboard
    exact = metrics.resample_to(pred, (1, 4, 4), (0, 0, 0), (3, 3, 3), (4, 4, 4), (1.5, 0, 0), instance=False)
    assert exact[1].all() and not exact[[0, 2]].any()  # exact geometry keeps it (plain linear: 1.0)


def test_leaderboard_upsampling_clips_to_the_inputs_range():
    # All-foreground 8 nm mask onto 4 nm: corners blend with the zero outside to 0.42, but
    # rescale clips to the input's range [1, 1] (0 is added only if the output reaches 0).
    ones = np.ones((3, 3, 3), bool)
    board = metrics.toolbox_align(ones, (8, 8, 8), (800, 800, 800), (6, 6, 6), (4, 4, 4), (798, 798, 798), instance=False)
    assert board.all()
    exact = metrics.resample_to(ones, (8, 8, 8), (800, 800, 800), (6, 6, 6), (4, 4, 4), (798, 798, 798), instance=False)
    assert exact.sum() == 6**3 - 8  # the corners (0.421875) drop out
    # with one background voxel the range is [0, 1] already: no clipping, corners drop out again
    holed = ones.copy()
    holed[1, 1, 1] = False
    corner = metrics.toolbox_align(holed, (8, 8, 8), (800, 800, 800), (6, 6, 6), (4, 4, 4), (798, 798, 798), instance=False)
    assert not corner[0, 0, 0] and not corner[5, 5, 5]


@pytest.mark.parametrize(
    "translation, target, toolbox, exact",
    [
        (6.0, 2.0, 0, -1),  # half-voxel crop: snapped 4 is 2 nm off, truncated to 0 voxels
        (10.0, 2.0, 1, -2),  # snapped 8, 6 nm off: 1 voxel, one short of the exact 2
        (5.0, 2.0, 0, -1),  # off the lattice: snapped 4
        (-4.0, 0.0, -1, 1),  # on the lattice: the two agree (opposite sign conventions)
        (-6.0, 2.0, -2, 2),  # snapped -8, 10 nm off: 2 voxels, as exact
    ],
)
def test_leaderboard_translation_is_floor_snapped(translation, target, toolbox, exact):
    assert metrics.toolbox_offset((translation,) * 3, (4.0,) * 3, (target,) * 3).tolist() == [toolbox] * 3
    # exact: the prediction voxel that lands on crop voxel 0 (resample_to's offset)
    assert (target - translation) / 4.0 == pytest.approx(exact, abs=0.5)
    pred = np.zeros((6, 6, 6), np.uint16)
    pred[2, 2, 2] = 7
    placed = metrics.toolbox_align(pred, (4, 4, 4), (translation,) * 3, (6, 6, 6), (4, 4, 4), (target,) * 3, instance=True)
    assert placed[(2 + toolbox,) * 3] == 7 and placed.sum() == 7


def test_leaderboard_without_metadata_pads_or_crops_at_the_centre():
    pred = np.arange(1, 4**3 + 1, dtype=np.uint16).reshape(4, 4, 4)
    padded = metrics.toolbox_align(pred, None, None, (6, 6, 6), (4, 4, 4), (798, 798, 798), instance=True)
    assert np.array_equal(padded[1:5, 1:5, 1:5], pred) and padded.sum() == pred.sum()
    cropped = metrics.toolbox_align(pred, None, None, (2, 2, 2), (4, 4, 4), (798, 798, 798), instance=True)
    assert np.array_equal(cropped, pred[1:3, 1:3, 1:3])
    # no translation, known voxel size: not shifted at all
    assert np.array_equal(metrics.toolbox_align(pred, (4, 4, 4), None, (4, 4, 4), (4, 4, 4), (798, 798, 798), instance=True), pred)


def test_leaderboard_large_sources_are_resampled_cube_by_cube(monkeypatch):
    # Cubes of 3 along z at factor 1/2: each becomes round(1.5) = 2 voxels, sampled at 0.25
    # and 1.75 (nearest: its first and last), placed at int(start/2): the second cube lands
    # at 1 and overwrites the first cube's second voxel. Ids 1..6 along z give [1, 4, 6].
    monkeypatch.setattr(metrics, "CHUNK_EDGE", 3)
    pred = np.broadcast_to(np.arange(1, 7, dtype=np.uint16)[:, None, None], (6, 2, 2)).copy()
    out = metrics.toolbox_resample_chunked(pred, (0.5, 1, 1), instance=True)
    assert out[:, 0, 0].tolist() == [1, 4, 6]


def test_flow_network_is_built_like_the_toolboxs():
    # 2 truth ids, 2 components; overlaps (truth 1, comp 2) IoU .5 and (truth 2, comp 1) IoU 1
    tails, heads, caps, costs = metrics.flow_arcs(2, 2, [0, 1], [1, 0], np.array([0.5, 1.0], np.float32))
    assert tails.tolist() == [0, 0, 1, 2, 1, 2, 3, 4]  # source->truth, truth->sink, truth->comp, comp->sink
    assert heads.tolist() == [1, 2, 5, 5, 4, 3, 5, 5]
    assert costs.tolist() == [0, 0, 1_000_001, 1_000_001, 500_000, 0, 0, 0]
    assert caps.tolist() == [1] * 8


def test_ortools_matching_is_optimal_and_maps_sparse_truth_ids():
    pytest.importorskip("ortools")
    # truth ids 2 and 5 (3 and 4 absent still get nodes, as in the toolbox); same volumes as
    # test_one_instance_split_in_two plus a second, exactly copied object
    truth = box((10, 10, 10), np.s_[2:6, 2:6, 0:8], value=0).astype(np.uint32) * 2
    truth[7:9, 7:9, 7:9] = 5
    pred = (truth > 0).astype(np.uint8)
    pred[2:6, 2:6, 4] = 0  # split the first object in two
    scipy_counts = metrics.instance_counts(truth, pred, VOXEL)
    ortools_counts = metrics.instance_counts(truth, pred, VOXEL, matcher="ortools", float32_distances=True)
    assert (ortools_counts.tp, ortools_counts.fp, ortools_counts.fn) == (scipy_counts.tp, scipy_counts.fp, scipy_counts.fn) == (2, 1, 0)
    assert ortools_counts.distances == pytest.approx(scipy_counts.distances, rel=1e-6)
    assert all(float(np.float32(d)) == d for d in ortools_counts.distances)
    # a tie: two truths and two predictions overlapping all four ways equally; both matchings cost
    # the same, OR-Tools picks one of them, always the same one
    rows, cols, iou = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]), np.full(4, 0.25, np.float32)
    first = metrics.ortools_matching(2, 2, rows, cols, iou)
    assert first in ([(0, 0), (1, 1)], [(0, 1), (1, 0)])
    assert all(metrics.ortools_matching(2, 2, rows, cols, iou) == first for _ in range(5))


def test_toolbox_rescale_equals_scikit_image():
    transform = pytest.importorskip("skimage.transform")
    rng = np.random.default_rng(1)
    for trial in range(60):
        shape = tuple(rng.integers(3, 14, 3))
        factors = tuple(rng.choice([0.25, 1 / 3, 0.5, 0.8, 1.0, 1.25, 2.0, 3.0], 3))
        image = [rng.random(shape) > 0.6, (rng.random(shape) > 0.5).astype(np.uint8), rng.integers(0, 7, shape).astype(np.uint32)][trial % 3]
        image = image.astype(np.float32) if image.dtype == bool else image
        order = 0 if image.dtype == np.uint32 else 1
        expected = transform.rescale(image, factors, order=order, mode="constant", preserve_range=True)
        assert np.array_equal(metrics.toolbox_rescale(image, factors, order), expected)
