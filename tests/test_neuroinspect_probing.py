"""Ground-truth neuron labelling: per-neuron AUC and the concept detectors picked from it."""

import numpy as np
import pytest
import torch

from explaind.methods.neuroinspect import concept_neurons, neuron_auc


@pytest.fixture()
def labelled_features():
    """(200, 8) features: neurons 2 and 5 fire on concept "a" (5 harder), neuron 7 fires on
    "b" with heavy overlap, the rest are noise."""
    generator = torch.Generator().manual_seed(0)
    is_a = torch.arange(200) % 2 == 0
    is_b = torch.arange(200) % 3 == 0
    features = torch.rand(200, 8, generator=generator)
    features[:, 2] += 2.0 * is_a
    features[:, 5] += 4.0 * is_a
    features[:, 7] += 0.4 * is_b  # AUC about 0.82
    return features, {"a": is_a.numpy(), "b": is_b.numpy()}


def test_auc_is_one_for_a_perfect_detector_zero_for_its_inverse_and_half_for_ties(labelled_features):
    features, concepts = labelled_features
    auc = neuron_auc(torch.cat([features, torch.ones(200, 1)], dim=1), concepts["a"])
    assert auc[2] == auc[5] == 1.0
    assert neuron_auc(-features, concepts["a"])[5] == 0.0
    assert auc[8] == 0.5  # a constant neuron: every pair tied
    assert 0.3 < auc[[0, 1, 3, 4, 6, 7]].min() and auc[[0, 1, 3, 4, 6, 7]].max() < 0.7


def test_concept_neurons_are_the_detectors_strongest_first(labelled_features):
    features, concepts = labelled_features
    b_auc = float(neuron_auc(features, concepts["b"])[7])
    assert 0.75 < b_auc < 0.9
    found = concept_neurons(features, concepts, min_auc=0.9)
    assert found == {"a": [5, 2], "b": []}
    assert concept_neurons(features, concepts, min_auc=0.75)["b"] == [7]
    assert concept_neurons(features, concepts, min_auc=b_auc)["b"] == [7]  # "AUC >= min_auc": a tie detects
    assert concept_neurons(features, {("shape", "a"): concepts["a"]}, per_concept=1) == {("shape", "a"): [5]}


def test_equally_strong_detectors_are_listed_by_neuron():
    # Indicator features (0/1, as a probe's binary attributes are) make detectors of one
    # mean: an unstable sort listed 20 of them as 10, 19, 18, not 0, 1, 2.
    positive = torch.arange(8) < 4
    features = positive.float()[:, None].repeat(1, 20)
    assert concept_neurons(features, {"c": positive}) == {"c": [0, 1, 2]}


@pytest.mark.parametrize("min_auc", [0.5, 1.2])
def test_concept_neurons_rejects_a_threshold_that_is_no_detector(labelled_features, min_auc):
    features, concepts = labelled_features
    with pytest.raises(ValueError, match="min_auc"):
        concept_neurons(features, concepts, min_auc=min_auc)


def test_auc_needs_both_classes_and_one_label_per_sample(labelled_features):
    features, _ = labelled_features
    with pytest.raises(ValueError, match="positive"):
        neuron_auc(features, np.ones(200, dtype=bool))
    with pytest.raises(ValueError, match="positive"):
        neuron_auc(features, np.ones(10, dtype=bool))


def test_strongest_is_the_mean_activation_not_one_outlying_sample():
    # Neuron 0 fires at 1 on every positive; neuron 1 at 0.5, once at 5: both detect the
    # concept perfectly, and neuron 0 is the stronger on average.
    positive = torch.arange(200) % 2 == 0
    features = torch.zeros(200, 2)
    features[positive, 0] = 1.0
    features[positive, 1] = 0.5
    features[0, 1] = 5.0
    assert concept_neurons(features, {"a": positive}) == {"a": [0, 1]}
