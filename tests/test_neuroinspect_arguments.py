"""The NeuroInspect engines used in-process: bad arguments fail early and name themselves,
nothing silently wrong comes back, and the caller's models keep their mode."""

import re
import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from explaind.methods.neuroinspect import _checks
from explaind.methods.neuroinspect import (
    ClipIllusion,
    FeatureExtractor,
    HeadEditor,
    MistakeNeuronRanker,
    ProximalGradient,
    ShiftsOverflowed,
    TrainingDiverged,
    evaluate_head,
    neuron_auc,
)

DIM, CLASSES = 16, 4


@pytest.fixture
def head() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(DIM, CLASSES)


def _data(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, DIM, generator=generator), torch.randint(0, CLASSES, (n,), generator=generator)


def test_the_ranker_refuses_what_it_would_silently_misread(head):
    features, labels = _data()
    ranker = MistakeNeuronRanker(head)
    nan_row = features.clone()
    nan_row[7, 3] = float("nan")  # was predicted as class 0: a NaN row labelled 0 counted as correct
    cases = [
        (dict(features=nan_row), ValueError, r"features holds NaN or infinite values in 1 rows \(first: row 7\)"),
        (dict(labels=labels.float()), TypeError, "labels must be an integer tensor"),
        (dict(features=features.numpy()), TypeError, r"features must be a torch.Tensor \(use torch.from_numpy\)"),
        (dict(l1=float("inf")), ValueError, "l1 must be a finite number"),
        (dict(target_class=2.0), TypeError, "target_class must be an integer index"),
        (dict(target_class="heart"), TypeError, "target_class must be an integer index"),
        (dict(top_k=DIM + 1), ValueError, f"top_k must be at most {DIM}"),
        (dict(labels=labels.unsqueeze(1)), ValueError, r"labels must be \(40,\), one class index per sample, got \(40, 1\)"),
        (dict(labels=labels == 1), TypeError, "labels must be an integer tensor of class indices, got torch.bool"),
        (dict(labels=labels - 1), ValueError, r"labels must lie in \[0, 4\), got -1..2"),
        (dict(features=features[:0], labels=labels[:0]), ValueError, r"features must be \(N, 16\) with N > 0"),
        (dict(max_iterations=True), ValueError, "max_iterations must be an integer ≥ 1, got True"),
        # Were "'bool' object is not callable" at the solver's first step.
        (dict(callback_on_step_end=True), TypeError, r"callback_on_step_end must be callable or None, got True \(bool\)"),
        # Before the solver too, not at the first chunk of resamples after it.
        (dict(callback_on_resample_chunk_end="stop"), TypeError, r"callback_on_resample_chunk_end must be callable or None, got 'stop' \(str\)"),
        # Was "ProximalGradient.solve() missing 1 required positional argument: 'labels'".
        (dict(solver=ProximalGradient), TypeError, r"solver must be a name or a solver instance, got the class ProximalGradient; call it: ProximalGradient\(\)"),
    ]
    for changes, error, message in cases:
        arguments = dict(features=features, labels=labels) | changes
        with pytest.raises(error, match=message):
            ranker.rank(arguments.pop("features"), arguments.pop("labels"), **arguments)
    # Integer labels of any width, float64 features and one-element tensors as numbers are
    # converted, not refused.
    expected = ranker.rank(features, labels, l1=0.1, max_iterations=50).neuron_ids
    assert ranker.rank(features.double(), labels.int(), l1=torch.tensor(0.1), max_iterations=torch.tensor(50)).neuron_ids == expected
    assert ranker.rank(features, labels, l1=np.array(0.1), max_iterations=np.array([50])).neuron_ids == expected


def test_the_finite_check_sums_slices_of_rows_and_reports_the_rows_of_the_whole_set(monkeypatch, head):
    """torch casts a whole tensor to a float64 sum's dtype first: the check sums slices
    of rows, so the copy is bounded, and still names the rows of the whole set."""
    sums: list[int] = []

    class RecordingSums(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.Tensor.sum:
                sums.append(len(args[0]))
            return super().__torch_function__(func, types, args, kwargs or {})

    monkeypatch.setattr(_checks, "FINITE_CHECK_ELEMENTS", 3 * DIM)  # 3 rows a slice
    features, labels = _data(10)
    features[[4, 9], 1] = float("nan")
    with pytest.raises(ValueError, match=r"features holds NaN or infinite values in 2 rows \(first: row 4\)"):
        MistakeNeuronRanker(head).rank(features.as_subclass(RecordingSums), labels)
    assert sums == [3, 3, 3, 1]
    features[[4, 9], 1] = 0.0
    sums.clear()
    _checks.finite_rows(features.as_subclass(RecordingSums), "features")  # no NaN left: no error
    assert sums == [3, 3, 3, 1]


def test_row_slices_take_a_row_at_least_and_give_an_empty_set_one_empty_slice():
    # The finite check's and the predictions' slices: a row wider than the budget is still
    # a slice of its own, and torch.cat needs one slice to answer an empty set.
    rows = torch.arange(15.0).view(5, 3)
    assert [s.tolist() for s in _checks.row_slices(rows, 7, 3)] == [rows[:2].tolist(), rows[2:4].tolist(), rows[4:].tolist()]
    assert [len(s) for s in _checks.row_slices(rows, 2, 3)] == [1] * 5
    (empty,) = _checks.row_slices(rows[:0], 7, 3)
    assert empty.shape == (0, 3)


def test_a_summary_s_limit_is_a_whole_number_of_neurons(head):
    # 1.5 failed as a slice index and None in a bare comparison; True showed one neuron.
    features, labels = _data()
    ranking = MistakeNeuronRanker(head).rank(features, labels, max_iterations=50)
    for limit in (1.5, None, True):
        with pytest.raises(TypeError, match=rf"limit must be an integer, 0 \(all\) or more, got {limit!r}"):
            ranking.summary(limit)
    assert len(ranking.summary(np.int64(1)).splitlines()) == 4  # the heading, the table's header, one neuron, the flips


def test_the_proximal_solver_runs_on_an_all_zero_head():
    # The step size is 1 / (‖W‖² / 2): it divided by zero.
    features, labels = _data(8)
    solution = ProximalGradient().solve(torch.zeros(CLASSES, DIM), torch.arange(CLASSES, dtype=torch.float32), features, labels)
    assert (solution.omega == 0).all() and torch.equal(solution.converged, labels == CLASSES - 1)


def test_the_editor_checks_every_set_before_training(head):
    features, labels = _data()
    validation_features, validation_labels = _data(20, seed=1)
    editor = HeadEditor(head)
    base = dict(target_class=1, neurons=[2, 5], validation_features=validation_features, validation_labels=validation_labels, max_epochs=1)
    bad_validation = validation_labels.clone()
    bad_validation[3] = 9  # was accepted: a class 9 in the evaluation and in early stopping
    cases = [
        (dict(labels=labels.float()), TypeError, "labels must be an integer tensor"),
        (dict(labels=torch.full_like(labels, CLASSES)), ValueError, rf"labels must lie in \[0, {CLASSES}\)"),
        (dict(validation_labels=bad_validation), ValueError, r"validation_labels must lie in \[0, 4\), got 0..9"),
        (dict(evaluation_labels=labels), ValueError, "evaluation_labels and evaluation_groups need evaluation_features"),
        (dict(evaluation_groups=["a"] * 20), ValueError, "evaluation_labels and evaluation_groups need evaluation_features"),
        (dict(evaluation_features=features), ValueError, "evaluation_labels must be given with evaluation_features"),
        (dict(evaluation_features=features, evaluation_labels=labels, evaluation_groups=["a"]), ValueError, "one entry per evaluation sample"),
        # As long as the set, but not one name per sample: was found only after training.
        (dict(evaluation_features=features, evaluation_labels=labels, evaluation_groups=np.zeros((40, 1))), ValueError,
         r"evaluation_groups must have one entry per evaluation sample \(40,\), got \(40, 1\)"),
        # A sample without a group: NaN (pandas' missing value) made a group of NaN accuracy, None failed numpy's sort.
        (dict(evaluation_features=features, evaluation_labels=labels, evaluation_groups=["land", "water", None, "land"] * 10), ValueError,
         r"evaluation_groups must name every sample's group, got a missing value \(None or NaN\) for 10 samples \(first: sample 2\)"),
        (dict(neurons=[8.7]), TypeError, r"neurons\[0\] must be an integer index, got 8.7"),
        (dict(strength=-5.0), ValueError, "strength must be ≥ 0"),
        (dict(strength=float("nan")), ValueError, "strength must be a finite number"),
        (dict(target_ratio=float("nan")), ValueError, "target_ratio must be a finite number"),
        (dict(target_ratio=0.0), ValueError, "target_ratio must be > 0"),  # p_c / p'_c cannot reach 0
        # Ratios are capped at 1e15: a target above trained toward what no head reaches, and past float32's range
        # raised TrainingDiverged ("retry with a lower strength, target_ratio or learning_rate") after an epoch.
        (dict(target_ratio=1e300), ValueError, r"target_ratio must be at most 1e\+15, where the probability ratios are capped, got 1e\+300"),
        (dict(features=features[labels != 1], labels=labels[labels != 1], target_ratio="auto"), ValueError,
         "labels hold no sample of target_class 1"),
        (dict(learning_rate=0.0), ValueError, "learning_rate must be > 0"),
        # Was a bare RuntimeError from inside Adam ("cannot be converted to type float without overflow").
        (dict(learning_rate=3.5e37), ValueError, r"learning_rate must be at most 3.4e\+37 \(10 × learning_rate must fit torch.float32, the optimiser's first step\)"),
        (dict(patience=0), ValueError, "patience must be an integer ≥ 1"),
        (dict(batch_size=0), ValueError, "batch_size must be an integer ≥ 1"),
        (dict(weight_decay=-1e-4), ValueError, "weight_decay must be ≥ 0"),
        (dict(method="constrain", target_ratio=2.0), ValueError, "target_ratio applies to the probability_ratio method only"),
        # Were "'str' object is not callable" after the first epoch's training (or after all of it).
        (dict(callback_on_training_end="done"), TypeError, r"callback_on_training_end must be callable or None, got 'done' \(str\)"),
    ]
    epochs = []
    for changes, error, message in cases:
        arguments = dict(features=features, labels=labels, callback_on_epoch_end=lambda *args: epochs.append(args)) | base | changes
        with pytest.raises(error, match=message):
            editor.edit(arguments.pop("features"), arguments.pop("labels"), **arguments)
    assert epochs == []  # every one was refused before training began


def test_an_edit_that_diverges_raises_instead_of_returning_a_nan_head(head):
    features, labels = _data()
    with pytest.raises(TrainingDiverged, match="NaN or infinite weights after epoch 1; retry with a lower"):
        # Adam moves each weight by about the learning rate per step: 40 steps of 1e37 pass float32's 3.4e38.
        HeadEditor(head).edit(features, labels, target_class=1, neurons=[2], validation_features=features,
                              validation_labels=labels, learning_rate=1e37, batch_size=1, max_epochs=3)


def test_evaluate_head_refuses_labels_the_head_cannot_predict(head):
    features, labels = _data()
    labels[0] = CLASSES
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        evaluate_head(head.weight.detach(), head.bias.detach(), features, labels)
    groups = np.array([1.0, 2.0, np.nan, 1.0] * 10)  # a pandas column with a missing value
    with pytest.raises(ValueError, match=r"groups must name every sample's group, got a missing value \(None or NaN\) for 10 samples \(first: sample 2\)"):
        evaluate_head(head.weight.detach(), head.bias.detach(), features, labels % CLASSES, groups=groups)


def test_the_feature_extractor_refuses_pixels_outside_0_1(world_model, world_images):
    images = world_images[0][:4]
    extractor = FeatureExtractor(world_model, "layer3")  # positional like ClipIllusion's
    with pytest.raises(TypeError, match=r"images must be float images in \[0, 1\] \(divide uint8 pixels by 255\)"):
        extractor.features((images * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"images must lie in \[0, 1\].*got values in \[0, 255\]"):
        extractor.features(images * 255)
    with pytest.raises(ValueError, match=r"images must lie in \[0, 1\] \(the engines normalise themselves\), got values in \[-0.\d+, 0.\d+\]"):
        extractor.features(images - 0.5)  # centred already: below 0, though never above 1
    holed = images.clone()
    holed[2, 1, 3, 4] = float("nan")  # NaN fails no comparison with the range's bounds: it must fail the check itself
    with pytest.raises(ValueError, match=r"images must lie in \[0, 1\] \(the engines normalise themselves\), got values in \[nan, nan\]"):
        extractor.features(holed)
    with pytest.raises(ValueError, match=r"images must be \(N, 3, H, W\) RGB with N, H, W > 0, got \(4, 1, 64, 64\)"):
        extractor.features(images[:, :1])  # grey images are refused by name, not by the model's first convolution
    torch.testing.assert_close(extractor.features(images.double()), extractor.features(images))
    # A bicubic resize overshoots [0, 1] a little: that is still an image in [0, 1].
    resized = torch.nn.functional.interpolate(images, scale_factor=1.5, mode="bicubic")
    assert resized.min() < 0 or resized.max() > 1
    assert extractor.features(resized).shape == (4, 128)


def test_a_model_on_the_meta_device_gives_the_features_shape_without_reading_values():
    # Meta tensors have shapes and no values: their range cannot be checked (reading it fails).
    model = _mobilenet_like().to("meta")
    features = FeatureExtractor(model, "hidden", head="classifier").features(torch.empty(2, 3, 9, 9, device="meta"))
    assert features.shape == (2, 6) and features.is_meta


def test_images_that_require_grad_give_their_features_without_torch_s_scalar_warning(world_model, world_images):
    images = world_images[0][:4]
    extractor = FeatureExtractor(world_model, "layer3")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"Converting a tensor with requires_grad=True to a scalar")
        features = extractor.features(images.clone().requires_grad_())
    torch.testing.assert_close(features, extractor.features(images))


def test_a_model_in_training_mode_keeps_its_mode_and_batchnorm_statistics(classifier_dir, world_images):
    # ClipIllusion switched the model to eval when built and never back; visualising a model
    # put back in training mode updated its BatchNorm statistics with every step.
    from explaind.world.classifier import load_classifier

    model = load_classifier(classifier_dir).train()
    buffers = {name: value.clone() for name, value in model.named_buffers()}
    illusion = ClipIllusion(model, "layer3")
    FeatureExtractor(model, "layer3").features(world_images[0][:4])
    illusion.visualize([(3, 1)], method="no_clip", steps=2)
    assert all(module.training for module in model.modules())
    assert all(torch.equal(buffers[name], value) for name, value in model.named_buffers())


def test_the_public_map_functions_leave_a_training_model_and_its_gradients_as_they_were(classifier_dir, world_images):
    # last_spatial_module and neuron_gradient_maps ran the model as it was: in training mode
    # each call updated its BatchNorm statistics, and the maps came from batch statistics.
    from explaind.methods.neuroinspect import last_spatial_module, neuron_gradient_maps
    from explaind.world.classifier import load_classifier

    model, images = load_classifier(classifier_dir), world_images[0][:4]
    neurons = torch.tensor([3, 8, 21, 63])
    expected = neuron_gradient_maps(model, images, (model.layer3, 0), model.fc, neurons)  # in eval mode
    model.train()
    buffers = {name: value.clone() for name, value in model.named_buffers()}
    assert last_spatial_module(model, images, model.avgpool) == (model.layer3, 0)
    torch.testing.assert_close(neuron_gradient_maps(model, images, (model.layer3, 0), model.fc, neurons), expected)
    assert all(module.training for module in model.modules())
    assert all(torch.equal(buffers[name], value) for name, value in model.named_buffers())
    assert all(parameter.grad is None for parameter in model.parameters())


def test_neuron_gradient_maps_runs_under_no_grad_and_explains_inference_mode(world_model, world_images):
    # Its gradients are turned on under torch.no_grad(); inside torch.inference_mode() it
    # failed with torch's bare "element 0 of tensors does not require grad", as edit did.
    from explaind.methods.neuroinspect import neuron_gradient_maps

    images, neurons = world_images[0][:2], torch.tensor([3, 8])
    expected = neuron_gradient_maps(world_model, images, (world_model.layer3, 0), world_model.fc, neurons)
    with torch.no_grad():
        torch.testing.assert_close(neuron_gradient_maps(world_model, images, (world_model.layer3, 0), world_model.fc, neurons), expected)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"call it outside inference mode \(under torch.no_grad\(\) it works\)"):
        neuron_gradient_maps(world_model, images, (world_model.layer3, 0), world_model.fc, neurons)


def test_visualize_runs_under_no_grad_and_refuses_malformed_pairs(world_model):
    illusion = ClipIllusion(world_model, "layer3")
    with torch.no_grad():  # "element 0 of tensors does not require grad"
        expected = illusion.visualize([(3, 1)], method="no_clip", steps=2).images
    torch.testing.assert_close(illusion.visualize([(3, 1)], method="no_clip", steps=2).images, expected)
    for pairs, error, message in (
        ([8, 21], TypeError, r"pairs\[0\] must be a \(neuron, class or None\) pair, got 8"),
        ([(8.7, 1)], TypeError, r"pairs\[0\] neuron must be an integer index, got 8.7"),
        ([(8, "heart")], TypeError, r"pairs\[0\] class must be an integer index, got 'heart'"),
        ([(np.int64(8), torch.tensor(9))], ValueError, r"pairs\[0\] class must lie in \[0, 6\), got 9"),
        # A pair asked twice was optimised twice into the same image; the server's VisualizeNeurons refuses it alike.
        ([(3, 1), (4, 1), (3, 1)], ValueError, r"^pairs\[2\]: repeats pairs\[0\]: both ask for neuron 3 with class 'square', which would be "
                                              r"optimised twice into the same image$"),
        ([(3, None), (3, illusion.top_classes(3)[0])], ValueError, r"^pairs\[1\]: repeats pairs\[0\]: both ask for neuron 3 "),
    ):
        with pytest.raises(error, match=message):
            illusion.visualize(pairs, method="no_clip", steps=1)
    # A repeat is the same neuron with the same class: one neuron with two classes, or one class with two neurons, is two images.
    assert len(illusion.visualize([(3, 1), (3, 2), (4, 1)], method="no_clip", steps=1).images) == 3
    with pytest.raises(ValueError, match=r"mask_dim must lie in \[0, 1\]"):
        illusion.visualize([(3, 1)], method="no_clip", steps=1, mask_dim=5)
    with pytest.raises(TypeError, match=r"callback_on_step_end must be callable or None, got 1 \(int\)"):  # was after the first step
        illusion.visualize([(3, 1)], method="no_clip", steps=1, callback_on_step_end=1)
    as_array = illusion.visualize(np.array([[3, 1]]), method="no_clip", steps=2).images  # a (P, 2) array of pairs
    torch.testing.assert_close(as_array, expected)
    # A generator of pairs is read once (it was "object of type 'generator' has no len()"); None is refused by name.
    torch.testing.assert_close(illusion.visualize((pair for pair in [(3, 1)]), method="no_clip", steps=2).images, expected)
    with pytest.raises(TypeError, match=r"pairs must be a sequence of \(neuron, class or None\) pairs, got None"):
        illusion.visualize(None, method="no_clip", steps=1)


def test_overlapping_uses_of_a_training_model_restore_its_mode_when_the_last_ends(classifier_dir):
    # Threads sharing a model: the second saved the modes the first had set (eval), and
    # the model stayed in eval for good after both.
    from explaind.methods.neuroinspect._checks import eval_mode
    from explaind.world.classifier import load_classifier

    model = load_classifier(classifier_dir).train()
    first, second = eval_mode(model), eval_mode(model)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert not any(module.training for module in model.modules())  # the second is still running
    second.__exit__(None, None, None)
    assert all(module.training for module in model.modules())


def test_neuron_auc_takes_a_boolean_mask_not_class_labels():
    # Labels read as a mask made every non-zero class the positive one.
    features, labels = _data()
    with pytest.raises(TypeError, match=r"positive must be a boolean \(or 0/1\) mask, got int64 values \[0, 1, 2, 3\]"):
        neuron_auc(features, labels)
    expected = neuron_auc(features, labels == 2)
    torch.testing.assert_close(neuron_auc(features, (labels == 2).numpy()), expected)
    torch.testing.assert_close(neuron_auc(features, (labels == 2).to(torch.uint8)), expected)
    # Finite values whose float32 row sum overflows are finite all the same (rows are summed in float64 to check).
    huge = (torch.sigmoid(features) + 1) * 1e38  # the same order per neuron, each row summing past 3.4e38
    assert torch.isinf(huge.sum(1)).all()
    torch.testing.assert_close(neuron_auc(huge, labels == 2), expected)


class _MobileNetLike(nn.Module):
    """A conv layer of 4 channels, then a hidden linear layer of 6 before the head (3
    classes), as MobileNetV3 has: its conv maps are not what the head reads. (Inputs of
    9 pixels: 6x6 maps of 4 channels would read as channels-last maps of 6.) ``unused``
    is defined but never run."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features, self.hidden, self.classifier = nn.Conv2d(3, 4, 3), nn.Linear(4, 6), nn.Linear(6, 3)
        self.unused = nn.Linear(6, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.hidden(torch.relu(self.features(images)).mean((2, 3)))))


def _mobilenet_like() -> nn.Module:
    return _MobileNetLike().train()


def _hooks(model: nn.Module) -> int:
    return sum(len(module._forward_hooks) for module in model.modules())


def test_a_failing_feature_extractor_call_leaves_the_model_as_it_was():
    # The mode and the hooks were restored in a generator's cleanup, which waits until
    # the error's traceback is freed: a notebook keeps it, so the model stayed in eval
    # mode with a hook on it.
    model = _mobilenet_like()
    images = torch.rand(2, 3, 9, 9)
    try:
        FeatureExtractor(model, "features", head="classifier").feature_maps(images)  # 4 conv channels, the head reads 6
    except ValueError as error:
        kept = error  # held, as a notebook holds the last error
    assert "cannot be read as maps of 6 channels" in str(kept)
    assert all(module.training for module in model.modules()) and _hooks(model) == 0


def test_the_feature_extractor_and_clip_illusion_check_the_split_they_are_given():
    model = _mobilenet_like()  # its unused layer gave a bare KeyError 'input'
    images = torch.rand(2, 3, 9, 9)
    with pytest.raises(TypeError, match=r"head 'features' must be an nn.Linear, got Conv2d"):
        FeatureExtractor(model, "hidden", head="features")  # the head's weight is what the engines read
    for feature_layer, head, message in (
        ("hidden", "hidden", r"head 'hidden' is not the classifier's last operation"),  # explained the wrong decision
        ("hidden", "unused", r"head 'unused' does not run in the classifier's forward"),
        ("unused", "classifier", r"feature_layer 'unused' does not run in the classifier's forward"),
    ):
        with pytest.raises(ValueError, match=message):
            FeatureExtractor(model, feature_layer, head=head).features(images)
        illusion = ClipIllusion(model, feature_layer, head=head, image_size=9, class_names=list("abcdef")[: model.get_submodule(head).out_features])
        steps = []
        with pytest.raises(ValueError, match=message):
            illusion.visualize([(0, 0)], method="no_clip", steps=3, callback_on_step_end=lambda step, *_: steps.append(step))
        assert steps == []  # refused before the first step, not after the last
    assert _hooks(model) == 0 and all(module.training for module in model.modules())
    # Channels that do not match the head are also found before the steps.
    with pytest.raises(ValueError, match=r"feature_layer 'features': the feature layer's output .* cannot be read as maps of 6 channels"):
        ClipIllusion(model, "features", head="classifier", image_size=9, class_names=list("abc")).visualize([(0, 0)], method="no_clip", steps=3)
    with pytest.raises(ValueError, match=r"the classifier fails on a 2x2 image \(image_size\)"):
        ClipIllusion(model, "features", head="classifier", image_size=2, class_names=list("abc")).visualize([(0, 0)], method="no_clip", steps=3)
    # Out of memory is the device's state, not a bad argument: a caller that retries must see it as it is.
    def out_of_memory(self, images):
        raise torch.OutOfMemoryError("out of memory")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(model), "forward", out_of_memory)
        with pytest.raises(torch.OutOfMemoryError):
            ClipIllusion(model, "features", head="classifier", image_size=9, class_names=list("abc")).visualize([(0, 0)], method="no_clip", steps=3)
    # So is the host's memory on a CPU (PyTorch's allocator's RuntimeError), which read as a classifier failing on image_size.
    def out_of_host_memory(self, images):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 1024 bytes")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(model), "forward", out_of_host_memory)
        with pytest.raises(RuntimeError, match="DefaultCPUAllocator"):
            ClipIllusion(model, "features", head="classifier", image_size=9, class_names=list("abc")).visualize([(0, 0)], method="no_clip", steps=3)
    assert FeatureExtractor(model, "hidden", head="classifier").features(images).shape == (2, 6)
    # Features are the head's input whatever the layer, but a layer that is not the one
    # the head reads would mask every visualisation wrongly: refused by features() too.
    with pytest.raises(ValueError, match=r"feature_layer 'features': .* cannot be read as maps of 6 channels"):
        FeatureExtractor(model, "features", head="classifier").features(images)
    # Were torch's errors: "'function' object has no attribute 'named_modules'", a module named as the head
    # "is not a module of the classifier ('Linear' object has no attribute 'split')", and amin's of an empty
    # tensor for images of no pixels.
    for call, error, message in (
        (lambda: FeatureExtractor(model.forward, "hidden", head="classifier"), TypeError, r"classifier must be an nn.Module, got method"),
        (lambda: FeatureExtractor(model, "hidden", head=model.classifier), TypeError, r"head must be a module name \(str\), such as 'layer4' or 'fc', got Linear"),
        (lambda: ClipIllusion(model, 3, head="classifier", image_size=9), TypeError, r"feature_layer must be a module name \(str\).*got 3 \(int\)"),
        (lambda: FeatureExtractor(model, "hidden", head="classifier").features(images[:, :, :0]), ValueError,
         r"images must be \(N, 3, H, W\) RGB with N, H, W > 0, got \(2, 3, 0, 9\)"),
    ):
        with pytest.raises(error, match=message):
            call()
    # A misspelt name says which argument, not torch's bare AttributeError.
    for feature_layer, head, message in (("layer5", "classifier", r"feature_layer 'layer5' is not a module of the classifier"),
                                         ("hidden", "fc", r"head 'fc' is not a module of the classifier")):
        with pytest.raises(ValueError, match=message):
            FeatureExtractor(model, feature_layer, head=head)
        with pytest.raises(ValueError, match=message):
            ClipIllusion(model, feature_layer, head=head, image_size=9)


def test_a_module_name_not_there_is_answered_with_the_names_it_might_mean():
    # The README wraps a classifier as nn.Sequential(normalise, model): its "layer4" is
    # then "1.layer4", and the error only said the Sequential had no such attribute.
    model = nn.Sequential(nn.Identity(), _mobilenet_like())
    for feature_layer, head, message in (
        ("hidden", "1.classifier", r"feature_layer 'hidden' is not a module .*; did you mean '1.hidden'\?$"),
        ("1.hidden", "classifier", r"head 'classifier' is not a module .*; did you mean '1.classifier'\?$"),
        ("1.hiden", "1.classifier", r"feature_layer '1.hiden' .*; did you mean '1.hidden'"),
        ("zzzz", "1.classifier", r"feature_layer 'zzzz' is not a module of the classifier \(Sequential has no attribute `zzzz`\)$"),
    ):
        with pytest.raises(ValueError, match=message):
            FeatureExtractor(model, feature_layer, head=head)


def test_a_near_miss_is_a_module_whose_name_ends_in_the_name_at_a_dot():
    model = nn.Sequential(nn.Identity(), _mobilenet_like())
    model[1].unhidden = nn.Identity()  # ends in "hidden" too, but is another name
    with pytest.raises(ValueError, match=r"did you mean '1.hidden'\?$"):
        FeatureExtractor(model, "hidden", head="1.classifier")


def test_at_most_three_near_misses_are_named():
    model = nn.Sequential(*(_mobilenet_like() for _ in range(4)))  # "0.hidden" ... "3.hidden"
    with pytest.raises(ValueError, match=r"did you mean '0.hidden' or '1.hidden' or '2.hidden'\?$"):
        FeatureExtractor(model, "hidden", head="3.classifier")


def test_features_and_maps_come_without_an_autograd_graph():
    # A model whose parameters require grad would keep every chunk's graph alive.
    extractor = FeatureExtractor(_mobilenet_like(), "hidden", head="classifier")
    images = torch.rand(2, 3, 9, 9)
    assert not extractor.features(images).requires_grad and not extractor.feature_maps(images).requires_grad


def test_a_hidden_layer_named_as_the_head_is_refused_even_with_the_logits_shape():
    # Two linear layers of 3 outputs: the shapes agree, the values do not.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"head '3' is not the classifier's last operation"):
        FeatureExtractor(model, "0", head="3").features(torch.rand(2, 3, 9, 9))
    assert FeatureExtractor(model, "4", head="5").features(torch.rand(2, 3, 9, 9)).shape == (2, 3)


class _TokenHead(nn.Module):
    """A head applied to every position of the maps (N, h·w, C): not one vector per image."""

    def __init__(self) -> None:
        super().__init__()
        self.features, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).flatten(2).transpose(1, 2))


def test_a_head_reading_more_than_one_vector_per_image_is_refused():
    with pytest.raises(ValueError, match=r"head 'head' reads inputs of shape \(49, 4\) per image, not one feature vector"):
        FeatureExtractor(_TokenHead(), "features", head="head").features(torch.rand(2, 3, 9, 9))


def test_a_capture_keeps_the_opening_thread_s_forward_not_another_thread_s():
    # A served model is shared with Predict's batcher thread.
    import threading

    from explaind.methods.neuroinspect._features import capture_forward

    linear = nn.Linear(4, 2)
    mine, theirs = torch.rand(1, 4), torch.rand(1, 4)
    with torch.no_grad(), capture_forward(linear) as captured:
        linear(mine)
        other = threading.Thread(target=linear, args=(theirs,))
        other.start()
        other.join()
    assert torch.equal(captured["input"], mine)


def test_a_model_returning_a_dict_is_told_to_return_the_logits_tensor():
    # Its head was blamed: "not the classifier's last operation ... name the final nn.Linear".
    class DictOutput(nn.Module):  # as a Hugging Face model returns a ModelOutput
        def __init__(self) -> None:
            super().__init__()
            self.model = _mobilenet_like()

        def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.model(images)}

    model = DictOutput()
    message = r"the classifier's output is a dict, not a tensor; wrap the model so that it returns the logits tensor"
    with pytest.raises(ValueError, match=message):
        FeatureExtractor(model, "model.hidden", head="model.classifier").features(torch.rand(2, 3, 9, 9))
    with pytest.raises(ValueError, match=message):
        ClipIllusion(model, "model.hidden", head="model.classifier", image_size=9).visualize([(0, 0)], method="no_clip", steps=1)


def test_clip_illusion_needs_class_names_only_for_clip_and_follows_the_model_as_it_is_at_each_call():
    model = _mobilenet_like()
    illusion = ClipIllusion(model, "hidden", head="classifier", image_size=9)  # no CLIP: no prompt names a class
    model.double()  # after construction: the images follow it
    result = illusion.visualize([(1, 2)], method="no_clip", steps=2)
    assert result.activations.dtype == torch.float64 and torch.isfinite(result.activations).all()
    for call, message in (
        (lambda: ClipIllusion(model, "hidden", head="classifier", image_size=9, class_names=list("ab")), r"class_names must name all 3 classes"),
        (lambda: ClipIllusion(model, "hidden", nn.Module(), str.split, head="classifier", image_size=9), r"class_names must name all 3 classes \(CLIP's prompts"),
        (lambda: ClipIllusion(model, "hidden", head="classifier", image_size=64.7), r"image_size must be an integer ≥ 1, got 64.7"),
        (lambda: ClipIllusion(model, "hidden", head="classifier", image_size=-5), r"image_size must be an integer ≥ 1, got -5"),
        (lambda: ClipIllusion(model, "hidden", head="classifier"), r"image_size must be given"),
        (lambda: ClipIllusion(model, "hidden", nn.Module(), head="classifier", image_size=9, class_names=list("abc")),
         r"clip_model and tokenizer must be given together"),  # else its prompts could not be tokenised
        (lambda: ClipIllusion(model, "hidden", tokenizer=str.split, head="classifier", image_size=9), r"clip_model and tokenizer must be given together"),
        (lambda: illusion.visualize([(1, 2)], method="no_clip", steps=2, learning_rate=-1), r"learning_rate must be ≥ 0"),
        (lambda: illusion.visualize([(1, 2), (1, 2)], method="no_clip", steps=2), r"pairs\[1\]: repeats pairs\[0\]: both ask for neuron 1 with class 2,"),  # no names: its index
        # Was a bare overflow RuntimeError from inside AdamW (β1 0.5: its first step is 2 × the rate).
        (lambda: illusion.visualize([(1, 2)], method="no_clip", steps=2, learning_rate=2e38), r"learning_rate must be at most 1.7e\+38 \(2 × learning_rate"),
        # Was a result of NaN images: the spectrum's lowest-frequency amplitude, 9^45, is infinite in float32.
        (lambda: illusion.visualize([(1, 2)], method="no_clip", steps=2, decay_power=45), r"decay_power 45 is too large for image_size 9: .* 9\^45, overflows torch.float32"),
    ):
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(TypeError, match=r"class_names must be a sequence of names, one per class, got a str: 'abc'"):
        ClipIllusion(model, "hidden", head="classifier", image_size=9, class_names="abc")  # was ('a', 'b', 'c')
    # One template per character, and prompts that never name the class, for CLIP to compare with.
    with pytest.raises(TypeError, match=r"prompt_templates must be a sequence of templates, got a str: 'a photo of a \{\}.'"):
        ClipIllusion(model, "hidden", head="classifier", image_size=9, prompt_templates="a photo of a {}.")
    with pytest.raises(ValueError, match=r"prompt_templates\[1\] must be a str with '\{\}' where the class name goes \(any other brace doubled\), got 'a photo'"):
        ClipIllusion(model, "hidden", head="classifier", image_size=9, prompt_templates=["a {}.", "a photo"])
    # As str.format reads them: "{{}}" is a literal "{}" (no class name, accepted), a second
    # field or a named one failed only as the job filled them in.
    for template in ("a {{}} photo", "a {} in {style}", "a {} and a {}", "a {}}", "a {.plural}"):
        with pytest.raises(ValueError, match=rf"prompt_templates\[0\] must be a str with .* got {re.escape(repr(template))}$"):
            ClipIllusion(model, "hidden", head="classifier", image_size=9, prompt_templates=[template])
    assert ClipIllusion(model, "hidden", head="classifier", image_size=9, prompt_templates=["{0}, a {0} {{sic}}"]).prompt_templates == ("{0}, a {0} {{sic}}",)
    # Was a result of NaN images, each masked whole (AdamW's decay of 1e38 sends the spectrum to infinity).
    with pytest.raises(ValueError, match=r"learning_rate, weight_decay or gamma are too large: the images overflowed to NaN or infinity in 2 steps"):
        illusion.visualize([(1, 2)], method="no_clip", steps=2, weight_decay=1e38)


def test_clip_illusion_refuses_a_clip_model_without_open_clip_s_encoders_or_image_size():
    model = _mobilenet_like()

    class Encoders(nn.Module):  # open_clip's methods around a tower whose image_size is given
        def __init__(self, image_size: object) -> None:
            super().__init__()
            self.visual = nn.Identity()
            self.visual.image_size = image_size

        def encode_image(self, image: torch.Tensor) -> torch.Tensor:
            return image

        def encode_text(self, text: torch.Tensor) -> torch.Tensor:
            return text

    class NoTower(Encoders):
        def __init__(self) -> None:
            super().__init__(224)
            del self.visual

    for clip_model, message in ((nn.Module(), r"clip_model must be an open_clip model \(encode_image, encode_text\), got Module"),
                                (NoTower(), r"clip_model must be an open_clip model with an image tower \.visual, got NoTower"),
                                (Encoders("224"), r"clip_model.visual.image_size must be an int or an \(H, W\) pair, got '224'")):
        with pytest.raises(TypeError, match=message):
            ClipIllusion(model, "hidden", clip_model, str.split, head="classifier", image_size=9, class_names=list("abc"))
    for image_size in (224, (224, 224), [224, 224], np.int64(224), (np.int64(224), 224)):  # numpy's ints, as a config may give
        ClipIllusion(model, "hidden", Encoders(image_size), str.split, head="classifier", image_size=9, class_names=list("abc"))


def test_clip_illusion_runs_a_float64_model_and_explains_inference_mode():
    model = _mobilenet_like().double()
    illusion = ClipIllusion(model, "hidden", head="classifier", image_size=9, class_names=list("abc"))
    result = illusion.visualize([(1, 2), (3, None)], method="no_clip", steps=2)
    assert result.activations.dtype == torch.float64 and torch.isfinite(result.activations).all()
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"outside inference mode"):
        illusion.visualize([(1, 2)], method="no_clip", steps=2)


def test_the_proximal_solver_runs_on_a_half_precision_head(head):
    # linalg.matrix_norm has no float16 or bfloat16 kernel.
    features, labels = _data()
    expected = MistakeNeuronRanker(head).rank(features, labels, solver="proximal")
    for dtype in (torch.float16, torch.bfloat16):
        ranking = MistakeNeuronRanker(nn.Linear(DIM, CLASSES).to(dtype).requires_grad_(False)).rank(features, labels, solver="proximal")
        assert ranking.num_mistakes > 0
    half = nn.Linear(DIM, CLASSES)
    half.load_state_dict(head.state_dict())
    ranking = MistakeNeuronRanker(half.to(torch.bfloat16)).rank(features, labels, solver="proximal")
    assert len(set(ranking.neuron_ids) & set(expected.neuron_ids)) >= len(expected.neuron_ids) // 2


def test_both_solvers_give_finite_shifts_on_a_float16_head(head):
    # The norm floor 1e-30 is 0 in float16: a zero row's ω / ‖ω‖ was 0 / 0, every
    # unflipped ω NaN, and the default (faithful) ranking of a float16 head empty.
    from explaind.methods.neuroinspect import FaithfulSGD

    features, labels = _data()
    half = nn.Linear(DIM, CLASSES)
    half.load_state_dict(head.state_dict())
    half = half.half().requires_grad_(False)
    weight, bias = half.weight, half.bias
    for solution in (FaithfulSGD().solve(weight, bias, features, labels, max_iterations=50),
                     FaithfulSGD().solve(weight, bias, features, labels, l2=0.0, max_iterations=50),
                     ProximalGradient().solve(weight, bias, features, labels, l1=1000.0, l2=0.0, max_iterations=5)):  # every row shrunk to 0
        assert torch.isfinite(solution.omega).all()
    expected = MistakeNeuronRanker(head).rank(features, labels, max_iterations=50)
    ranking = MistakeNeuronRanker(half).rank(features, labels, max_iterations=50)
    assert torch.isfinite(ranking.omega).all() and ranking.num_converged > 0
    assert len(set(ranking.neuron_ids) & set(expected.neuron_ids)) >= len(expected.neuron_ids) // 2


def test_a_head_edit_as_a_module_keeps_the_dtype_and_draws_no_random_numbers(head):
    features, labels = _data()
    edit = HeadEditor(head.double()).edit(features, labels, target_class=1, neurons=[2], validation_features=features,
                                          validation_labels=labels, max_epochs=1)
    state = torch.get_rng_state()
    linear = edit.as_linear()
    assert torch.equal(torch.get_rng_state(), state)
    assert linear.weight.dtype == torch.float64 and torch.equal(linear.weight, edit.weight) and torch.equal(linear.bias, edit.bias)


def test_a_flat_activation_map_dims_nothing():
    from explaind.methods.neuroinspect import activation_masks

    # Upsampling rounded a constant map into one varying in its last bits, and the
    # threshold split it: a 1x1 map (a feature layer of vectors) dimmed 2 % of the image.
    for value, side in ((0.3, 1), (1.7, 2), (0.0, 3)):
        assert activation_masks(torch.full((1, side, side), value), (32, 32), 0.5).all()
    peaked = torch.zeros(1, 4, 4)
    peaked[0, 1, 1] = 1.0
    mask = activation_masks(peaked, (32, 32), 0.5)
    assert 0 < mask.float().mean() < 0.25
    assert torch.equal(activation_masks(peaked, 32, 0.5), mask)  # one side for both


def test_the_fourier_image_refuses_settings_that_would_fail_inside_torch_or_give_nan_images():
    from explaind.methods.neuroinspect import FourierImage

    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    for call, error, message in (
        # Were NaN images.
        (lambda: FourierImage(generators, 8, decay_power=float("nan")), ValueError, r"decay_power must be a finite number"),
        (lambda: FourierImage(generators, 8, decay_power=100), ValueError, r"decay_power 100 is too large for image_size 8"),
        (lambda: FourierImage(generators, 8, init_std=float("nan")), ValueError, r"init_std must be a finite number"),
        # Were torch's errors: "stack expects a non-empty TensorList", a ZeroDivisionError, a negative dimension,
        # "'int' object has no attribute 'device'", "'torch._C.Generator' object is not iterable".
        (lambda: FourierImage([], 8), ValueError, r"generators must hold at least one torch.Generator"),
        (lambda: FourierImage(generators, 0), ValueError, r"image_size must be an integer ≥ 1, got 0"),
        (lambda: FourierImage(generators, -3), ValueError, r"image_size must be an integer ≥ 1, got -3"),
        (lambda: FourierImage([1, 2], 8), TypeError, r"generators must be a sequence of torch.Generator, one per image, got \[1, 2\]"),
        (lambda: FourierImage(generators[0], 8), TypeError, r"generators must be a sequence of torch.Generator"),
    ):
        with pytest.raises(error, match=message):
            call()


def test_activation_masks_refuse_what_they_would_mask_wrongly_or_fail_on_deep_inside():
    from explaind.methods.neuroinspect import activation_masks

    maps = torch.rand(2, 4, 4)
    nan_map = maps.clone()
    nan_map[1, 2, 3] = float("nan")
    for call, error, message in (
        # Were silent: a NaN map, or a threshold outside [0, 1], dimmed whole images.
        (lambda: activation_masks(nan_map, (8, 8), 0.5), ValueError, r"maps holds NaN or infinite values in 1 rows \(first: row 1\)"),
        (lambda: activation_masks(maps, (8, 8), 2.0), ValueError, r"threshold must lie in \[0, 1\]"),
        (lambda: activation_masks(maps, (8, 8), float("nan")), ValueError, r"threshold must be a finite number"),
        # Were torch's errors from inside interpolate (a spatial-dimensions mismatch, "not implemented for 'Long'",
        # "sizes should be greater than 0"), or an AttributeError for an array.
        (lambda: activation_masks(maps[0], (8, 8), 0.5), ValueError, r"maps must be \(B, h, w\) with h, w ≥ 1, got \(4, 4\)"),
        (lambda: activation_masks(maps[:, :0], (8, 8), 0.5), ValueError, r"maps must be \(B, h, w\) with h, w ≥ 1, got \(2, 0, 4\)"),
        (lambda: activation_masks((maps * 9).long(), (8, 8), 0.5), TypeError, r"maps must be a floating-point tensor, got torch.int64"),
        (lambda: activation_masks(maps.numpy(), (8, 8), 0.5), TypeError, r"maps must be a torch.Tensor \(use torch.from_numpy\)"),
        (lambda: activation_masks(maps, (0, 8), 0.5), ValueError, r"size\[0\] must be an integer ≥ 1, got 0"),
        (lambda: activation_masks(maps, (8, 8.5), 0.5), ValueError, r"size\[1\] must be an integer ≥ 1, got 8.5"),
        (lambda: activation_masks(maps, (8, 8, 8), 0.5), TypeError, r"size must be an \(H, W\) pair of integers, got \(8, 8, 8\)"),
    ):
        with pytest.raises(error, match=message):
            call()


class _RedGreen(nn.Module):
    """Maps of red and green (a 1x1 convolution), pooled; hidden neuron 0 is red less
    green, neuron 1 green (a vector feature layer, as MobileNetV3's); a head of 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.colours, self.pool, self.hidden, self.classifier = nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Linear(2, 2), nn.Linear(2, 3)
        with torch.no_grad():
            self.colours.weight.copy_(torch.eye(2, 3)[:, :, None, None])
            self.colours.bias.zero_()
            self.hidden.weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 1.0]]))
            self.hidden.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.hidden(self.pool(self.colours(images)).flatten(1))))


def test_a_neuron_of_a_vector_feature_layer_is_mapped_where_its_evidence_is():
    # A hidden linear layer's neuron has a 1x1 map: its masks kept the whole image. Its
    # Grad-CAM map on the last spatial layer (the pooled maps are 1x1) shows where it looks.
    from explaind.methods.neuroinspect import activation_masks, last_spatial_module, neuron_gradient_maps

    model = _RedGreen().eval()
    image = torch.zeros(1, 3, 8, 8)
    image[0, 0, :, :5] = 1.0  # red on the left
    image[0, 1, :, 5:] = 1.0  # green on the right
    spatial = last_spatial_module(model, image, model.hidden)
    assert spatial == (model.colours, 0)
    maps = neuron_gradient_maps(model, image.repeat(2, 1, 1, 1), spatial, model.classifier, torch.tensor([0, 1]))
    red, green = activation_masks(maps, (8, 8), 0.5)
    assert red[:, :5].all() and not red[:, 5:].any()
    assert green[:, 5:].all() and not green[:, :5].any()
    assert (maps[0, :, :5] > 0).all() and (maps[0, :, 5:] == 0).all()  # green speaks against neuron 0: cut off, not negative
    # Neuron 1 is the mean of the green map over 8 x 8 positions: each position's gradient is
    # 1/64, the spatial mean that weighs the map, so its Grad-CAM map is green / 64.
    torch.testing.assert_close(maps[1], image[0, 1] / 64)
    assert last_spatial_module(model, image, model.colours) is None  # nothing spatial before the first layer
    # Neurons not one valid index per image: -1 mapped the last neuron, one neuron was broadcast to both images,
    # an index past the hidden layer was a bare IndexError, a call the module never makes a KeyError 'maps'.
    for neurons, error, message in ((torch.tensor([0, -1]), ValueError, r"neurons\[1\] must lie in \[0, 2\), got -1"),
                                    (torch.tensor([0]), ValueError, r"neurons must be \(2,\), one neuron per image, got \(1,\)"),
                                    (torch.tensor([0.0, 1.0]), TypeError, r"neurons must be an integer tensor of neuron indices, got torch.float32")):
        with pytest.raises(error, match=message):
            neuron_gradient_maps(model, image.repeat(2, 1, 1, 1), spatial, model.classifier, neurons)
    with pytest.raises(ValueError, match=r"the module runs 1 times in the classifier's forward, not 6; take spatial from last_spatial_module"):
        neuron_gradient_maps(model, image.repeat(2, 1, 1, 1), (model.colours, 5), model.classifier, torch.tensor([0, 1]))
    # A real MobileNetV3 (random weights, in 2x2 maps at 64 pixels) visualised by its hidden layer.
    import torchvision

    torch.manual_seed(0)
    mobilenet = torchvision.models.mobilenet_v3_small(num_classes=3).eval()
    illusion = ClipIllusion(mobilenet, "classifier.1", head="classifier.3", image_size=64, class_names=list("abc"))
    result = illusion.visualize([(5, 0), (7, 1)], method="no_clip", steps=2)
    expected = neuron_gradient_maps(mobilenet, result.images, (mobilenet.features, 0), mobilenet.classifier[3], torch.tensor([5, 7]))
    assert torch.equal(result.masks, activation_masks(expected, (64, 64), 0.5))
    assert not result.masks.all()
    # A module run twice (a shared activation, after 16x16 and 8x8 maps) is mapped at its last run.
    shared = _SharedActivation().eval()
    spatial = last_spatial_module(shared, torch.rand(1, 3, 16, 16), shared.hidden)
    assert spatial == (shared.act, 1)
    assert neuron_gradient_maps(shared, torch.rand(2, 3, 16, 16), spatial, shared.head, torch.tensor([0, 1])).shape == (2, 8, 8)


class _SharedActivation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU()
        self.hidden, self.head = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.act(self.conv2(self.act(self.conv1(images)))).mean((2, 3)))))


class _ServedMeanwhile(nn.Module):
    """``model``, which another thread runs to the end (as the batcher does for Predict) before each forward of its own."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        served = threading.Thread(target=lambda: self.model(torch.rand(3, 3, 2, 2, generator=torch.Generator().manual_seed(1))))  # maps of 2x2, then 1x1
        served.start()
        served.join()
        return self.model(images)


def test_a_forward_another_thread_runs_meanwhile_is_neither_counted_nor_mapped():
    # The served model answers Predict on the batcher's thread while a visualisation maps
    # its neurons with hooks on the same modules.
    from explaind.methods.neuroinspect import last_spatial_module, neuron_gradient_maps

    shared = _SharedActivation().eval()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    spatial = last_spatial_module(shared, images[:1], shared.hidden)
    alone = neuron_gradient_maps(shared, images, spatial, shared.head, torch.tensor([0, 1]))
    assert torch.equal(neuron_gradient_maps(_ServedMeanwhile(shared), images, spatial, shared.head, torch.tensor([0, 1])), alone)
    assert last_spatial_module(_ServedMeanwhile(shared), images[:1], shared.hidden) == spatial


class _SpatialAfter(nn.Module):
    """Red and green maps pooled into a hidden layer; an auxiliary convolution runs after it (unused)."""

    def __init__(self) -> None:
        super().__init__()
        self.colours, self.hidden, self.auxiliary, self.head = nn.Conv2d(3, 2, 1), nn.Linear(2, 2), nn.Conv2d(3, 2, 1), nn.Linear(2, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.hidden(self.colours(images).mean((2, 3))))
        self.auxiliary(images)
        return self.head(hidden)


def test_the_maps_of_a_vector_feature_layer_come_from_before_it_not_after():
    from explaind.methods.neuroinspect import last_spatial_module

    model = _SpatialAfter().eval()
    assert last_spatial_module(model, torch.rand(1, 3, 8, 8), model.hidden) == (model.colours, 0)


class _FlatHidden(nn.Module):
    """A hidden layer reading the flattened maps: its gradient differs from position to position."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.maps, self.hidden, self.head = nn.Conv2d(3, 2, 1), nn.Linear(2 * 4 * 4, 2), nn.Linear(2, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(self.maps(images).flatten(1)))


def test_a_neuron_s_map_weighs_each_channel_by_its_spatially_averaged_gradient():
    # Grad-CAM: neuron n is linear in the maps A with gradient hidden.weight[n] (as K x h x w);
    # channel k weighs A_k by that gradient's mean over positions, and the sum is cut at 0.
    from explaind.methods.neuroinspect import neuron_gradient_maps

    model = _FlatHidden().eval()
    images = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    maps = neuron_gradient_maps(model, images, (model.maps, 0), model.head, torch.tensor([1, 0]))
    with torch.no_grad():
        channel_weights = model.hidden.weight.view(2, 2, 4, 4).mean((2, 3))[[1, 0]]  # (image, K)
        expected = torch.relu(torch.einsum("bk,bkhw->bhw", channel_weights, model.maps(images)))
    assert (expected > 0).any() and (expected == 0).any()  # a map with both sides of the cut
    torch.testing.assert_close(maps, expected)


def test_the_ranker_takes_all_neurons_of_a_head_with_fewer_than_five():
    head = nn.Linear(3, 4)
    features, labels = torch.randn(30, 3, generator=torch.Generator().manual_seed(1)), torch.arange(30) % 4
    ranking = MistakeNeuronRanker(head).rank(features, labels)
    assert ranking.neuron_ids == MistakeNeuronRanker(head).rank(features, labels, top_k=3).neuron_ids
    assert ranking.top_k == 3 and MistakeNeuronRanker(head).rank(features, labels, top_k=1).top_k == 1  # the k it used


def _featureless_head() -> nn.Linear:
    """A head reading 0 features, built without torch's warning that initialising it does nothing."""
    head = nn.Linear(1, CLASSES)
    head.weight = nn.Parameter(torch.empty(CLASSES, 0))
    return head


def test_the_solvers_refuse_what_would_make_a_nan_row_count_as_converged(head):
    # argmax of a NaN row is 0: a NaN ω on a mistake labelled 0 was reported converged.
    from explaind.methods.neuroinspect import FaithfulSGD

    features, labels = _data()
    weight, bias = head.weight.detach(), head.bias.detach()
    nan_features = features.clone()
    nan_features[2, 0] = float("nan")
    for call, error, message in (
        (lambda: FaithfulSGD().solve(weight, bias, nan_features, labels), ValueError, r"features holds NaN or infinite values in 1 rows \(first: row 2\)"),
        (lambda: ProximalGradient().solve(weight, bias, nan_features, labels), ValueError, r"features holds NaN"),
        (lambda: FaithfulSGD().solve(weight.clone().fill_(float("inf")), bias, features, labels), ValueError, r"weight holds NaN or infinite values"),
        (lambda: ProximalGradient().solve(weight, bias.clone().fill_(float("nan")), features, labels), ValueError, r"bias holds NaN or infinite values"),
        (lambda: FaithfulSGD().solve(weight.double(), bias, features, labels), TypeError, r"weight and bias must be floating-point tensors of one dtype"),
        (lambda: FaithfulSGD(learning_rate=float("nan")), ValueError, r"learning_rate must be a finite number"),
        (lambda: FaithfulSGD(learning_rate=-1.0), ValueError, r"learning_rate must be > 0"),  # climbs the loss
        # Was a bare overflow RuntimeError at the first step.
        (lambda: FaithfulSGD(learning_rate=1e39).solve(weight, bias, features, labels), ValueError, r"learning_rate must be at most 3.4e\+38 \(1 × learning_rate must fit torch.float32"),
        (lambda: FaithfulSGD(momentum=5.0), ValueError, r"momentum must lie in \[0, 1\)"),
        (lambda: FaithfulSGD().solve(weight, bias, features.long(), labels), ValueError, r"features must be floating-point \(N, 16\), got torch.int64"),
        (lambda: FaithfulSGD(momentum=1.0), ValueError, r"momentum must lie in \[0, 1\)"),  # never forgets a step
        (lambda: ProximalGradient(tolerance=float("nan")), ValueError, r"tolerance must be a finite number"),
        # l1 / D is 6e298, infinite in float32: ω was NaN, counted converged where the label was 0.
        (lambda: FaithfulSGD().solve(weight, bias, features, labels, l1=1e300), ShiftsOverflowed,
         r"l1, l2 or the solver's learning_rate are too large for this head: the shifts ω overflowed torch.float32"),
        (lambda: ProximalGradient().solve(weight, bias, features, labels, callback_on_step_end="stop"), TypeError,
         r"callback_on_step_end must be callable or None, got 'stop'"),
        # Was softshrink's bare RuntimeError ("lambda must be in range [0, 3.40282e+38] for input dtype Float").
        (lambda: ProximalGradient().solve(weight, bias, features, labels, l1=1e300), ValueError, r"l1 must be at most .* must fit torch.float32"),
        # Were a bare AttributeError ('numpy.ndarray' object has no attribute 'is_floating_point').
        (lambda: FaithfulSGD().solve(weight, bias, features.numpy(), labels), TypeError, r"features must be a torch.Tensor \(use torch.from_numpy\)"),
        (lambda: ProximalGradient().solve(weight, bias, features.tolist(), labels), TypeError, r"features must be a torch.Tensor, got list"),
        # Was a bare ZeroDivisionError (the penalties are divided by D); the ranker blamed top_k.
        (lambda: FaithfulSGD().solve(weight[:, :0], bias, features[:, :0], labels), ValueError,
         r"weight must have at least one class and one feature, got \(4, 0\)"),
        (lambda: MistakeNeuronRanker(_featureless_head()).rank(features[:, :0], labels), ValueError, r"weight must have at least one class and one feature"),
    ):
        with pytest.raises(error, match=message):
            call()


def test_public_helpers_name_the_argument_they_refuse(head):
    from explaind.methods.neuroinspect import FaithfulSGD, concept_neurons, neuron_importance, probability_ratio

    features, labels = _data()
    weight, bias = head.weight.detach(), head.bias.detach()
    illusion = ClipIllusion(_mobilenet_like(), "hidden", head="classifier", image_size=9, class_names=list("abc"))
    nan_features = features.clone()
    nan_features[3, 1] = float("nan")
    nan_head = nn.Linear(DIM, CLASSES).requires_grad_(False)
    nan_head.weight[2, 5] = float("nan")
    for call, error, message in (
        (lambda: neuron_importance(weight, bias, features[0], CLASSES), ValueError, r"class_index must lie in \[0, 4\)"),
        (lambda: neuron_importance(weight, bias, features, 1), ValueError, rf"feature must be \({DIM},\) for this head"),
        (lambda: probability_ratio(weight, bias, features, 9, torch.tensor([0])), ValueError, r"class_index must lie in \[0, 4\)"),
        (lambda: probability_ratio(weight, bias, features, 1, torch.tensor([-1])), ValueError, rf"neurons\[0\] must lie in \[0, {DIM}\)"),  # not the last
        (lambda: probability_ratio(weight, bias, features, 1, torch.tensor([0.5])), TypeError, r"neurons must be a 1-D integer tensor"),
        # Was a ratio with neuron 2 subtracted twice from the logits, unlike [2].
        (lambda: probability_ratio(weight, bias, features, 1, torch.tensor([2, 5, 2])), ValueError, r"neurons lists neuron 2 twice"),
        (lambda: probability_ratio(weight, bias, features, 1, torch.tensor([5, 2, 2])), ValueError, r"neurons lists neuron 2 twice"),  # not the first
        (lambda: neuron_importance(weight, bias, features[0], True), TypeError, r"class_index must be an integer index, got True"),
        # A one-element tensor is a number; a longer one is not, and is refused by name (not torch's "cannot be converted to Scalar").
        (lambda: neuron_importance(weight, bias, features[0], torch.tensor([1, 2])), TypeError, r"class_index must be an integer index, got tensor"),
        # A vector of the wrong length is told the head's length, not the shape of a matrix it never passed.
        (lambda: neuron_importance(weight, bias, features[0, 1:], 1), ValueError, rf"feature must be \({DIM},\) for this head, got \({DIM - 1},\)"),
        (lambda: neuron_importance(weight.long(), bias.long(), features[0], 1), TypeError,
         r"weight and bias must be floating-point tensors of one dtype and device, got torch.int64"),
        # Finite in float64, infinite once cast to the float32 head's dtype: checked after the cast.
        (lambda: probability_ratio(weight, bias, features.double().index_fill(1, torch.tensor([1]), 1e300), 1, torch.tensor([0])),
         ValueError, rf"features holds NaN or infinite values in {len(features)} rows \(first: row 0\)"),
        (lambda: ProximalGradient().solve(weight, bias, features, labels, l1=True), ValueError, r"l1 must be a finite number, got True"),
        (lambda: HeadEditor(head).edit(features, labels, target_class=1, neurons="25", validation_features=features,
                                       validation_labels=labels), TypeError, r"neurons must be a sequence of indices in \[0, 16\), got '25'"),
        # A set has no order: its neurons are named by their place in sorted order ({17, 2} iterates as 17, 2).
        (lambda: HeadEditor(head).edit(features, labels, target_class=1, neurons={17, 2}, validation_features=features,
                                       validation_labels=labels), ValueError, r"neurons\[1\] must lie in \[0, 16\), got 17"),
        # A set that cannot be sorted was Python's bare "'<' not supported between instances of 'NoneType' and 'int'".
        (lambda: HeadEditor(head).edit(features, labels, target_class=1, neurons={None, 2}, validation_features=features,
                                       validation_labels=labels), TypeError, r"neurons must be a sequence of indices in \[0, 16\), got \{.*\} \(set\)"),
        (lambda: neuron_importance(weight, bias, features[0].long(), 1), TypeError, r"feature must be a floating-point tensor, got torch.int64"),
        # As the engines check them: NaN came back as a NaN ratio, a threshold as a string failed a bare comparison.
        (lambda: neuron_importance(weight, bias, nan_features[3], 1), ValueError, r"feature holds NaN or infinite values"),
        (lambda: probability_ratio(weight, bias, nan_features, 1, torch.tensor([0])), ValueError, r"features holds NaN or infinite values in 1 rows \(first: row 3\)"),
        (lambda: concept_neurons(features, {"a": labels == 1}, min_auc="0.9"), ValueError, r"min_auc must be a finite number, got '0.9'"),
        (lambda: evaluate_head(weight, bias[:3], features, labels), ValueError, rf"weight must be \(C, D\) and bias \(C,\), got \({CLASSES}, {DIM}\) and \(3,\)"),
        (lambda: evaluate_head(weight[0], bias, features, labels), ValueError, r"weight must be \(C, D\) and bias \(C,\)"),
        # A NaN head predicted class 0 everywhere (evaluate_head's accuracy was the share of class 0), gave NaN ratios,
        # and an edit of it was reported as training that diverged, to retry with lower settings.
        (lambda: evaluate_head(nan_head.weight, nan_head.bias, features, labels), ValueError, r"weight holds NaN or infinite values in 1 rows \(first: row 2\)"),
        (lambda: neuron_importance(nan_head.weight, nan_head.bias, features[0], 1), ValueError, r"weight holds NaN or infinite values"),
        (lambda: probability_ratio(weight, bias.clone().fill_(float("inf")), features, 1, torch.tensor([2])), ValueError, r"bias holds NaN or infinite values"),
        (lambda: HeadEditor(nan_head).edit(features, labels, target_class=1, neurons=[2], validation_features=features, validation_labels=labels),
         ValueError, r"head.weight holds NaN or infinite values in 1 rows \(first: row 2\)"),
        (lambda: MistakeNeuronRanker(nan_head).rank(features, labels), ValueError, r"head.weight holds NaN or infinite values"),
        (lambda: HeadEditor(nn.Linear(DIM, CLASSES, bias=False)), TypeError, "head must be an nn.Linear with a bias"),
        (lambda: MistakeNeuronRanker(nn.Linear(DIM, CLASSES, bias=False)), TypeError, "head must be an nn.Linear with a bias"),
        (lambda: FeatureExtractor(_mobilenet_like(), "hidden", head="classifier").features(torch.rand(2, 3, 9, 9), batch_size=0),
         ValueError, "batch_size must be an integer ≥ 1"),
        (lambda: illusion.top_classes(6), ValueError, r"neuron must lie in \[0, 6\)"),
        (lambda: illusion.top_classes(0, k=9), ValueError, r"k must lie in \[1, 3\]"),
        (lambda: illusion.visualize([(0, 0)], method="no_clip", steps=1, seed=1.5), TypeError, "seed must be an integer"),
        (lambda: HeadEditor(head).edit(features, labels, target_class=1, neurons=[2], validation_features=features,
                                       validation_labels=labels, seed=None), TypeError, "seed must be an integer"),
        (lambda: HeadEditor(head).edit(features, labels, target_class=1, neurons=[2], validation_features=features,
                                       validation_labels=labels, seed=True), TypeError, "seed must be an integer, got True"),
        (lambda: HeadEditor(head).edit(features, labels, target_class=1, neurons=2, validation_features=features,
                                       validation_labels=labels), TypeError, r"neurons must be a sequence of indices"),
        (lambda: FaithfulSGD().solve(weight, bias, features, labels, max_iterations=-1), ValueError, "max_iterations must be an integer ≥ 1"),
        (lambda: ProximalGradient().solve(weight, bias, features, labels, l1=-0.1), ValueError, "l1 must be ≥ 0"),
        (lambda: FaithfulSGD().solve(weight, bias, features, labels, l2=-0.01), ValueError, "l2 must be ≥ 0"),
        (lambda: neuron_auc(nan_features, labels == 1), ValueError, r"features holds NaN or infinite values in 1 rows \(first: row 3\)"),
        (lambda: neuron_auc(torch.cat([nan_features, nan_features]), labels.repeat(2) == 1), ValueError,
         r"features holds NaN or infinite values in 2 rows \(first: row 3\)"),
        (lambda: neuron_auc(features.numpy(), labels == 1), TypeError, r"features must be a torch.Tensor \(use torch.from_numpy\)"),
        (lambda: concept_neurons(features.numpy(), {"a": labels == 1}), TypeError, r"features must be a torch.Tensor"),
        # A list of masks was a bare AttributeError ('list' object has no attribute 'items'), and a
        # concept's bad mask was blamed on "positive", an argument concept_neurons does not have.
        (lambda: concept_neurons(features, [labels == 1]), TypeError, r"concepts must be a mapping of concept to its \(N,\) bool mask, got list"),
        (lambda: concept_neurons(features, {"a": labels == 1, "stripes": labels}), TypeError,
         r"concepts\['stripes'\] must be a boolean \(or 0/1\) mask, got int64 values \[0, 1, 2, 3\]"),
        (lambda: concept_neurons(features, {"a": (labels == 1)[:5]}), ValueError, r"concepts\['a'\] must be \(40,\) for features"),
        (lambda: concept_neurons(features, {"a": labels < CLASSES}), ValueError, r"concepts\['a'\] must mark at least one positive and one negative"),
        # A mask of Python objects with a missing value (None, as pandas gives) failed sorting them for the message.
        (lambda: neuron_auc(features, np.array([True, None] * 20, dtype=object)), TypeError,
         r"positive must be a boolean \(or 0/1\) mask, got object values \[True, None, True, None, True\]"),
    ):
        with pytest.raises(error, match=message):
            call()
    # Neurons of any integer dtype are indices: uint8 ones were read as a mask (all of D but neuron 0 zeroed for
    # arange(D)), or failed the mask's shape with a bare IndexError; int8 ones were refused by torch.
    for neurons in (torch.arange(DIM), torch.tensor([2, 5])):
        for dtype in (torch.uint8, torch.int8):
            torch.testing.assert_close(probability_ratio(weight, bias, features, 1, neurons.to(dtype)),
                                       probability_ratio(weight, bias, features, 1, neurons))
    # Features in another dtype are cast to the head's, as the engines cast them (float64 was refused).
    torch.testing.assert_close(probability_ratio(weight, bias, features.double(), 1, torch.tensor([2, 5])),
                               probability_ratio(weight, bias, features, 1, torch.tensor([2, 5])))
    torch.testing.assert_close(neuron_importance(weight, bias, features[0].double(), 1), neuron_importance(weight, bias, features[0], 1))
    # Features are read, not differentiated: a ratio of a constant head has no autograd graph back to them.
    assert not probability_ratio(weight, bias, features.clone().requires_grad_(), 1, torch.tensor([2])).requires_grad
    # Neurons as a set or a 1-D tensor are still neuron lists.
    edits = [HeadEditor(head).edit(features, labels, target_class=1, neurons=neurons, validation_features=features,
                                   validation_labels=labels, max_epochs=1).neurons for neurons in ({5, 2}, torch.tensor([2, 5]), np.array([2, 5]))]
    assert edits == [(2, 5), (2, 5), (2, 5)]


def test_the_methods_import_nothing_of_grpc_nor_of_the_service():
    # The methods are plain PyTorch for analysts in-process: the visualisation's out-of-memory
    # check imported explaind.errors, and with it protobuf's google.rpc.
    import subprocess
    import sys

    loaded = subprocess.run([sys.executable, "-c", "import sys, explaind.methods.neuroinspect; "
                             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'google') or m in ('explaind.errors', 'explaind.service')))"],
                            capture_output=True, text=True, check=True, timeout=120)
    assert loaded.stdout.strip() == "[]", loaded.stdout
