"""Scenarios: data sets of the shapes world described as attribute distributions.

Scenarios live in ``scenarios.toml`` (or any TOML file of the same form), so adding
one needs no code. A :class:`WorldDataset` streams scenes from the renderer: sample
``i`` of a split is a pure function of (scenario seed, split, i).
"""

from __future__ import annotations

import operator
import tomllib
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import torch

from .render import ATTRIBUTE_VALUES, MIN_IMAGE_SIZE, SHAPES, Scene, SceneSpec, render, whole_number

SPLITS: tuple[str, ...] = ("train", "val", "test")
SCENARIOS_FILE = Path(__file__).with_name("scenarios.toml")
_SAMPLED_ATTRIBUTES = ("colour", "texture", "background", "artifact")


@dataclass(frozen=True)
class Focus:
    """The planted correlation: ``klass`` co-occurs with ``attribute == value`` in train."""

    klass: str
    attribute: str
    value: str


@dataclass(frozen=True)
class Scenario:
    """Per-split, per-class attribute distributions (probability vectors)."""

    name: str
    description: str
    sizes: Mapping[str, int]
    group_attribute: str
    distributions: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]] = field(repr=False)
    focus: Focus | None = None
    classes: tuple[str, ...] = SHAPES
    classifier_epochs: int | None = None  # the shipped classifier's training length, if not the default

    def distribution(self, split: str, klass: str, attribute: str) -> np.ndarray:
        """Probabilities over ``ATTRIBUTE_VALUES[attribute]`` for ``klass`` in ``split``."""
        return self.distributions[split][klass][attribute]

    def dataset(self, split: str, size: int | None = None, image_size: int = 64) -> WorldDataset:
        return WorldDataset(self, split, size=size, image_size=image_size)


def load_scenarios(path: str | Path = SCENARIOS_FILE) -> dict[str, Scenario]:
    """Parse a scenarios TOML file; raises ``ValueError`` naming the file and the bad entry."""
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
        return {name: _parse_scenario(name, _table(f"scenario {name}", body)) for name, body in raw.items()}
    except ValueError as error:  # TOMLDecodeError is one, with its line and column
        raise ValueError(f"{path}: {error}") from None


@cache
def _builtin_scenarios() -> dict[str, Scenario]:
    return load_scenarios(SCENARIOS_FILE)


def get_scenario(name: str) -> Scenario:
    """A scenario shipped with explaind, by name."""
    scenarios = _builtin_scenarios()
    if name not in scenarios:
        raise KeyError(f"unknown scenario {name!r}; known: {sorted(scenarios)}")
    return scenarios[name]


def scenario_names() -> list[str]:
    return list(_builtin_scenarios())


_SCENARIO_KEYS = ("description", "sizes", "groups", "focus", "classifier_epochs", *SPLITS)
_SPLIT_KEYS = ("inherit", "default", "classes")


def _table(where: str, value: object) -> dict:
    """A TOML table, or ValueError: a string where a table belongs was read as its letters."""
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a table, got {value!r}")
    return value


def _text(where: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {value!r}")
    return value


def _refuse_unknown(where: str, kind: str, given, known) -> None:
    """A misspelt key (``color``, ``trian``) would otherwise be ignored without a word."""
    unknown = set(given) - set(known)
    if unknown:
        raise ValueError(f"{where}: unknown {kind} {sorted(unknown)}; expected {tuple(known)}")


def _parse_scenario(name: str, body: dict) -> Scenario:
    _refuse_unknown(f"scenario {name}", "keys", body, _SCENARIO_KEYS)
    given_sizes = _table(f"scenario {name}: sizes", body.get("sizes", {}))
    _refuse_unknown(f"scenario {name}: sizes", "splits", given_sizes, SPLITS)
    sizes = {split: whole_number(f"scenario {name}: sizes.{split}", given_sizes.get(split, 1000), 1) for split in SPLITS}
    distributions: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for split in SPLITS:
        section = _table(f"scenario {name}: {split}", body.get(split, {}))
        _refuse_unknown(f"scenario {name}: {split}", "keys", section, _SPLIT_KEYS)
        if "inherit" in section:
            parent = _text(f"scenario {name}: {split}.inherit", section["inherit"])
            if parent not in distributions:
                raise ValueError(f"scenario {name}: split {split} inherits {parent!r}, which is not defined before it")
            if set(section) != {"inherit"}:  # they would be ignored without a word
                raise ValueError(f"scenario {name}: split {split} inherits {parent!r}, so it cannot also set "
                                 f"{sorted(set(section) - {'inherit'})}")
            distributions[split] = distributions[parent]
            continue
        default = _table(f"scenario {name}: {split}.default", section.get("default", {}))
        per_class = _table(f"scenario {name}: {split}.classes", section.get("classes", {}))
        _refuse_unknown(f"scenario {name}: {split}.classes", "classes", per_class, SHAPES)
        _refuse_unknown(f"scenario {name}: {split}.default", "attributes", default, _SAMPLED_ATTRIBUTES)
        for klass, attributes in per_class.items():
            _refuse_unknown(f"scenario {name}: {split}.classes.{klass}", "attributes",
                            _table(f"scenario {name}: {split}.classes.{klass}", attributes), _SAMPLED_ATTRIBUTES)
        for where, attributes in (("default", default), *((f"classes.{klass}", given) for klass, given in per_class.items())):
            for attribute, weights in attributes.items():  # named where written, not at the first class that reads it
                _table(f"scenario {name}: {split}.{where}.{attribute}", weights)
        distributions[split] = {
            klass: {
                attribute: _probabilities(
                    f"{name}.{split}.{klass}.{attribute}",
                    attribute,
                    per_class.get(klass, {}).get(attribute, default.get(attribute)),
                )
                for attribute in _SAMPLED_ATTRIBUTES
            }
            for klass in SHAPES
        }
    focus = _table(f"scenario {name}: focus", body["focus"]) if "focus" in body else None
    if focus is not None:
        _refuse_unknown(f"scenario {name}: focus", "keys", focus, ("class", "attribute", "value"))
        attribute = focus.get("attribute")
        if not all(isinstance(focus.get(key), str) for key in ("class", "attribute", "value")) or focus["class"] not in SHAPES \
                or attribute not in ATTRIBUTE_VALUES or focus.get("value") not in ATTRIBUTE_VALUES[attribute]:
            raise ValueError(f"scenario {name}: focus must name a class of {SHAPES}, an attribute and one of its values, got {focus}")
    group_attribute = _text(f"scenario {name}: groups", body.get("groups", "background"))
    if group_attribute not in ATTRIBUTE_VALUES:
        raise ValueError(f"scenario {name}: groups must name an attribute, got {group_attribute!r}")
    return Scenario(
        name=name,
        description=_text(f"scenario {name}: description", body.get("description", "")),
        sizes=sizes,
        group_attribute=group_attribute,
        distributions=distributions,
        focus=Focus(focus["class"], focus["attribute"], focus["value"]) if focus is not None else None,
        classifier_epochs=whole_number(f"scenario {name}: classifier_epochs", body["classifier_epochs"], 1) if "classifier_epochs" in body else None,
    )


def _probabilities(where: str, attribute: str, weights: Mapping[str, float] | None) -> np.ndarray:
    values = ATTRIBUTE_VALUES[attribute]
    if weights is None:
        weights = {"none": 1.0} if attribute == "artifact" else {"*": 1.0}
    _refuse_unknown(where, "values", weights, (*values, "*"))  # a table: _parse_scenario checked it where it was written
    for value, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"{where}.{value}: a weight must be a number, got {weight!r}")
    named = {v: float(w) for v, w in weights.items() if v != "*"}
    rest = [v for v in values if v not in named]
    if "*" in weights and not rest:  # its weight would be dropped without a word
        raise ValueError(f"{where}: '*' has no value left to share its weight; every value is named")
    share = float(weights.get("*", 0.0)) / len(rest) if rest else 0.0
    probs = np.array([named.get(v, share) for v in values], dtype=np.float64)
    with np.errstate(over="ignore"):  # finite weights may sum past the float range: inf, refused below
        total = probs.sum()
    if not np.isfinite(total) or total <= 0 or (probs < 0).any():  # nan passes the comparisons
        raise ValueError(f"{where}: weights must be finite and non-negative with a positive sum")
    return probs / total


@dataclass
class WorldBatch:
    """A batch of scenes as tensors: ``images`` (N, 3, H, W) float in [0, 1]."""

    images: torch.Tensor
    labels: torch.Tensor
    attributes: dict[str, np.ndarray]
    captions: list[str]
    specs: list[SceneSpec]

    def groups(self, attribute: str) -> np.ndarray:
        """Group names ``"<class>/<value>"`` per sample, (N,): as the service names groups."""
        classes = np.array(SHAPES)[self.labels.numpy()]
        return np.char.add(np.char.add(classes.astype(str), "/"), self.attributes[attribute].astype(str))


class WorldDataset(torch.utils.data.Dataset):
    """Scenes of one split of a scenario, rendered on demand (nothing is written to disk)."""

    def __init__(self, scenario: Scenario, split: str, size: int | None = None, image_size: int = 64) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.scenario = scenario
        self.split = split
        self.size = scenario.sizes[split] if size is None else whole_number("size", size, 1)
        self.image_size = whole_number("image_size", image_size, MIN_IMAGE_SIZE)
        self._seed = zlib.crc32(f"{scenario.name}/{split}".encode())

    def __len__(self) -> int:
        return self.size

    def spec(self, index: int) -> SceneSpec:
        if isinstance(index, bool) or not hasattr(index, "__index__"):  # 1.5 failed in numpy: "seed must be integer"
            raise TypeError(f"index must be an integer, got {index!r}")
        index = operator.index(index)  # a numpy integer or a 0-d integer tensor as an int
        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = np.random.default_rng([self._seed, index])
        klass = SHAPES[index % len(SHAPES)]
        drawn = {
            attribute: ATTRIBUTE_VALUES[attribute][
                rng.choice(len(ATTRIBUTE_VALUES[attribute]), p=self.scenario.distribution(self.split, klass, attribute))
            ]
            for attribute in _SAMPLED_ATTRIBUTES
        }
        return SceneSpec(
            shape=klass,
            colour=drawn["colour"],
            texture=drawn["texture"],
            background=drawn["background"],
            artifact=drawn["artifact"] == "watermark",
            seed=int(rng.integers(2**31)),
            size=self.image_size,
        )

    def __getitem__(self, index: int) -> Scene:
        return render(self.spec(index))

    def batch(self, indices: range | list[int]) -> WorldBatch:
        return collate([self[i] for i in indices])

    def batches(self, batch_size: int) -> Iterator[WorldBatch]:
        for start in range(0, self.size, batch_size):
            yield self.batch(range(start, min(start + batch_size, self.size)))

    def all(self) -> WorldBatch:
        return self.batch(range(self.size))


def collate(scenes: list[Scene]) -> WorldBatch:
    images = np.stack([scene.image for scene in scenes])
    return WorldBatch(
        images=torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0),
        labels=torch.tensor([SHAPES.index(scene.spec.shape) for scene in scenes], dtype=torch.long),
        attributes={
            attribute: np.array([scene.attributes[attribute] for scene in scenes]) for attribute in ATTRIBUTE_VALUES
        },
        captions=[scene.caption for scene in scenes],
        specs=[scene.spec for scene in scenes],
    )
