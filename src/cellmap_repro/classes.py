"""The challenge's class table: names, ids, composites, instance and tested flags.

The table is the packaged copy of the toolbox's class list (``resources/classes.csv``).
Mutual exclusion follows the toolbox's ``get_class_relations``: two classes are
related when their id sets (own id plus included ids) intersect; every class maps to
the classes it is *not* related to.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Iterable, Sequence

from cellmap_repro.errors import ReproError


@dataclass(frozen=True)
class ChallengeClass:
    name: str
    id: int
    includes: frozenset[int]
    instance: bool
    tested: bool

    @property
    def id_set(self) -> frozenset[int]:
        return self.includes | {self.id}


@lru_cache(maxsize=1)
def class_table() -> dict[str, ChallengeClass]:
    text = resources.files("cellmap_repro").joinpath("resources/classes.csv").read_text()
    table = {}
    for row in csv.DictReader(text.splitlines()):
        table[row["name"]] = ChallengeClass(
            name=row["name"],
            id=int(row["id"]),
            includes=frozenset(int(i) for i in row["includes"].split()),
            instance=row["instance"] == "1",
            tested=row["tested"] == "1",
        )
    return table


def tested_classes() -> list[str]:
    """The 48 scored classes, in the table's order (the baseline's output channels)."""
    return [c.name for c in class_table().values() if c.tested]


def instance_classes() -> list[str]:
    return [c.name for c in class_table().values() if c.instance]


def check_classes(names: Iterable[str], where: str) -> list[str]:
    """Return ``names`` as a list, or fail naming the first unknown class and ``where``."""
    table = class_table()
    names = list(names)
    for name in names:
        if name not in table:
            raise ReproError(f"{where}: unknown class {name!r} (not in the challenge class table)")
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ReproError(f"{where}: class listed twice: {', '.join(duplicates)}")
    return names


def class_relations(named_classes: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Map each class to the classes that are mutually exclusive with it, sorted.

    With ``named_classes``, both sides are restricted to those classes, as the
    toolbox does when it passes the training class list. The values are lists because
    cellmap-data only infers true negatives from a ``list`` (a set silently disables it).
    """
    table = class_table()
    names = list(named_classes) if named_classes is not None else list(table)
    check_classes(names, "class relations")
    return {
        a: sorted(b for b in names if b != a and not (table[a].id_set & table[b].id_set))
        for a in names
    }
