"""NeuroInspect (Ju et al., 2023): explain a classifier's mistakes through its neurons.

Three engines, each one class with one entry method, on cached features or images:

* :class:`MistakeNeuronRanker` ``.rank(features, labels)``: counterfactual shifts ω per
  mistake and the neurons most often behind them (``faithful`` or ``proximal`` solver).
* :class:`ClipIllusion` ``.visualize(pairs)``: class-conditional feature visualisation.
* :class:`HeadEditor` ``.edit(features, labels, target_class=, neurons=,
  validation_features=, validation_labels=)``: retrain the linear head with the
  probability-ratio regulariser (or the ``constrain`` baseline).

:class:`FeatureExtractor` turns images into the (N, D) features the first and last need.
README.md ("The methods in-process") has a worked example on the shapes world.
"""

from ._counterfactual import (
    SOLVERS,
    CounterfactualSolution,
    CounterfactualSolver,
    FaithfulSGD,
    ProximalGradient,
    ShiftsOverflowed,
    SolverCallback,
    make_solver,
)
from ._editing import METHODS as EDIT_METHODS
from ._editing import EpochCallback, EpochRecord, HeadEdit, HeadEditor, HeadEvaluation, TrainingDiverged, evaluate_head
from ._features import FeatureExtractor, channel_maps, last_spatial_module, neuron_gradient_maps
from ._fourier import FourierImage
from ._illusion import DEFAULT_PROMPT_TEMPLATES, ClipIllusion, VisualizationCallback, VisualizationResult, activation_masks, grey_out
from ._illusion import METHODS as VISUALIZATION_METHODS
from ._probing import concept_neurons, neuron_auc
from ._probability import neuron_importance, probability_ratio
from ._ranking import BOTH, EXCESSIVE, INSUFFICIENT, MistakeNeuronRanker, NeuronRanking, RankedNeuron

__all__ = [
    "BOTH",
    "ClipIllusion",
    "CounterfactualSolution",
    "CounterfactualSolver",
    "DEFAULT_PROMPT_TEMPLATES",
    "EDIT_METHODS",
    "EXCESSIVE",
    "EpochCallback",
    "EpochRecord",
    "FaithfulSGD",
    "FeatureExtractor",
    "FourierImage",
    "HeadEdit",
    "HeadEditor",
    "HeadEvaluation",
    "INSUFFICIENT",
    "MistakeNeuronRanker",
    "NeuronRanking",
    "ProximalGradient",
    "RankedNeuron",
    "SOLVERS",
    "ShiftsOverflowed",
    "SolverCallback",
    "TrainingDiverged",
    "VISUALIZATION_METHODS",
    "VisualizationCallback",
    "VisualizationResult",
    "activation_masks",
    "channel_maps",
    "concept_neurons",
    "evaluate_head",
    "grey_out",
    "last_spatial_module",
    "make_solver",
    "neuron_auc",
    "neuron_gradient_maps",
    "neuron_importance",
    "probability_ratio",
]
