import shutil

import pytest

from cellmap_repro.errors import ReproError
from cellmap_repro.experiment import load_experiment

from conftest import FAST_EXPERIMENT


@pytest.fixture
def experiment_copy(tmp_path):
    root = tmp_path / "experiments"
    shutil.copytree(FAST_EXPERIMENT, root / "fast", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_loads_and_validates(experiment_copy):
    experiment = load_experiment("fast", experiment_copy)
    assert experiment.train.learning_rate == 1e-3
    assert experiment.train.classes[0] == "ecs"
    assert experiment.train.input_array_info.shape == (40, 40, 40)
    assert experiment.process.checkpoint == "latest"
    assert experiment.datasplit_path == experiment_copy / "fast" / "datasplit.csv"


def test_misspelt_variable_is_named(experiment_copy):
    path = experiment_copy / "fast" / "train_config.py"
    path.write_text(path.read_text().replace("learning_rate = 1e-3", "learning_rate = 1e-3\nlearning_rat = 1e-4"))
    with pytest.raises(ReproError, match=r"train_config.py: unknown variable 'learning_rat'"):
        load_experiment("fast", experiment_copy)


def test_missing_required_variable_is_named(experiment_copy):
    path = experiment_copy / "fast" / "train_config.py"
    path.write_text(path.read_text().replace("batch_size = 2\n", ""))
    with pytest.raises(ReproError, match="required variable 'batch_size'"):
        load_experiment("fast", experiment_copy)


def test_bad_value_is_named(experiment_copy):
    path = experiment_copy / "fast" / "process_config.py"
    path.write_text("threshold = 0.0\nconnectivity = 5\n")
    with pytest.raises(ReproError, match="process_config.py: variable 'connectivity'"):
        load_experiment("fast", experiment_copy)


def test_unknown_class_in_config(experiment_copy):
    path = experiment_copy / "fast" / "data.py"
    path.write_text(path.read_text().replace('"golgi"', '"golgi_apparatus"'))
    with pytest.raises(ReproError, match="unknown class 'golgi_apparatus'"):
        load_experiment("fast", experiment_copy, parts=("data",))


def test_unknown_experiment_lists_the_available_ones(experiment_copy):
    with pytest.raises(ReproError, match=r"unknown experiment 'nope'.*available: fast"):
        load_experiment("nope", experiment_copy)


def test_private_names_and_helpers_are_free(experiment_copy):
    path = experiment_copy / "fast" / "process_config.py"
    path.write_text("import math\n_base = 0.5\ndef helper():\n    return 1\nthreshold = math.log(_base / (1 - _base))\n")
    assert load_experiment("fast", experiment_copy, parts=("process_config",)).process.threshold == 0.0
