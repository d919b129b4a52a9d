"""A classifier given as ONNX: split before its final linear layer, it is evaluated,
ranked and edited through a real server like a PyTorch one; only visualisation, which
needs gradients, is refused. One that does not end in a linear layer stays inference-only:
predicted and evaluated, not explained."""

from __future__ import annotations

import contextlib
import copy
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from explaind.client import Client, FailedPreconditionError
from explaind.client.report import build_report, render_report
from explaind.methods.neuroinspect import MistakeNeuronRanker
from explaind.world import assets
from explaind.world.classifier import load_classifier

from conftest import write_config, ServerProcess
from test_service_engine import _export_onnx
from test_service_neuroinspect import _world_set

SPURIOUS = assets.classifier_dir("spurious_background")
pytestmark = pytest.mark.skipif(
    not (SPURIOUS / "model.safetensors").is_file(), reason=f"the spurious_background classifier is not shipped yet ({SPURIOUS})"
)


@pytest.fixture(scope="module")
def torch_model():
    return load_classifier(SPURIOUS)


@pytest.fixture(scope="module")
def server(tmp_path_factory, torch_model):
    root = tmp_path_factory.mktemp("onnx")
    classifier = {"loader": "onnx", "path": _export_onnx(torch_model, root / "classifier.onnx"), "image_size": 64,
                  "class_names": list(torch_model.config.class_names)}
    config = write_config(root / "explaind.toml", SPURIOUS, classifier=classifier, batching={"max_images_per_request": 512})
    server = ServerProcess(config, root / "data", root / "server.log").start()
    yield server
    server.stop()


def test_an_onnx_classifier_is_evaluated_ranked_and_edited_like_its_pytorch_model(server, torch_model):
    pixels, labels, attributes = _world_set(300)
    with Client(server.target, timeout=60) as client:
        meta = client.model_metadata()
        assert (meta.loader, meta.backend, meta.feature_dim, meta.supports_features, meta.supports_visualization) == ("onnx", "onnxruntime", 128, True, False)
        predictions = client.predict(pixels[:8], return_features=True)
        images = torch.from_numpy(pixels[:8]).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            expected_features = torch.flatten(torch_model.avgpool(torch_model.feature_maps(images)), 1)
        np.testing.assert_allclose(np.stack([p.features for p in predictions]), expected_features.numpy(), atol=1e-4)

        client.create_sample_set(pixels, labels, attributes=attributes, sample_set_id="spurious")
        evaluation = client.evaluate_sample_set("spurious").result()
        features = torch.from_numpy(np.stack([p.features for p in client.predict(pixels, return_features=True)]))
        with torch.no_grad():
            assert evaluation.accuracy == pytest.approx(float((torch_model.fc(features).argmax(1).numpy() == labels).mean()))

        ranking = client.rank_mistake_neurons("spurious", "heart")
        assert ranking.mistake_count > 0
        in_process = MistakeNeuronRanker(torch_model.fc).rank(features, torch.from_numpy(labels), target_class=5)
        assert [n.neuron for n in ranking.neurons] == in_process.neuron_ids

        neurons = [n.neuron for n in ranking.neurons[:3]]
        edit = client.edit_head("spurious", "heart", neurons, promote=True).result()
        assert edit.version.active and edit.version.neurons == sorted(neurons)
        edited = client.predict(pixels[:8], top_k=6, return_features=True)
        assert {p.model_version for p in edited} == {client.model_metadata().model_version} != {predictions[0].model_version}
        # Predict applies the stored edited head to the ONNX Runtime features.
        head = _stored_head(server.data_dir, edit.version.version_id)
        assert not torch.equal(head["weight"], torch_model.fc.weight)
        expected = torch.softmax(torch.from_numpy(np.stack([p.features for p in edited])) @ head["weight"].T + head["bias"], dim=1)
        for prediction, row in zip(edited, expected):
            np.testing.assert_allclose(prediction.probabilities, row[prediction.class_indices].numpy(), atol=1e-5)

        with pytest.raises(FailedPreconditionError, match="without gradients; visualising neurons needs a PyTorch classifier"):
            client.visualize_neurons([(neurons[0], "heart")], method="no_clip")
        report = build_report(client, "heart", "spurious", steps=2)
        assert report.visualizations == [] and "onnx classifier has no gradients" in report.no_visualization_reason
        assert "id='no-visualization'" in render_report(report)
        client.rollback_head_version()


def _stored_head(data_dir: Path, version_id: str) -> dict[str, torch.Tensor]:
    """A stored head version's weight (C, D) and bias (C,), read beside the server that
    holds the data dir (its store's lock keeps a second store out)."""
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / 'explaind.sqlite3'}?mode=ro", uri=True)) as db:
        (digest,) = db.execute("SELECT weights_digest FROM head_versions WHERE version_id = ?", (version_id,)).fetchone()
    return load_safetensors((data_dir / "artifacts" / "sha256" / digest[:2] / digest).read_bytes())


def test_a_float16_onnx_classifier_is_split_predicted_and_ranked_like_its_float32_model(tmp_path, torch_model):
    """A model exported after ``model.half()`` takes and gives float16 tensors; it stopped
    start-up ("Unexpected input data type"). Its head is its float16 layer in float32."""
    classifier = {"loader": "onnx", "path": _export_onnx(torch_model, tmp_path / "half.onnx", dtype=torch.float16), "image_size": 64,
                  "class_names": list(torch_model.config.class_names)}
    config = write_config(tmp_path / "explaind.toml", SPURIOUS, classifier=classifier, batching={"max_images_per_request": 512})
    server = ServerProcess(config, tmp_path / "data", tmp_path / "server.log").start()
    try:
        with Client(server.target, timeout=60) as client:
            assert client.model_metadata().supports_features
            pixels, labels, attributes = _world_set(300)
            images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
            with torch.no_grad():
                expected = torch_model(images).argmax(dim=1)
            predictions = client.predict(pixels, top_k=1, return_features=True)
            np.testing.assert_array_equal([p.class_indices[0] for p in predictions], expected.numpy())

            client.create_sample_set(pixels, labels, attributes=attributes, sample_set_id="half")
            ranking = client.rank_mistake_neurons("half", "heart")
            assert ranking.mistake_count > 0
            head = copy.deepcopy(torch_model.fc).half().float()
            features = torch.from_numpy(np.stack([p.features for p in predictions]))
            in_process = MistakeNeuronRanker(head).rank(features, torch.from_numpy(labels), target_class=5)
            assert [n.neuron for n in ranking.neurons] == in_process.neuron_ids
    finally:
        server.stop()


def test_an_onnx_classifier_ending_in_a_softmax_is_served_inference_only_and_still_evaluated(tmp_path, torch_model):
    model = nn.Sequential(torch_model, nn.Softmax(dim=1))
    classifier = {"loader": "onnx", "path": _export_onnx(model, tmp_path / "softmax.onnx"), "image_size": 64}
    config = write_config(tmp_path / "explaind.toml", SPURIOUS, classifier=classifier)
    server = ServerProcess(config, tmp_path / "data", tmp_path / "server.log").start()
    try:
        with Client(server.target, timeout=60) as client:
            meta = client.model_metadata()
            assert (meta.supports_features, meta.supports_visualization, meta.device) == (False, False, "cpu")
            pixels, labels, _ = _world_set(40)
            images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
            with torch.no_grad():
                probabilities = torch.softmax(torch_model(images), dim=1)
            predictions = client.predict(pixels, top_k=1)
            np.testing.assert_allclose([p.probability for p in predictions], probabilities.max(dim=1).values.numpy(), atol=1e-4)
            with pytest.raises(FailedPreconditionError, match="inference-only"):
                client.predict(pixels, return_features=True)
            client.create_sample_set(pixels, labels, sample_set_id="softmax")
            evaluation = client.evaluate_sample_set("softmax", batch_size=16).result()  # the whole model on every image, in 3 batches
            assert evaluation.accuracy == pytest.approx(float((probabilities.argmax(dim=1).numpy() == labels).mean()))
            assert [m[2] for m in evaluation.mistakes] == [int(probabilities[m[0]].argmax()) for m in evaluation.mistakes]
            with pytest.raises(FailedPreconditionError, match="inference-only"):
                client.rank_mistake_neurons("softmax", "heart")
        assert "serving it inference-only" in server.log_path.read_text()
    finally:
        server.stop()


def test_the_cli_report_on_an_onnx_classifier_says_why_it_has_no_visualisations(server, capsys, tmp_path):
    from explaind.client.cli import main

    pixels, labels, _ = _world_set(120)
    with Client(server.target, timeout=60) as client:
        client.create_sample_set(pixels, labels, sample_set_id="cli-report")
    out = tmp_path / "report.html"
    assert main(["--target", server.target, "report", "--class", "heart", "--sample-set", "cli-report", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert ", 0 visualised" in printed and "no visualisations: the served onnx classifier has no gradients" in printed
    assert "id='no-visualization'" in out.read_text()
