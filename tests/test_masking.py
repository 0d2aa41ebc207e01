"""True-negative masking must keep working: unknown stays NaN, an exclusive class present gives 0."""

import torch

from cellmap_repro import data
from cellmap_repro.classes import class_relations
from cellmap_repro.experiment import load_experiment


def sample(training, usage: str, crop: int, position: int):
    """Sample ``position`` of the ``crop``-th crop of a split, as the training loop reads it."""
    plan = training.train if usage == "train" else training.validate
    spec = plan.specs[crop]
    return plan.read(int(plan.starts[crop]) + position % spec.size, seed=position)


def test_unannotated_class_is_nan_except_where_an_exclusive_class_is_present(fast_experiment):
    training = data.build(load_experiment("fast"))
    classes = training.classes
    relations = class_relations(classes)
    annotated_in_crop2 = set(training.rows[1].classes)
    assert "nuc" not in annotated_in_crop2 and "golgi" not in annotated_in_crop2
    checked = 0
    for position in range(0, 400, 37):
        target = sample(training, "train", 1, position)["output"]
        for unannotated in ("nuc", "golgi"):
            values = target[classes.index(unannotated)]
            exclusive_present = torch.zeros_like(values, dtype=torch.bool)
            for other in relations[unannotated]:
                if other in annotated_in_crop2:
                    exclusive_present |= target[classes.index(other)] > 0
            known = ~torch.isnan(values)
            assert torch.all(values[known] == 0), f"{unannotated}: an unannotated class must never become 1"
            assert torch.equal(known, exclusive_present), f"{unannotated}: known exactly where an exclusive class is present"
            checked += int(exclusive_present.sum())
    assert checked > 0, "the samples must contain voxels where masking applies"


def test_annotated_classes_keep_their_truth(fast_experiment):
    training = data.build(load_experiment("fast"))
    target = sample(training, "validate", 0, 5)["output"]  # crop 3 annotates nuc and ves
    for name in ("ecs", "mito", "nuc", "ves", "cell"):
        values = target[training.classes.index(name)]
        assert not torch.isnan(values).any()
        assert set(values.unique().tolist()) <= {0.0, 1.0}
    cell = target[training.classes.index("cell")]
    ecs = target[training.classes.index("ecs")]
    assert torch.all(cell + ecs == 1)


def test_masking_off_leaves_unknown_nan(fast_experiment):
    path = fast_experiment / "data.py"
    path.write_text(path.read_text() + "\nuse_mutual_exclusion = False\n")
    training = data.build(load_experiment("fast"))
    target = sample(training, "train", 1, 0)["output"]
    assert torch.isnan(target[training.classes.index("nuc")]).all()
