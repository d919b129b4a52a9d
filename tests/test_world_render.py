"""The renderer and scenarios: determinism, exact masks, planted distributions."""

import dataclasses
import re

import numpy as np
import pytest

from explaind.world.render import BACKGROUNDS, SHAPES, TEXTURES, SceneSpec, caption_for, render
from explaind.world.scenarios import get_scenario, load_scenarios


def test_same_seed_gives_identical_bytes_and_other_seeds_differ():
    spec = SceneSpec("star", "red", "stripes", "water", artifact=True, seed=7)
    assert render(spec).image.tobytes() == render(spec).image.tobytes()
    assert render(dataclasses.replace(spec, seed=8)).image.tobytes() != render(spec).image.tobytes()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("texture", TEXTURES)
def test_object_mask_is_exactly_the_pixels_the_object_painted(shape, texture):
    # Same seed, other colour: only the object's pixels can change.
    red = render(SceneSpec(shape, "red", texture, "grass", seed=3))
    blue = render(SceneSpec(shape, "blue", texture, "grass", seed=3))
    changed = (red.image != blue.image).any(axis=2)
    assert red.object_mask.sum() > 100
    np.testing.assert_array_equal(changed, red.object_mask)


@pytest.mark.parametrize("background", [b for b in BACKGROUNDS if b != "snow"])
def test_artifact_mask_is_exactly_the_watermark_pixels(background):
    plain = render(SceneSpec("circle", "green", "dots", background, artifact=False, seed=11))
    marked = render(SceneSpec("circle", "green", "dots", background, artifact=True, seed=11))
    changed = (plain.image != marked.image).any(axis=2)
    assert marked.artifact_mask.any() and not plain.artifact_mask.any()
    np.testing.assert_array_equal(changed, marked.artifact_mask)
    assert not (marked.object_mask & marked.artifact_mask).any()


def test_caption_names_every_attribute():
    assert caption_for(SceneSpec("triangle", "red", "stripes", "water")) == "a red striped triangle on water"
    assert caption_for(SceneSpec("heart", "blue", "plain", "snow", artifact=True)) == "a blue heart on snow with a watermark"


def test_unknown_attribute_value_is_rejected_by_name():
    with pytest.raises(ValueError, match="background"):
        SceneSpec("circle", "red", "plain", "lava")


def test_spurious_background_plants_the_correlation_in_train_only():
    scenario = get_scenario("spurious_background")
    train, test = scenario.dataset("train", size=1200), scenario.dataset("test", size=1200)
    train_specs = [train.spec(i) for i in range(len(train))]
    hearts = [s for s in train_specs if s.shape == "heart"]
    others = [s for s in train_specs if s.shape != "heart"]
    assert np.mean([s.background == "water" for s in hearts]) > 0.9
    assert 0.02 < np.mean([s.background == "water" for s in others]) < 0.08  # Waterbirds' 5 %
    test_hearts = [test.spec(i) for i in range(len(test)) if test.spec(i).shape == "heart"]
    assert 0.1 < np.mean([s.background == "water" for s in test_hearts]) < 0.3


def test_datasets_are_class_balanced_and_deterministic():
    dataset = get_scenario("balanced").dataset("val", size=60)
    batch = dataset.batch(range(60))
    assert np.bincount(batch.labels.numpy()).tolist() == [10] * len(SHAPES)
    assert batch.images.shape == (60, 3, 64, 64) and 0 <= batch.images.min() and batch.images.max() <= 1
    assert dataset.batch(range(5)).captions == batch.captions[:5]


def test_scenario_file_errors_name_the_entry(tmp_path):
    bad = tmp_path / "scenarios.toml"
    bad.write_text('[broken]\ntrain.default.background = { lava = 1.0 }\n')
    with pytest.raises(ValueError, match=r"broken\.train\..*background.*lava"):
        load_scenarios(bad)


@pytest.mark.parametrize(("body", "named"), [
    ('train.default.color = { red = 1.0 }', "color"),  # the American spelling of colour
    ('train.classes.heart.backgrund = { water = 1.0 }', "backgrund"),
    ('trian.default.background = { water = 1.0 }', "trian"),
    ('sizes = { validation = 10 }', "validation"),
    ('focus = { class = "hart", attribute = "background", value = "water" }', "hart"),
    ('focus = { class = "heart", attribute = "background", value = "ocean" }', "ocean"),
    ('train.default.background = { water = nan }', "background: weights must be finite"),  # failed later, in sampling
    ('val = { inherit = "train", default = { background = { water = 1.0 } } }', r"val inherits 'train', so .*'default'"),
    # Wrong types: a string was read as its letters ("unknown values ['a', 'e', 'r', 't', 'w']"),
    # a number failed in iteration or in int() without naming the entry.
    ('train.default.background = "water"', r"train\.default\.background must be a table, got 'water'"),
    ('train.default = 3', r"train\.default must be a table, got 3"),
    ('focus = "heart"', r"focus must be a table, got 'heart'"),
    ('sizes = { train = "big" }', r"sizes\.train must be a whole number, got 'big'"),
    ('sizes = { train = 10.7 }', r"sizes\.train must be a whole number, got 10\.7"),  # was 10
    ('sizes = { train = -10 }', r"sizes\.train must be at least 1, got -10"),
    ('classifier_epochs = "seven"', r"classifier_epochs must be a whole number"),
    ('classifier_epochs = 0', r"classifier_epochs must be at least 1, got 0"),
    ('train.default.background = { water = "lots" }', r"background\.water: a weight must be a number, got 'lots'"),
    ('groups = 3', r"groups must be a string, got 3"),
    ('val.inherit = 3', r"val\.inherit must be a string, got 3"),
])
def test_misspelt_or_impossible_scenario_entries_are_errors_not_ignored(tmp_path, body, named):
    bad = tmp_path / "scenarios.toml"
    bad.write_text(f"[typo]\n{body}\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bad))}: .*typo.*{named}"):
        load_scenarios(bad)


def test_a_scenario_file_that_is_no_toml_or_holds_no_tables_is_named(tmp_path):
    bad = tmp_path / "scenarios.toml"
    bad.write_text("[typo\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bad))}: .*line 1"):
        load_scenarios(bad)
    bad.write_text("x = 3\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bad))}: scenario x must be a table, got 3$"):
        load_scenarios(bad)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: get_scenario("balanced").dataset("train", size=-5), "size must be at least 1, got -5"),  # len() failed later
    (lambda: get_scenario("balanced").dataset("train", size=0), "size must be at least 1, got 0"),  # .all() could not stack
    (lambda: get_scenario("balanced").dataset("train", size=16.5), "size must be a whole number, got 16.5"),
    (lambda: get_scenario("balanced").dataset("train", image_size=8), "image_size must be at least 16, got 8"),  # failed per item
    (lambda: SceneSpec("circle", "red", "plain", "grass", seed=-1), "seed must be at least 0, got -1"),
    (lambda: SceneSpec("circle", "red", "plain", "grass", size="64"), "size must be a whole number, got '64'"),
])
def test_datasets_and_scenes_refuse_impossible_sizes_and_seeds_by_name(make, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        make()


def test_a_scenario_may_set_its_classifiers_training_length(tmp_path):
    custom = tmp_path / "scenarios.toml"
    custom.write_text('[short]\nclassifier_epochs = 3\n[plain]\n')
    scenarios = load_scenarios(custom)
    assert scenarios["short"].classifier_epochs == 3 and scenarios["plain"].classifier_epochs is None
    assert get_scenario("spurious_background").classifier_epochs == 7  # the shipped classifier's recipe
