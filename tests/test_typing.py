"""The in-process API type-checks, for us and for a user: explaind ships py.typed, so a
wrong annotation (a Protocol its own solvers do not satisfy, an Optional the README
unpacks unchecked) fails a user's type checker even where the code runs."""

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# Appended to the README's first in-process block: what else a user reaches for, each
# value annotated with the type the API documents.
USER_SCRIPT_TAIL = '''
import torch

from explaind.methods.neuroinspect import (
    CounterfactualSolver,
    FaithfulSGD,
    HeadEvaluation,
    ProximalGradient,
    RankedNeuron,
    VisualizationResult,
    make_solver,
)
from explaind.world.clip import load_world_clip

ranker = MistakeNeuronRanker(extractor.head)
faithful = ranker.rank(features, test.labels, solver=FaithfulSGD(learning_rate=0.05, momentum=0.5), target_class=heart)
proximal = ranker.rank(features, test.labels, solver=ProximalGradient(tolerance=1e-5), top_k=3, max_iterations=200)
solver: CounterfactualSolver = make_solver("proximal")
solver_name: str = solver.name
omega: torch.Tensor = faithful.omega
top: RankedNeuron = proximal.neurons[0]
scores: tuple[float, float, tuple[int, ...]] = (top.rank_ratio, top.importance, top.top_classes)
maps: torch.Tensor = extractor.feature_maps(test.images, batch_size=64)

evaluation: HeadEvaluation = edit.after
worst_class: tuple[int, float] = evaluation.worst_class
worst_group: tuple[str, float] | None = edit.before.worst_group
if worst_group is not None:
    print(f"{worst_group[0]}: {worst_group[1]:.2f} of {evaluation.accuracy:.2f}")
head_weight: torch.Tensor = new_head.weight

clip_model, tokenizer, _ = load_world_clip()
with_clip = ClipIllusion(model, model.config.feature_layer, clip_model, tokenizer,
                         class_names=model.config.class_names, head=model.config.head, image_size=64)
result: VisualizationResult = with_clip.visualize(
    [(ranking.neuron_ids[0], None), (1, heart)], epsilon=1.0, steps=10, seed=1,
    callback_on_step_end=lambda step, steps, images: step >= steps // 2,
)
visualised: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = (result.images, result.masks, result.clip_similarity)

from explaind.methods.neuroinspect import (
    EpochRecord,
    HeadEdit,
    concept_neurons,
    evaluate_head,
    last_spatial_module,
    neuron_auc,
    neuron_gradient_maps,
    neuron_importance,
)


def stop_when_right(epoch: int, max_epochs: int, record: EpochRecord) -> bool:
    return record.validation_accuracy >= 0.99


def show_step(step: int, steps: int, running: int) -> None:
    print(f"{step}/{steps}: {running} mistakes unsolved")


with torch.no_grad():  # a notebook's habit; the edit trains its head all the same
    quiet: HeadEdit = HeadEditor(model.fc).edit(features, test.labels, target_class=heart, neurons=ranking.neuron_ids[:3],
                                               validation_features=features, validation_labels=test.labels,
                                               callback_on_epoch_end=stop_when_right)
solved = ranker.rank(features, test.labels, target_class=heart, callback_on_step_end=show_step, stability_resamples=50,
                     callback_on_resample_chunk_end=lambda done, total: done >= total // 2)
importance: list[float] = neuron_importance(model.fc.weight, model.fc.bias, features[0], heart).tolist()
auc: torch.Tensor = neuron_auc(features, test.labels == heart)
detectors: dict[str, list[int]] = concept_neurons(features, {"heart": test.labels == heart})
checked: HeadEvaluation = evaluate_head(quiet.weight, quiet.bias, features, test.labels, groups=test.groups(world.group_attribute))
spatial = last_spatial_module(model, test.images[:2], extractor.feature_module)
if spatial is not None:
    cams: torch.Tensor = neuron_gradient_maps(model, test.images[:2], spatial, extractor.head, torch.tensor([0, 1]))
'''


@pytest.fixture(scope="module")
def project_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mypy cache for the runs with the project's configuration: the modules they share
    (the standard library, numpy, torch) are analysed once, not per test."""
    return tmp_path_factory.mktemp("mypy_cache")


@pytest.fixture(scope="module")
def silent_explaind_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's configuration with explaind's imported modules followed silently: the
    errors reported are the checked files' own. Not --follow-imports=silent: that option
    differs from the package run's for every module, torch and numpy included, so mypy would
    analyse them again (20 s a run) instead of reading them from ``project_cache``; errors in
    installed packages are not reported either way."""
    config = tmp_path_factory.mktemp("mypy_config") / "pyproject.toml"
    config.write_text((ROOT / "pyproject.toml").read_text()
                      + '\n[[tool.mypy.overrides]]\nmodule = ["explaind", "explaind.*"]\nfollow_imports = "silent"\n')
    return config


def _mypy(cache: Path, *arguments: str, config: Path = ROOT / "pyproject.toml", **environment: str) -> None:
    """mypy with the project's configuration (or ``config``) and the cache ``cache``."""
    checked = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(config),
                              "--cache-dir", str(cache), *arguments],
                             cwd=ROOT, env={**os.environ, **environment}, capture_output=True, text=True, timeout=600)
    assert checked.returncode == 0, f"mypy {' '.join(arguments)}:\n{checked.stdout}{checked.stderr}"


def test_the_package_and_a_strict_user_script_on_its_in_process_api_type_check(tmp_path, project_cache, silent_explaind_config):
    _mypy(project_cache)  # the package, as [tool.mypy] names it
    section = README.read_text().split("## The methods in-process", 1)[1].split("\n## ", 1)[0]
    script = tmp_path / "user_script.py"
    script.write_text(re.findall(r"```python\n(.*?)```", section, flags=re.S)[0] + USER_SCRIPT_TAIL)
    # Silent imports of explaind: the errors a user sees are their own script's, as with an installed explaind.
    _mypy(project_cache, "--strict", str(script), config=silent_explaind_config)


# The SDK's user: README's SDK block, with the images it sends, then what an analyst's
# script goes on to do, each value annotated with (or asserted to be) the type the SDK
# documents. assert_type fails where a call gives Any, which an annotation would take.
SDK_SCRIPT_HEAD = '''
import numpy as np

images = np.zeros((4, 64, 64, 3), dtype=np.uint8)
labels = ["heart", "heart", "star", "circle"]
'''

SDK_SCRIPT_TAIL = '''
from typing import Any, assert_type

from PIL.Image import Image

from explaind.client import (
    ActiveHeadChange,
    DeadlineExceededError,
    Evaluation,
    HeadEdit,
    HeadVersion,
    NeuronRanking,
    NeuronVisualizations,
    Operation,
    OperationError,
    RankedNeuron,
    SampleSet,
    image_folder,
)
from explaind.client.report import MistakeReport, build_report, render_report

with Client("127.0.0.1:50051", token="secret", retry=False) as client:
    assert_type(report, Evaluation)
    assert_type(ranking, NeuronRanking)
    assert_type(shown, NeuronVisualizations)
    assert_type(edit, HeadEdit)
    paths, folder_labels = image_folder("images/")
    added: SampleSet = client.append_samples("hearts", paths, folder_labels, progress=True)
    evaluation: Operation[Evaluation] = client.evaluate_sample_set("hearts", batch_size=64)
    for update in evaluation.watch(timeout=60):
        print(update.progress.step, update.progress.total, update.state)
    assert_type(evaluation.wait(timeout=5).result(download=False), Evaluation)
    assert_type(evaluation.artifact_image("mistakes.png"), Image)
    worst_class: str = min(report.class_accuracy, key=report.class_accuracy.__getitem__)
    mistake_count: int = report.mistake_count
    first: RankedNeuron = ranking.neurons[0]
    share: float = first.rank_ratio
    images_shown = [v.image for v in shown.visualizations if v.image is not None]
    assert_type(images_shown, list[Image])
    version: HeadVersion = edit.version
    if version.evaluation is not None:
        print(version.evaluation.accuracy, version.evaluation.worst_class)
    change: ActiveHeadChange = client.rollback_head_version()
    listed: list[Operation] = client.operations(kind="edit_head", limit=10)
    for operation in listed:
        failure: OperationError | None = operation.error
        print(operation.name, operation.state, operation.create_time.isoformat(), failure)
    assert_type(client.operation(listed[0].name).result(), Any)
    try:
        client.visualize_neurons([(neurons[0], "heart")]).result(timeout=1)
    except DeadlineExceededError as late:
        if late.operation is not None:
            print(late.operation.wait().state)
    mistakes: MistakeReport = build_report(client, "heart", "hearts", max_neurons=5)
    page: str = render_report(mistakes)
'''

# README's asyncio block, then the AsyncClient's twins of the Client's calls above: the
# same parameters and results, awaited.
ASYNC_SCRIPT_TAIL = '''
from collections.abc import AsyncIterator

from explaind.client import AsyncClient, Prediction, Sample


async def monitor() -> None:
    async with AsyncClient("127.0.0.1:50051", token="secret", max_workers=4) as remote:
        assert_type(await remote.predict(images, top_k=3), list[Prediction])
        assert_type(remote.predictions(images, top_k=3), AsyncIterator[Prediction])
        evaluating = await remote.evaluate_sample_set("hearts", batch_size=64)
        assert_type(evaluating, Operation[Evaluation])
        assert_type(await remote.result(evaluating, timeout=60, download=False), Evaluation)
        assert_type(await remote.to_thread(evaluating.cancel), Operation[Evaluation])
        assert_type(remote.samples("hearts", start=2), AsyncIterator[Sample])
        assert_type(await remote.rank_mistake_neurons("hearts", "heart"), NeuronRanking)
        assert_type(await remote.operation(evaluating.name), Operation[Any])
        await remote.delete_head_version("v2")

asyncio.run(check([["a.png"]]))
asyncio.run(monitor())
'''


def _installed_layout(root: Path) -> Path:
    """A site-packages directory as the wheel installs explaind: server/explaind's files,
    with the SDK and the generated stubs as explaind.client and explaind.v1 (the
    [tool.setuptools.package-dir] mapping, which mypy cannot follow in an editable
    install), linked rather than copied."""
    package = root / "site" / "explaind"
    package.mkdir(parents=True)
    for entry in (ROOT / "server" / "explaind").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    (package / "client").symlink_to(ROOT / "clients" / "explaind" / "client")
    (package / "v1").symlink_to(ROOT / "clients" / "explaind" / "v1")
    return package.parent


def _sdk_user_script(tmp_path: Path) -> Path:
    section = README.read_text().split("## API (explaind.v1)", 1)[1].split("\n## ", 1)[0]
    readme_block = next(block for block in re.findall(r"```python\n(.*?)```", section, flags=re.S)
                        if block.startswith("from explaind.client import Client"))
    async_block = next(block for block in re.findall(r"```python\n(.*?)```", section, flags=re.S)
                       if block.startswith("import asyncio\nfrom explaind.client import AsyncClient"))
    script = tmp_path / "sdk_user_script.py"
    script.write_text(SDK_SCRIPT_HEAD + readme_block + SDK_SCRIPT_TAIL + async_block + ASYNC_SCRIPT_TAIL)
    return script


def _strict_mypy(tmp_path: Path, script: Path, *arguments: str, **environment: str) -> None:
    """``mypy --strict`` alone, not the project's [tool.mypy] (its mypy_path would find
    explaind under server/ as source)."""
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\nstrict = True\n")
    checked = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(config),
                              "--cache-dir", str(tmp_path / "mypy_cache"), *arguments, str(script)],
                             cwd=tmp_path, env={**os.environ, **environment}, capture_output=True, text=True, timeout=600)
    assert checked.returncode == 0, f"mypy --strict {' '.join(arguments)} {script.name}:\n{checked.stdout}{checked.stderr}"


def test_a_strict_user_script_on_the_sdk_gets_its_documented_types(tmp_path):
    # explaind on PYTHONPATH is an installed package to mypy (py.typed: its inline types
    # are read, its own errors are not the user's), as after `pip install explaind`.
    _strict_mypy(tmp_path, _sdk_user_script(tmp_path), PYTHONPATH=str(_installed_layout(tmp_path)))


def _require_types_protobuf() -> None:
    try:
        importlib.metadata.distribution("types-protobuf")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("types-protobuf is not installed (pip install -e .[dev])")


def test_the_sdk_and_its_generated_stubs_type_check_from_a_checkout(tmp_path):
    """From a checkout (MYPYPATH=server:clients, as an editable install's mapping is
    invisible to mypy) explaind is source: the generated .pyi stubs are checked strictly
    too, and need types-protobuf (the dev extra) for google.protobuf."""
    _require_types_protobuf()
    paths = os.pathsep.join(str(ROOT / part) for part in ("server", "clients"))
    _strict_mypy(tmp_path, _sdk_user_script(tmp_path), "--follow-imports=silent", MYPYPATH=paths)


def test_the_sdk_package_itself_type_checks_strictly(project_cache, silent_explaind_config):
    """The SDK's own code, not only what a user's script sees of it:
    ``MYPYPATH=server:clients mypy --strict --follow-imports=silent -p explaind.client``
    with the project's configuration (its overrides read grpc, grpc_health, tqdm and
    google.longrunning, which have no stubs, as Any; the generated *_pb2_grpc stubs are
    untyped). Silent imports: explaind's server code and the generated stubs are not the
    SDK's errors (here of explaind's modules alone, which reports the same: see
    ``silent_explaind_config``)."""
    _require_types_protobuf()
    paths = os.pathsep.join(str(ROOT / part) for part in ("server", "clients"))
    _mypy(project_cache, "--strict", "-p", "explaind.client", config=silent_explaind_config, MYPYPATH=paths)
