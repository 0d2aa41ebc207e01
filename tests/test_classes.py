from cellmap_repro import classes as challenge_classes
from cellmap_repro.classes import class_relations, class_table, instance_classes





def test_table_has_the_48_tested_classes_in_table_order():
    tested = challenge_classes.tested_classes()
    assert len(tested) == 48
    assert tested[:3] == ["ecs", "pm", "mito_mem"]
    assert set(instance_classes()) >= {"nuc", "ves", "endo", "lyso", "ld", "perox", "mito", "np", "mt", "cell"}


def test_mutual_exclusion_follows_the_toolbox_rule():
    relations = class_relations(challenge_classes.tested_classes())
    assert set(relations["ecs"]) == set(challenge_classes.tested_classes()) - {"ecs"}
    assert relations["cell"] == ["ecs"]
    related_to_mito = set(challenge_classes.tested_classes()) - set(relations["mito"]) - {"mito"}
    assert related_to_mito == {"mito_mem", "mito_lum", "mito_ribo", "cell"}
    assert set(challenge_classes.tested_classes()) - set(relations["pm"]) - {"pm"} == {"cell"}
    # symmetric
    for a, excluded in relations.items():
        for b in excluded:
            assert a in relations[b]


def test_relations_are_lists_because_cellmap_data_ignores_sets():
    relations = class_relations(["ecs", "mito", "nuc"])
    assert all(isinstance(v, list) for v in relations.values())
    assert relations == {"ecs": ["mito", "nuc"], "mito": ["ecs", "nuc"], "nuc": ["ecs", "mito"]}


def test_composite_ids_come_from_the_table():
    table = class_table()
    assert table["mito"].id_set == {50, 3, 4, 5}
    assert table["cell"].instance and table["cell"].tested
