"""The engine's sample reader: cellmap-data's samples, one normalisation, any worker count."""

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from cellmap_data.transforms import Binarize, NaNtoNum

from cellmap_repro import augment, data, predict
from cellmap_repro.classes import class_relations
from cellmap_repro.experiment import load_experiment

ROTATING = {
    "mirror": {"axes": {"x": 0.5, "y": 0.5, "z": 0.1}},
    "transpose": {"axes": ["x", "y", "z"]},
    "rotate": {"axes": {"x": [-180, 180], "y": [-180, 180], "z": [-180, 180]}},
}
TARGETS = T.Compose([T.ToDtype(torch.float), Binarize()])


def cellmap_dataset(container, crop, classes, spatial_transforms, shapes=((40,) * 3, (32,) * 3)):
    """cellmap-data reading a crop by itself (raw scaled to [0, 1] only where it returns uint8)."""
    from cellmap_data.dataset import CellMapDataset

    annotated = [c for c in ("ecs", "pm", "mito_mem", "mito_lum", "cyto", "nuc", "ves", "mito", "cell") if (container / f"recon-1/labels/groundtruth/crop{crop}/{c}").exists()]
    return CellMapDataset(
        str(container / "recon-1/em/fibsem-uint8"),
        str(container / f"recon-1/labels/groundtruth/crop{crop}/[{','.join(annotated)}]"),
        classes,
        {"input": {"shape": shapes[0], "scale": (8.0,) * 3}},
        {"output": {"shape": shapes[1], "scale": (8.0,) * 3}},
        spatial_transforms=spatial_transforms,
        raw_value_transforms=T.Compose([T.ToDtype(torch.float, scale=True), NaNtoNum({"nan": 0})]),
        target_value_transforms=TARGETS,
        is_train=spatial_transforms is not None,
        class_relation_dict=class_relations(classes),
        pad=True,
    )


def engine_plan(dataset, classes, spatial_transforms, shapes=((40,) * 3, (32,) * 3)):
    spec = data.crop_spec(dataset)
    windows = {"input_window": (shapes[0], (8.0,) * 3), "target_window": (shapes[1], (8.0,) * 3)}
    return data.SamplePlan([spec], classes, spatial_transforms=spatial_transforms, train=spatial_transforms is not None, experiment=("unused", "/nonexistent"), transforms=data.Transforms(NaNtoNum({"nan": 0}), TARGETS), **windows)


@pytest.mark.parametrize("crop,spatial_transforms", [(1, ROTATING), (2, ROTATING), (3, None)])
def test_samples_agree_with_cellmap_data(tiny_dataset, crop, spatial_transforms):
    """Same draws, same windows: raw within float32 rounding, targets (masking included) exact."""
    classes = load_experiment_classes()
    reference = cellmap_dataset(tiny_dataset, crop, classes, spatial_transforms)
    plan = engine_plan(reference, classes, spatial_transforms)
    rotated = 0
    for seed in range(3):
        index = (seed * 977) % len(reference)
        torch.manual_seed(seed)
        expected = reference[index]
        ours = plan.read(index, seed)
        raw = expected["input"]
        if ours["augmentation"].rotated:
            rotated += 1
            raw = raw / 255.0  # cellmap-data's rotated reads skip ToDtype's scaling: the bug the engine fixes
        assert ours["input"].shape == raw.shape
        assert torch.allclose(ours["input"], raw, atol=1e-6, rtol=0), f"seed {seed}: raw differs by {(ours['input'] - raw).abs().max():.2e}"
        assert torch.equal(ours["output"].isnan(), expected["output"].isnan())
        assert torch.equal(ours["output"].nan_to_num(-1), expected["output"].nan_to_num(-1))
    assert rotated == (3 if spatial_transforms else 0)


def load_experiment_classes():
    return ["ecs", "pm", "mito_mem", "mito_lum", "cyto", "nuc", "ves", "golgi", "mito", "cell"]


@pytest.mark.parametrize("transforms", ["setup_04_all", "none"])
def test_same_region_is_normalised_alike_on_train_validation_and_predict(tiny_dataset, transforms):
    """One window through the training path (rotation on: a quarter turn about z), the
    validation path and predict's tile reader, with setup_04_all's raw transforms and
    with none (the engine's own scaling): predict reads exactly what validation reads, and
    the rotated training window holds the same intensities (its voxels averaged: cellmap-
    data places windows half a voxel off the grid, where a rotated read interpolates and
    an unrotated one takes the upper neighbour). At 604a76f the rotated read reached the
    network in 0-255 while validation and predict gave 0-1."""
    from importlib import util

    spec_file = util.spec_from_file_location("setup04_data", "experiments/setup_04_all/data.py")
    module = util.module_from_spec(spec_file)
    spec_file.loader.exec_module(module)
    train_transform, val_transform = (module.train_raw_value_transforms, module.val_raw_value_transforms) if transforms == "setup_04_all" else (None, None)
    classes = load_experiment_classes()
    quarter_turn = {"rotate": {"axes": {"z": [90, 90]}}}
    spec = data.crop_spec(cellmap_dataset(tiny_dataset, 1, classes, None))
    windows = {"input_window": ((40,) * 3, (8.0,) * 3), "target_window": ((32,) * 3, (8.0,) * 3)}

    def plan(train):
        value_transforms = data.Transforms(train_transform if train else val_transform, module.target_value_transforms)
        return data.SamplePlan([spec], classes, spatial_transforms=quarter_turn, train=train, experiment=("unused", "/nonexistent"), transforms=value_transforms, **windows)

    index = spec.size // 2
    trained = plan(True).read(index, seed=1)
    assert trained["augmentation"].rotated
    validated = plan(False).read(index, seed=1)
    raw = augment._zarr_array(spec.raw.path, 0)
    # the validation window's first voxel: its first point rounded up (it sits half a voxel off)
    start = np.floor((np.asarray(spec.center(index)) - 20 * 8.0 + 4.0 - np.asarray(spec.raw.translation)) / 8.0 + 0.5).astype(int)
    predicted = predict.tile_input(raw, start, (40, 40, 40), val_transform)
    assert torch.equal(predicted, validated["input"]), "predict must read the validation window as validation does"
    for name, values in (("train", trained["input"]), ("validate", validated["input"])):
        assert values.dtype == torch.float32 and values.min() >= 0.0 and values.max() <= 1.0, f"{name} input outside [0, 1]"
    assert abs(float(trained["input"].mean() - validated["input"].mean())) < 0.03


def test_reading_leaves_the_training_rng_alone(tiny_dataset):
    classes = load_experiment_classes()
    plan = engine_plan(cellmap_dataset(tiny_dataset, 1, classes, ROTATING), classes, ROTATING)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = plan.read(5, seed=9)
    assert torch.equal(torch.get_rng_state(), before), "sampling must not consume the training process's RNG"
    again = plan.read(5, seed=9)
    assert torch.equal(first["input"], again["input"]) and first["augmentation"] == again["augmentation"]


def test_interpolation_on_a_device_matches_the_cpu_kernel(tiny_dataset):
    """--augment-device cuda: workers only read blocks, grid_sample interpolates (run here on the CPU)."""
    classes = load_experiment_classes()
    plan = engine_plan(cellmap_dataset(tiny_dataset, 2, classes, ROTATING), classes, ROTATING)
    for seed in range(3):
        cpu = plan.read(7, seed)
        deferred = plan.read(7, seed, defer_raw=True)
        assert isinstance(deferred["input"], augment.RawBlock)
        (inputs, target), = data.on_device([data.collate([deferred])], plan, "cpu")
        assert torch.equal(target[0].isnan(), cpu["output"].isnan())
        assert torch.allclose(inputs[0], cpu["input"], atol=2e-6), f"{(inputs[0] - cpu['input']).abs().max():.2e}"


def test_epoch_draws_follow_the_crop_weights():
    sizes = np.array([10, 1000])
    draws = data.epoch_indices(seed=3, epoch=0, count=20000, crop_weights=np.array([100.0, 1.0]), crop_sizes=sizes)
    in_first = np.mean(draws < 10)
    # crop 0 holds 10 samples of weight 100, crop 1 1000 of weight 1: half the mass each
    assert abs(in_first - 0.5) < 0.02
    assert draws.min() >= 0 and draws.max() < 1010
    assert np.array_equal(draws, data.epoch_indices(3, 0, 20000, np.array([100.0, 1.0]), sizes))


def test_a_frozen_backbone_records_no_autograd_graph():
    """Only the trainable head keeps tensors for the backward pass (setup_04_all's layout)."""
    from cellmap_repro.model import conv_head, frozen

    backbone = frozen(torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv3d(4, 4, 3)))
    head = torch.nn.Sequential(*conv_head(4, 3, hidden_layers=1))
    saved = []

    def count(tensor):
        saved.append(tensor.shape)
        return tensor

    inputs = torch.rand(1, 1, 12, 12, 12)
    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        head(backbone(inputs)).sum().backward()
    with_backbone = list(saved)
    saved.clear()
    features = backbone(inputs)
    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        head(features).sum().backward()
    assert with_backbone == saved and saved, "the frozen backbone must add nothing to the graph"
    assert all(p.grad is None for p in backbone.parameters())


def test_a_frozen_backbone_runs_sample_by_sample_under_its_own_names():
    """The batch is split before the frozen module (activation memory of one sample), the
    result is the whole batch's, parameter names are unchanged (checkpoints, weights), and
    a deep copy runs its own parameters."""
    import copy

    from cellmap_repro.model import frozen

    plain = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 1))
    names = [name for name, _ in plain.named_parameters()]
    inputs = torch.rand(3, 1, 8, 8, 8)
    expected = plain(inputs)
    backbone = frozen(plain)
    seen = []
    backbone[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    assert torch.allclose(backbone(inputs), expected, atol=1e-6)
    assert seen == [1, 1, 1]
    assert [name for name, _ in backbone.named_parameters()] == names
    twin = copy.deepcopy(backbone)
    with torch.no_grad():
        for parameter in twin.parameters():
            parameter.zero_()
    assert torch.count_nonzero(twin(inputs)) == 0 and torch.allclose(backbone(inputs), expected, atol=1e-6)


@pytest.mark.parametrize("case", ["finite", "nan", "inf", "constant"])
def test_min_max_normalize_is_the_baselines_normalize(case):
    """Per-patch min-max as the baseline's Normalize computed it: min and max of the patch
    with NaN as 0 (and inf clipped), NaN kept, a constant patch unchanged."""
    import torch

    from cellmap_repro.transforms import MinMaxNormalize

    patch = torch.rand(9, 10, 11, generator=torch.Generator().manual_seed(3)) * 0.6 + 0.2
    if case == "nan":
        patch[1, 2, 3] = float("nan")
    if case == "inf":
        patch[4, 5, 6] = float("inf")
    if case == "constant":
        patch = torch.full((4, 4, 4), 0.3)
    finite = patch.nan_to_num()
    spread = finite.max() - finite.min()
    expected = patch if spread == 0 else (patch - finite.min()) / spread
    result = MinMaxNormalize()(patch)
    assert torch.equal(result.nan_to_num(nan=-7.0), expected.nan_to_num(nan=-7.0))
    if case == "finite":
        assert result.min() == 0.0 and result.max() == 1.0
