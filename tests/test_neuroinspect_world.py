"""NeuroInspect acceptance on the shipped spurious_background classifier: the top-ranked
neurons behind the heart's mistakes are background (water / not-water) neurons, and
editing them repairs the worst group (issue 4, acceptance 2 and 3; the full table is
bench/neuroinspect_eval.py, the sensitivity to seeds and training length
docs/neuroinspect.md)."""

import pytest

from explaind.methods.neuroinspect import FeatureExtractor, HeadEditor, MistakeNeuronRanker, neuron_auc, neuron_importance
from explaind.world.assets import classifier_dir
from explaind.world.classifier import load_classifier
from explaind.world.probes import probe_batch
from explaind.world.scenarios import get_scenario

SCENARIO = get_scenario("spurious_background")
SHIPPED = (classifier_dir(SCENARIO.name) / "model.safetensors").is_file()
pytestmark = pytest.mark.skipif(not SHIPPED, reason="shipped spurious_background classifier not built yet")


@pytest.fixture(scope="module")
def setup():
    model = load_classifier(classifier_dir(SCENARIO.name))
    extractor = FeatureExtractor(model, feature_layer=model.config.feature_layer, head=model.config.head)
    focus = SCENARIO.focus
    probe = probe_batch(600, seed=0)
    auc = neuron_auc(extractor.features(probe.images), probe.attributes[focus.attribute] == focus.value)
    test = SCENARIO.dataset("test", size=1800).all()
    target_class = model.config.class_names.index(focus.klass)
    return extractor, auc, test, extractor.features(test.images), target_class


def water_neuron_precision(ranked, auc):
    """Direction-aware: an insufficient neuron should fire on water, an excessive one on all but water."""
    hits = [auc[n.neuron] >= 0.8 if n.direction == "insufficient" else auc[n.neuron] <= 0.2 if n.direction == "excessive"
            else max(auc[n.neuron], 1 - auc[n.neuron]) >= 0.8 for n in ranked]
    return sum(bool(h) for h in hits) / len(hits)


@pytest.fixture(scope="module")
def ranking(setup):
    extractor, _, test, features, target_class = setup
    return MistakeNeuronRanker(extractor.head).rank(features[:900], test.labels[:900], target_class=target_class)


def test_top3_neurons_behind_the_hearts_mistakes_are_background_neurons(setup, ranking):
    _, auc, _, _, _ = setup
    assert ranking.num_mistakes >= 20 and ranking.num_converged == ranking.num_mistakes
    # Each of the top 3 must separate water from the other backgrounds (AUC >= 0.8) in
    # the direction its ω points: an insufficient neuron fires on water, an excessive one
    # on every background but water ("not water" is what sinks a heart on grass).
    top3 = [(n.neuron, n.direction, round(float(auc[n.neuron]), 2)) for n in ranking.neurons[:3]]
    assert water_neuron_precision(ranking.neurons[:3], auc) >= 2 / 3, top3


@pytest.fixture(scope="module")
def edited(setup, ranking):
    """The default edit of the top-3 ranked neurons, and the heart's mean train feature."""
    extractor, _, test, features, target_class = setup
    train = SCENARIO.dataset("train", size=3000).all()
    train_features = extractor.features(train.images)
    validation = probe_batch(600, seed=1)
    edit = HeadEditor(extractor.head).edit(
        train_features, train.labels, target_class=target_class, neurons=ranking.neuron_ids[:3],
        validation_features=extractor.features(validation.images), validation_labels=validation.labels,
        evaluation_features=features[900:], evaluation_labels=test.labels[900:],
        evaluation_groups=test.groups(SCENARIO.group_attribute)[900:],
    )
    return edit, train_features[train.labels == target_class].mean(0)


def test_editing_neutralises_the_ranked_neurons_without_hurting_accuracy(setup, edited):
    extractor, _, _, _, target_class = setup
    edit, class_mean = edited
    neurons = list(edit.neurons)
    before = neuron_importance(extractor.head.weight.detach(), extractor.head.bias.detach(), class_mean, target_class)
    after = neuron_importance(edit.weight, edit.bias, class_mean, target_class)
    assert (after[neurons] - 1).abs().sum() < 0.5 * (before[neurons] - 1).abs().sum()
    assert edit.after.accuracy >= edit.before.accuracy - 0.02
    assert edit.history[-1].penalty < 0.5 * edit.history[0].penalty


def test_editing_the_ranked_neurons_repairs_the_worst_group(edited):
    edit, _ = edited
    before, after = edit.before, edit.after
    assert after.worst_group[1] >= before.worst_group[1] + 0.10, (before.worst_group, after.worst_group)
    assert after.accuracy >= before.accuracy - 0.02


def test_the_ranking_of_the_shapes_world_shows_in_a_few_lines(ranking):
    # Its repr was some 5 kB: every neuron and mistake index.
    assert len(repr(ranking)) < 120
    lines = ranking.summary().splitlines()
    assert len(lines) == 3 + min(10, len(ranking.neurons)) and lines[0].startswith(f"{ranking.num_mistakes} mistakes of class ")
