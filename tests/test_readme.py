"""The README's examples, and docs/world.md's, run as written."""

import contextlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(heading: str) -> str:
    """The README's text under ``heading``, up to the next ``## `` heading."""
    return README.read_text().split(heading, 1)[1].split("\n## ", 1)[0]


def test_the_in_process_example_runs_as_written(capsys):
    section = _section("## The methods in-process")
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 4 and all(re.fullmatch(r"neuron \d+: (insufficient|excessive|both) in \d+% of \d+ mistakes", line) for line in printed[:3])
    edit = namespace["edit"]
    assert edit.after.worst_group[1] > edit.before.worst_group[1]  # the example's point: the edit repairs the worst group
    assert namespace["images"].shape == (1, 3, 64, 64) and 0 <= namespace["images"].min() and namespace["images"].max() <= 1


def test_the_own_classifier_example_splits_a_normalising_torchvision_model_exactly(monkeypatch):
    """The second block, on a ResNet-50 with random weights (nothing is downloaded): the
    features it takes are exactly what the head sees behind the normalisation; and the
    ClipIllusion line after it, with the world's CLIP as its text says to load it,
    visualises a ranked neuron of that split at the classifier's input size."""
    import torch
    import torchvision
    from torchvision.models._api import WeightsEnum

    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda weights, *a, **k: torchvision.models.resnet50().state_dict())
    section = _section("## The methods in-process")
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[1]
    generator = torch.Generator().manual_seed(0)
    namespace: dict = {"images": torch.rand(6, 3, 224, 224, generator=generator), "labels": torch.arange(6) % 3}
    exec(compile(code, str(README), "exec"), namespace)
    classifier, extractor, ranking = namespace["classifier"], namespace["extractor"], namespace["ranking"]
    with torch.no_grad():
        torch.testing.assert_close(extractor.head(namespace["features"]), classifier(namespace["images"]), atol=1e-4, rtol=1e-4)
        unnormalised = classifier[1](namespace["images"])
    assert not torch.allclose(unnormalised, classifier(namespace["images"]), atol=1e-3)  # the normalisation is in the path
    assert ranking.num_mistakes > 0 and ranking.neuron_ids
    heading = "## The methods in-process"
    exec(compile(f"import explaind.world.clip\n{_inline_code(heading, 'clip_model, tokenizer, _ = ')}\n"
                 f"illusion = {_inline_code(heading, 'ClipIllusion(classifier, ')}", str(README), "exec"), namespace)
    shown = namespace["illusion"].visualize([(ranking.neuron_ids[0], None)], steps=1, epsilon=1.0)  # epsilon=1.0: the world CLIP's, as the text says
    assert shown.images.shape == (1, 3, 224, 224) and 0 <= shown.images.min() and shown.images.max() <= 1


def test_the_production_config_is_a_valid_config(tmp_path):
    from explaind.config import ignored_keys, load_config

    (block,) = re.findall(r"```toml\n(.*?)```", _section("## Configuration"), flags=re.S)
    (tmp_path / "explaind.toml").write_text(block)
    config = load_config(tmp_path / "explaind.toml")  # every key known, every value of its type and range
    assert config.classifier.loader == "export" and config.server.tls_cert_file and config.server.health_port
    assert ignored_keys(config) == []  # and each in force


def test_the_chart_values_the_readme_states_are_the_charts():
    # The README said terminationGracePeriodSeconds was 40 after the chart had moved to 45.
    import yaml

    values = yaml.safe_load((README.parent / "deploy" / "helm" / "explaind" / "values.yaml").read_text())
    prose = " ".join(README.read_text().split())  # across line breaks
    assert f"`image` (`{values['image']['repository']}:{values['image']['tag']}`" in prose
    assert f"`persistence` (the data volume, {values['persistence']['size'].removesuffix('Gi')} GiB;" in prose
    assert f"(`cache.size`, {values['cache']['size'].removesuffix('Gi')} GiB," in prose
    assert f"`terminationGracePeriodSeconds` ({values['terminationGracePeriodSeconds']}:" in prose
    assert f"`healthPort` ({values['healthPort']})" in prose


def test_every_serve_flag_is_in_the_readmes_configuration_section():
    # `serve` gained --callers-file and --otlp-endpoint in branches of their own; the
    # section's list of flags that override the file is where an operator looks for them.
    import argparse

    from explaind.client.cli import build_parser

    subcommands = next(action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction))
    flags = [flag for action in subcommands.choices["serve"]._actions for flag in action.option_strings if flag.startswith("--")]
    section = _section("## Configuration")
    missing = [flag for flag in flags if flag != "--help" and not re.search(rf"[`\s]{flag}(?![\w-])", section)]
    assert not missing, f"README's Configuration section names no {missing}"


def test_the_session_by_hand_is_commands_the_cli_takes(tmp_path, monkeypatch):
    """Each command of the block parses (a renamed option would be a usage error, exit 2),
    and its python line writes the image that ``predict`` then reads."""
    from PIL import Image

    from explaind.client.cli import parse_arguments

    section = _section("## A session by hand")
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    monkeypatch.chdir(tmp_path)
    (snippet,) = re.findall(r'^python -c "(.*?)"$', block, flags=re.S | re.M)
    exec(compile(snippet, str(README), "exec"), {})
    assert Image.open("shape.png").size == (64, 64)
    commands = [shlex.split(line, comments=True)[1:] for line in block.splitlines() if line.startswith("explaind ")]
    for argv in commands:
        parse_arguments(argv)
    assert [argv[0] for argv in commands] == ["serve", "info", "predict", "sample-set", "evaluate", "rank", "visualize", "edit-head",
                                              "head-versions", "head-versions", "report", "operations"]


def test_the_session_by_hand_says_how_large_an_image_predict_takes():
    # It said "any PNG, JPEG, ... of any size": the server refuses a side over MAX_IMAGE_SIDE.
    from explaind.imaging import MAX_IMAGE_SIDE

    (block,) = re.findall(r"```bash\n(.*?)```", _section("## A session by hand"), flags=re.S)
    (line,) = [line for line in block.splitlines() if line.startswith("explaind predict ")]
    assert f"# any PNG, JPEG, ... up to {MAX_IMAGE_SIDE} px a side;" in line


def test_the_session_by_hand_names_the_address_serve_and_the_client_default_to():
    # A reader whose 50051 is taken learns there which flag moves the server and which the client.
    from explaind.client._client import DEFAULT_TARGET
    from explaind.config import load_config

    server = load_config().server
    prose = " ".join(README.read_text().split("## A session by hand", 1)[1].split("```", 1)[0].split())
    assert f"{server.host}:{server.port}" == DEFAULT_TARGET
    assert f"{DEFAULT_TARGET} (`--port N` for another port" in prose
    assert f"`EXPLAIND_TARGET` for another address than {DEFAULT_TARGET}" in prose


def _api_python_block(first_line: str) -> str:
    """The API section's ```python block that starts with ``first_line``."""
    section = _section("## API (explaind.v1)")
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", section, flags=re.S) if block.startswith(first_line)]
    return code


def _at(target: str, code: str) -> str:
    """``code`` calling the server at ``target`` where it names the address `explaind serve`
    and the SDK default to (the README's examples run against a server on its default port)."""
    from explaind.client._client import DEFAULT_TARGET

    assert code.count(f'"{DEFAULT_TARGET}"') == 1, f"the block names no {DEFAULT_TARGET}"
    return code.replace(f'"{DEFAULT_TARGET}"', f'"{target}"')


def _serve_the_defaults(server_factory):
    """A server of what `explaind serve` serves with no file that the examples use: the
    world's balanced classifier and CLIP (for the SDK's default clip_illusion), no T2I."""
    from explaind.world import assets

    return server_factory(clip={"path": str(assets.clip_dir())})  # its ε is its directory's, as the README says


@pytest.fixture(scope="module")
def default_server(server_factory):
    return _serve_the_defaults(server_factory)


def _shapes_split(count: int):
    from explaind.world.scenarios import get_scenario

    return get_scenario("spurious_background").dataset("test", size=count).all()


def test_the_client_session_runs_as_written_against_a_server(default_server, capsys):
    """The SDK block, on a split of the shapes world (as its comment offers): each print is
    what its comment promises, and the edited head is served at its end."""
    from explaind.client import Client, NotFoundError

    test = _shapes_split(600)
    namespace: dict = {"images": test.images, "labels": test.labels}
    try:
        exec(compile(_at(default_server.target, _api_python_block("from explaind.client import Client")), str(README), "exec"), namespace)
        printed = capsys.readouterr().out
        with Client(default_server.target, timeout=30) as client:
            class_names = client.model_metadata().class_names
            served = [version.version_id for version in client.head_versions() if version.active]
            predicted_by = {prediction.model_version for prediction in client.predict(test.images[:2], top_k=1)}
    finally:
        with Client(default_server.target, timeout=30) as client, contextlib.suppress(NotFoundError):  # none where the block failed before making it
            client.delete_sample_set("hearts")
    report, ranking, edit = namespace["report"], namespace["ranking"], namespace["edit"]
    worst_class, worst_accuracy = printed.splitlines()[0].split(" ")
    assert worst_class == report.worst_class in class_names and float(worst_accuracy) == report.worst_class_accuracy
    assert ranking.summary() in printed and edit.summary() in printed
    assert len(namespace["top"]) == len(test.images) and len(namespace["top"][0].labels) == 3
    neurons = namespace["neurons"]
    assert len(neurons) == 3 and neurons == ranking.neuron_ids[:3]
    visualizations = namespace["shown"].visualizations
    assert [shown.neuron for shown in visualizations] == neurons and all(shown.image is not None for shown in visualizations)
    assert not edit.version.active  # stored, not served, until the promote
    assert served == [edit.version.version_id] and predicted_by == {edit.version.model_version}


def test_the_async_client_block_runs_as_written_against_a_server(default_server, tmp_path, capsys):
    """The AsyncClient block, its batches PNG files of the shapes world and "hearts" a set
    of theirs: it prints how many batches were answered and the set's accuracy, then each
    sample's label, in the set's order."""
    import asyncio

    from torchvision.utils import save_image

    from explaind.client import Client

    test = _shapes_split(12)
    paths = [str(tmp_path / f"{index}.png") for index in range(len(test.images))]
    for image, path in zip(test.images, paths):
        save_image(image, path)
    namespace: dict = {}
    exec(compile(_at(default_server.target, _api_python_block("import asyncio\nfrom explaind.client import AsyncClient")), str(README), "exec"), namespace)
    with Client(default_server.target, timeout=30) as client:
        client.create_sample_set(paths, test.labels, sample_set_id="hearts")
        try:
            asyncio.run(namespace["check"]([paths[:5], paths[5:]]))
            accuracy = client.evaluate_sample_set("hearts").result().accuracy
        finally:
            client.delete_sample_set("hearts")
    answered, *labels = capsys.readouterr().out.splitlines()
    assert answered == f"2 {accuracy}"
    assert labels == [str(label) for label in test.labels.tolist()]


def _inline_code(heading: str, start: str) -> str:
    """The `inline code` of the section under ``heading`` that starts with ``start`` (it may span a line break)."""
    (code,) = re.findall(rf"`({re.escape(start)}[^`]*)`", _section(heading))
    return code


def test_the_image_folder_line_uploads_a_folder_of_class_subfolders(default_server, tmp_path, monkeypatch):
    """`create_sample_set(*image_folder("images/"), ...)`, from the folder it names: each
    class's images, a subfolder's included, stored under the class's name."""
    from torchvision.utils import save_image

    from explaind.client import Client, image_folder

    test = _shapes_split(9)
    with Client(default_server.target, timeout=30) as client:
        class_names = client.model_metadata().class_names
        for index, (image, label) in enumerate(zip(test.images, test.labels.tolist())):
            folder = tmp_path / "images" / class_names[label] / ("more" if index % 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            save_image(image, folder / f"{index}.png")
        monkeypatch.chdir(tmp_path)
        exec(compile(_inline_code("## API (explaind.v1)", "client.create_sample_set(*image_folder("), str(README), "exec"), {"client": client, "image_folder": image_folder})
        try:
            stored = client.sample_set("production")
        finally:
            client.delete_sample_set("production")
    assert stored.sample_count == len(test.labels)
    assert stored.class_counts == {label: test.labels.tolist().count(label) for label in set(test.labels.tolist())}


def test_the_spawn_pool_script_labels_each_image_it_is_given(default_server, tmp_path):
    """The block sharing a client with a spawn pool, saved as a script and run on PNG files
    of the shapes world: it prints each file's top class, as the client's own predict."""
    from torchvision.utils import save_image

    from explaind.client import Client

    test = _shapes_split(3)
    paths = [str(tmp_path / f"{index}.png") for index in range(len(test.images))]
    for image, path in zip(test.images, paths):
        save_image(image, path)
    script = tmp_path / "classify.py"
    script.write_text(_at(default_server.target, _api_python_block("import multiprocessing\nimport sys\n")))
    ran = subprocess.run([sys.executable, str(script), *paths], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    with Client(default_server.target, timeout=30) as client:
        assert ran.stdout == " ".join(prediction.label for prediction in client.predict(paths, top_k=1)) + "\n"


def test_the_report_lines_build_and_render_the_page_the_cli_writes(default_server):
    """`explaind.client.report.build_report(client, "heart", "hearts", max_neurons=5)` then
    `render_report(report)`: a MistakeReport of the ranking, its top five neurons shown and
    an edit stored, not served, and its HTML page."""
    import explaind.client.report
    from explaind.client import Client

    test = _shapes_split(600)
    namespace: dict = {"explaind": explaind, "render_report": explaind.client.report.render_report}
    with Client(default_server.target, timeout=30) as client:
        client.create_sample_set(test.images, test.labels, sample_set_id="hearts")
        served_before = [version.version_id for version in client.head_versions() if version.active]
        namespace["client"] = client
        try:
            code = f"report = {_inline_code('## API (explaind.v1)', 'explaind.client.report.build_report(')}\npage = {_inline_code('## API (explaind.v1)', 'render_report(')}"
            exec(compile(code, str(README), "exec"), namespace)
            served_after = [version.version_id for version in client.head_versions() if version.active]
        finally:
            client.delete_sample_set("hearts")
    report, page = namespace["report"], namespace["page"]
    assert isinstance(report, explaind.client.report.MistakeReport) and report.ranking.class_name == "heart"
    assert [shown.neuron for shown in report.visualizations] == report.ranking.neuron_ids[:5] and len(report.visualizations) == 5
    assert report.edit is not None and served_after == served_before
    assert page.startswith("<!DOCTYPE html>") and report.edit.version.version_id in page


def test_the_world_pages_upload_block_stores_the_split_with_its_backgrounds(default_server):
    """docs/world.md's block: a split of the shapes world uploaded with each sample's
    background, which `edit_head(..., group_attribute="background")` groups by."""
    from explaind.client import Client, NotFoundError

    page = README.parent / "docs" / "world.md"
    (block,) = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    namespace: dict = {}
    try:
        exec(compile(_at(default_server.target, block), str(page), "exec"), namespace)
        with Client(default_server.target, timeout=30) as client:
            stored = list(client.samples("sb-test"))
    finally:
        with Client(default_server.target, timeout=30) as client, contextlib.suppress(NotFoundError):
            client.delete_sample_set("sb-test")
    test = namespace["test"]
    assert [sample.label for sample in stored] == test.labels.tolist()
    assert [sample.attributes for sample in stored] == [{"background": str(value)} for value in test.attributes["background"]]


def test_the_session_by_hand_runs_as_written_against_a_fresh_server(server_factory, tmp_path, monkeypatch, capsys):
    """Each client command of the block, in order, against a server with nothing stored yet
    (its `head-versions promote v1` names the first edit's version), reached through
    `EXPLAIND_TARGET` as the section says: every one succeeds and writes what it names."""
    from explaind.client import Client
    from explaind.client.cli import main, parse_arguments

    server = _serve_the_defaults(server_factory)
    (block,) = re.findall(r"```bash\n(.*?)```", _section("## A session by hand"), flags=re.S)
    monkeypatch.setenv("EXPLAIND_TARGET", server.target)
    monkeypatch.chdir(tmp_path)
    (snippet,) = re.findall(r'^python -c "(.*?)"$', block, flags=re.S | re.M)
    exec(compile(snippet, str(README), "exec"), {})
    commands = [shlex.split(line, comments=True)[1:] for line in block.splitlines() if line.startswith("explaind ")]
    assert commands[0][0] == "serve"  # the fixture's server stands for it
    for argv in commands[1:]:
        assert main(argv) == 0, argv
    printed = capsys.readouterr().out
    assert "mistakes of heart in sb-test" in printed
    ranked = {int(neuron) for neuron in re.findall(r"^ +(\d+)  (?:insufficient|excessive|both) ", printed, flags=re.M)}
    named = {neuron if isinstance(neuron, int) else neuron[0]
             for argv in commands if argv[0] in ("visualize", "edit-head") for neuron in parse_arguments(argv).neurons}
    assert named and named <= ranked, f"the block's neurons {sorted(named - ranked)} are not in the ranking it prints"  # "neurons from the ranking"
    assert Path("mistakes.png").stat().st_size and len(list(Path("neurons").glob("*.png"))) >= 2 and Path("report.html").stat().st_size
    with Client(server.target, timeout=30) as client:
        assert [version.version_id for version in client.head_versions() if version.active] == ["v1"]
