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
