"""Shipped world classifiers and oracle: load from files only, and measure them."""

import json
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

from explaind.world import build as building
from explaind.world.assets import ASSETS_DIR, classifier_dir, clip_dir, oracle_dir, t2i_dir
from explaind.world.build import PARTS, build
from explaind.world.classifier import load_classifier
from explaind.world.fingerprint import FINGERPRINT_FILE, recorded_render_fingerprint, render_fingerprint
from explaind.world.oracle import ORACLE_ATTRIBUTES, _augment, load_oracle, oracle_accuracy, train_oracle
from explaind.world.quality import classifier_report, format_classifier_table
from explaind.world.render import ATTRIBUTE_VALUES, SHAPES, SceneSpec, render
from explaind.world.scenarios import Scenario, get_scenario, scenario_names
from explaind.world.train_classifier import GroupReport, one_cycle_schedule

SPURIOUS = [name for name in scenario_names() if get_scenario(name).focus is not None]


def _image(spec: SceneSpec) -> torch.Tensor:
    return torch.from_numpy(render(spec).image).permute(2, 0, 1).float().div(255).unsqueeze(0)


@pytest.mark.parametrize("scenario", scenario_names())
def test_shipped_classifier_loads_from_files_and_recognises_a_plain_scene(scenario):
    model = load_classifier(classifier_dir(scenario))
    assert model.config.feature_layer == "layer3" and model.config.head == "fc"
    assert model.feature_maps(torch.zeros(2, 3, 64, 64)).shape == (2, 128, 8, 8)
    # A circle on sand carries no planted cue of any scenario, so every model must get it.
    with torch.no_grad():
        logits = model(_image(SceneSpec("circle", "red", "plain", "sand", seed=1)))
    assert logits.shape == (1, len(SHAPES)) and torch.isfinite(logits).all()
    assert SHAPES[int(logits.argmax())] == "circle"


def test_balanced_classifier_is_accurate():
    assert classifier_report("balanced", test_size=1800).accuracy >= 0.95


@pytest.mark.parametrize("scenario", SPURIOUS)
def test_spurious_classifier_learned_its_correlation(scenario):
    report = classifier_report(scenario, test_size=1800)
    group, worst = report.worst_group
    assert report.accuracy - worst >= 0.30, f"{scenario}: average {report.accuracy:.3f}, worst {group} {worst:.3f}"


def test_shipped_oracle_reads_every_attribute():
    # Shape and background are what generated images are scored on; texture is the
    # oracle's weakest attribute (about 0.8), so it gets a lower bar.
    accuracy = oracle_accuracy(load_oracle(oracle_dir()), size=600)
    assert min(accuracy["shape"], accuracy["colour"], accuracy["background"]) >= 0.9, accuracy
    assert accuracy["texture"] >= 0.75, accuracy


def test_oracle_predicts_every_image_in_eval_mode_whatever_the_batch_size():
    oracle = load_oracle(oracle_dir())
    images = get_scenario("balanced").dataset("test", size=5).all().images
    whole = oracle.predict(images)
    oracle.train()  # predict must not read batch statistics
    in_pieces = oracle.predict(images, batch_size=2)
    assert {a: v.tolist() for a, v in in_pieces.items()} == {a: v.tolist() for a, v in whole.items()}
    assert all(len(v) == 5 for v in whole.values())


def test_oracle_augmentation_keeps_images_in_range_and_follows_its_generator():
    images = get_scenario("balanced").dataset("test", size=8).all().images
    augmented = _augment(images, torch.Generator().manual_seed(0))
    assert augmented.shape == images.shape and 0 <= augmented.min() and augmented.max() <= 1
    assert not torch.equal(augmented, images)
    assert torch.equal(augmented, _augment(images, torch.Generator().manual_seed(0)))


def test_oracle_training_starts_its_trunk_from_the_given_classifier():
    balanced = load_classifier(classifier_dir("balanced"))
    # One step at the schedule's first, small learning rate leaves the trunk near its start.
    oracle = train_oracle(epochs=1, train_size=32, batch_size=32, init_from=balanced, log=False)
    start = dict(balanced.named_parameters())
    for name, parameter in oracle.trunk.named_parameters():
        assert torch.allclose(parameter, start[name].float(), atol=1e-3), name


def test_oracle_augmentation_jitters_gain_around_one_and_adds_mild_noise():
    # A flat grey image is its own blur, so what changes it is the gain (within 15 %,
    # centred on 1) and the noise (standard deviation 0.05, never clipped around 0.5).
    grey = torch.full((256, 3, 64, 64), 0.5)
    augmented = _augment(grey, torch.Generator().manual_seed(0))
    channel_means = augmented.mean((2, 3))
    assert ((channel_means - 0.5).abs() <= 0.5 * 0.15 + 0.005).all()
    assert abs(channel_means.mean().item() - 0.5) < 0.01
    assert torch.allclose(augmented.std((2, 3)), torch.tensor(0.05), atol=0.005)


def test_oracle_augmentation_blurs_some_images_much_and_others_little():
    # Neighbouring pixels of a 0.25/0.75 checkerboard differ by 0.5; a 3x3 average brings
    # that to 0.5 / 9, so an image mixed mostly with its blur loses most of its contrast.
    rows, columns = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    checkerboard = (0.25 + 0.5 * ((rows + columns) % 2)).float().expand(64, 3, 64, 64)
    augmented = _augment(checkerboard, torch.Generator().manual_seed(0))
    contrast = (augmented[..., 1:] - augmented[..., :-1]).abs().mean((1, 2, 3))
    assert contrast.min() < 0.2 and contrast.max() > 0.4, contrast


def test_oracle_training_fits_every_head_to_its_images_attributes_on_the_train_split(monkeypatch):
    # 40 images in batches of 32: two steps, the last one short. The train split's
    # attributes, not the test split's, must be the targets of the very images they
    # came with, for every head.
    splits, seen_images, seen_targets = [], [], []
    dataset, cross_entropy = Scenario.dataset, torch.nn.functional.cross_entropy

    def recording_dataset(self, split, *args, **kwargs):
        splits.append(split)
        return dataset(self, split, *args, **kwargs)

    def recording_augment(images, generator):
        seen_images.append(images)
        return images

    def recording_cross_entropy(logits, targets):
        seen_targets.append(targets.tolist())
        return cross_entropy(logits, targets)

    monkeypatch.setattr(Scenario, "dataset", recording_dataset)
    monkeypatch.setattr("explaind.world.oracle._augment", recording_augment)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", recording_cross_entropy)
    oracle = train_oracle(epochs=1, train_size=40, batch_size=32, log=False)
    assert splits == ["train"]
    assert [len(images) for images in seen_images] == [32, 8]
    train = get_scenario("balanced").dataset("train", size=40).all()
    for step, images in enumerate(seen_images):
        rows = [int(torch.nonzero((train.images == image).flatten(1).all(1))[0]) for image in images]
        expected = sorted([ATTRIBUTE_VALUES[a].index(train.attributes[a][row]) for row in rows] for a in ORACLE_ATTRIBUTES)
        assert sorted(seen_targets[4 * step : 4 * step + 4]) == expected
    assert all(head.weight.grad is not None and head.weight.grad.abs().sum() > 0 for head in oracle.heads.values())
    assert not oracle.training


def test_oracle_training_follows_its_seed_from_its_initial_weights_on():
    first, again, other = (train_oracle(epochs=1, train_size=40, batch_size=32, seed=seed, log=False) for seed in (0, 0, 1))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    # Two steps at the warm-up's learning rate move a weight by well under 1e-2, so heads
    # that far apart were initialised differently, not only shuffled differently.
    assert not torch.allclose(first.heads["shape"].weight, other.heads["shape"].weight, atol=1e-2)


def test_a_loaded_oracle_scores_each_image_alone_whatever_its_batch():
    # Loaded for inference: batch norm must use its running statistics, not the batch's.
    oracle = load_oracle(oracle_dir())
    images = get_scenario("balanced").dataset("test", size=4).all().images
    with torch.no_grad():
        together = oracle(images)["shape"]
        alone = torch.cat([oracle(image[None])["shape"] for image in images])
    assert torch.allclose(together, alone, atol=1e-5)


def test_quality_is_measured_on_the_test_split_in_the_scenarios_groups(monkeypatch):
    splits = []
    dataset = Scenario.dataset

    def recording(self, split, *args, **kwargs):
        splits.append((split, kwargs.get("size")))
        return dataset(self, split, *args, **kwargs)

    monkeypatch.setattr(Scenario, "dataset", recording)
    report = classifier_report("spurious_artifact", test_size=24)
    oracle_accuracy(load_oracle(oracle_dir()), size=6)
    assert splits == [("test", 24), ("test", 6)]
    assert {group.split("/")[1] for group in report.group_accuracy} == {"none", "watermark"}


def test_quality_table_shows_accuracy_worst_group_and_gap_in_points():
    groups = {f"{shape}/water": 0.9 for shape in SHAPES} | {"heart/sand": 0.55}
    table = format_classifier_table({"spurious_background": GroupReport(accuracy=0.85, group_accuracy=groups)})
    lines = table.splitlines()
    assert lines[0].split() == ["scenario", "accuracy", "worst", "group", "worst", "gap", "(pts)"]
    assert lines[1].split() == ["spurious_background", "0.850", "heart/sand", "0.550", "30.0"]
    assert all(group in table for group in groups)  # seven groups: a full row of five and a second row
    assert format_classifier_table({"spurious_background": GroupReport(accuracy=0.85, group_accuracy=groups)}, per_group=False) == "\n".join(lines[:2])


def test_quality_command_prints_what_each_part_asked_for_measures_on_the_models_under_its_root(monkeypatch, capsys, tmp_path):
    """``python -m explaind.world.quality --parts ... --root ...`` (docs/world.md) on the shipped
    weights, each evaluation cut to a few images: every number printed is the one measured."""
    from explaind.world import clip, oracle, quality, t2i

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for part in ("classifiers", "oracle", "clip", "t2i"):
        (tmp_path / part).symlink_to(ASSETS_DIR / part)
    loaded, measured = [], {}

    def loading(module, name):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda directory, *args, **kw: (loaded.append(directory), real(directory, *args, **kw))[1])

    def measuring(module, name, **cut):
        real = getattr(module, name)

        def measure(*args, **kw):
            result = real(*args, **kw, **cut)
            measured.setdefault(name, []).append(result)
            return result

        monkeypatch.setattr(module, name, measure)

    loading(quality, "load_classifier"), loading(oracle, "load_oracle"), loading(clip, "load_world_clip"), loading(t2i, "load_world_t2i")
    measuring(quality, "classifier_report", test_size=30)
    measuring(oracle, "oracle_accuracy", size=12)
    measuring(clip, "evaluate_clip_zero_shot", size=12)
    measuring(t2i, "evaluate_t2i", prompts=["a red star on sand"], seeds=(0,), num_inference_steps=2, guidance_scale=2.0)
    monkeypatch.setattr(sys, "argv", ["quality", "--parts", "classifiers,oracle,clip,t2i", "--root", str(tmp_path)])
    quality.main()

    out = capsys.readouterr().out
    scenarios = scenario_names()
    assert loaded[:len(scenarios)] == [classifier_dir(name, tmp_path) for name in scenarios]
    # t2i: scored by the oracle, prompted through CLIP
    assert sorted(loaded[len(scenarios):]) == [tmp_path / "clip"] * 2 + [tmp_path / "oracle"] * 2 + [tmp_path / "t2i"]
    reports = dict(zip(scenarios, measured["classifier_report"]))
    assert out.startswith(f"== Classifiers (test split) ==\n{format_classifier_table(reports)}\n")
    generated = measured["evaluate_t2i"][0]
    assert generated["num_images"] == 1 and (tmp_path / "t2i_samples.png").is_file()  # the grid lies under the root
    sections = out.split("\n== ")[1:]
    assert [section.splitlines()[0] for section in sections] == [
        "Attribute oracle (balanced test) ==", 'CLIP zero-shot top-1 (balanced test, "a photo of a {x}") ==',
        "Text-to-image: oracle recognises the prompted attribute (1 images, CFG 2.0, 2 DDIM steps) =="]
    for section, accuracy in zip(sections, (measured["oracle_accuracy"][0], measured["evaluate_clip_zero_shot"][0], generated["accuracy"])):
        assert [line.split() for line in section.splitlines()[1:] if "sample grid" not in line] == [
            [attribute, f"{value:.3f}"] for attribute, value in accuracy.items()]
    assert f"sample grid: {tmp_path / 't2i_samples.png'}" in out

    for part in ("oracle", "clip"):  # one part, one heading
        loaded.clear()
        monkeypatch.setattr(sys, "argv", ["quality", "--parts", part, "--root", str(tmp_path)])
        quality.main()
        assert loaded == [tmp_path / part] and capsys.readouterr().out.count("==") == 2


def test_a_group_report_s_accuracy_is_over_samples_and_its_worst_group_the_lowest_class_and_value_pair():
    from explaind.world.train_classifier import group_report

    test = get_scenario("spurious_background").dataset("test", size=30).all()
    groups = test.groups("background")
    predictions = test.labels.clone()
    predictions[0] = (predictions[0] + 1) % len(SHAPES)  # one mistake, in a group of its own size
    report = group_report(predictions, test, "background")
    assert report.accuracy == pytest.approx(29 / 30)  # over samples, not the mean of the groups' accuracies
    first = groups[0]
    assert report.group_accuracy == pytest.approx({str(g): (1 - 1 / (groups == g).sum() if g == first else 1.0) for g in set(groups)})
    assert report.worst_group == (first, report.group_accuracy[first]) and "/" in first
    assert len(set((groups == g).sum() for g in set(groups))) > 1  # groups of unequal size tell the two averages apart

def test_missing_weights_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_classifier(tmp_path)
    # A hand-edited config whose class names do not match its head's size is refused by name.
    config = json.loads((classifier_dir("balanced") / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"class_names": config["class_names"][:-1]}))
    with pytest.raises(ValueError, match="class_names must have num_classes entries"):
        load_classifier(tmp_path)
    with pytest.raises(FileNotFoundError, match="oracle.safetensors"):
        load_oracle(tmp_path)


def test_smoke_build_trains_and_saves_loadable_models(tmp_path):
    timings = build(("classifiers", "oracle"), root=tmp_path, smoke=True, num_threads=1)
    assert set(timings) == {f"classifier/{name}" for name in scenario_names()} | {"oracle"}
    for name in scenario_names():
        assert load_classifier(classifier_dir(name, tmp_path))(torch.zeros(1, 3, 64, 64)).shape == (1, len(SHAPES))
    assert set(load_oracle(oracle_dir(tmp_path)).predict(torch.zeros(2, 3, 64, 64))) == {"shape", "colour", "texture", "background"}


def _record_training(monkeypatch) -> list[tuple]:
    """Replace every trainer and saver build calls by one that records its call (nothing is trained)."""
    calls: list[tuple] = []
    monkeypatch.setattr(torch, "set_num_threads", lambda count: calls.append(("threads", count)))
    monkeypatch.setattr(building, "train_classifier",
                        lambda name, **kw: (calls.append(("train_classifier", name, kw)), (f"model {name}", None))[1])
    monkeypatch.setattr(building, "save_classifier", lambda model, directory: calls.append(("save_classifier", model, directory)))
    monkeypatch.setattr(building, "load_classifier",
                        lambda directory: (calls.append(("load_classifier", directory)), "balanced model")[1])
    monkeypatch.setattr(building, "train_oracle", lambda **kw: (calls.append(("train_oracle", kw)), "oracle")[1])
    monkeypatch.setattr(building, "save_oracle", lambda oracle, directory: calls.append(("save_oracle", oracle, directory)))
    monkeypatch.setitem(sys.modules, "explaind.world.clip", SimpleNamespace(train_clip=lambda **kw: calls.append(("train_clip", kw))))
    # Seeds unlike the stage numbers, so that each stage's own seed is seen to be passed on.
    monkeypatch.setitem(sys.modules, "explaind.world.t2i", SimpleNamespace(
        UNET_TRAIN_STAGES=((100, 4), (60, 5), (80, 6)), train_t2i=lambda **kw: calls.append(("train_t2i", kw))))
    return calls


@pytest.mark.parametrize("smoke", [False, True])
def test_build_trains_each_part_by_its_recipe_in_order_and_saves_it_under_the_root(monkeypatch, tmp_path, smoke):
    # The recipe `make world` reruns to reproduce the shipped weights: what is trained, for
    # how long, from which weights, on how many threads, and where it is written.
    calls = _record_training(monkeypatch)
    timings = build(PARTS, root=tmp_path, smoke=smoke, num_threads=3)
    size = 96 if smoke else None
    expected: list[tuple] = [("threads", 3)]
    for name in scenario_names():
        expected += [("train_classifier", name, {"epochs": 1 if smoke else None, "train_size": size, "test_size": size}),
                     ("save_classifier", f"model {name}", classifier_dir(name, tmp_path))]
    expected += [("load_classifier", classifier_dir("balanced", tmp_path)),
                 ("train_oracle", {"epochs": 1 if smoke else 6, "train_size": size, "init_from": "balanced model"}),
                 ("save_oracle", "oracle", oracle_dir(tmp_path)),
                 ("train_clip", {"steps": 3 if smoke else None, "seed": 0, "out_dir": clip_dir(tmp_path), "num_threads": 3})]
    for stage, (steps, seed) in enumerate(((100, 4), (60, 5), (80, 6))):
        expected.append(("train_t2i", {"steps": 3 if smoke else steps, "seed": seed, "clip_dir": clip_dir(tmp_path),
                                       "out_dir": t2i_dir(tmp_path), "init_from": t2i_dir(tmp_path) if stage else None,
                                       "num_threads": 3}))
    assert calls == expected
    assert set(timings) == {f"classifier/{name}" for name in scenario_names()} | {"oracle", "clip", "t2i"}


def test_build_trains_only_the_parts_asked_for(monkeypatch, tmp_path):
    calls = _record_training(monkeypatch)
    assert set(build(("oracle", "t2i"), root=tmp_path)) == {"oracle", "t2i"}
    assert [call[0] for call in calls] == ["threads", "load_classifier", "train_oracle", "save_oracle"] + ["train_t2i"] * 3
    calls.clear()
    assert set(build(("clip",), root=tmp_path)) == {"clip"}
    assert [call[0] for call in calls] == ["threads", "train_clip"]


def test_a_build_records_the_renderers_fingerprint_and_a_partial_one_refuses_a_changed_renderer(monkeypatch, tmp_path):
    # Models trained on two renderers would sit side by side under one fingerprint.
    calls = _record_training(monkeypatch)
    build(("clip",), root=tmp_path)
    assert recorded_render_fingerprint(tmp_path) == render_fingerprint()
    stale = render_fingerprint() | {"balanced/train/0": "0" * 16}
    del stale["balanced/train/1"]  # a scene the fingerprint did not hold yet is no match either
    (tmp_path / FINGERPRINT_FILE).write_text(json.dumps(stale))
    calls.clear()
    with pytest.raises(ValueError, match=r"draws 2 fingerprint scenes differently .*'balanced/train/0'.*rebuild every part"):
        build(("clip",), root=tmp_path)
    assert calls == []  # refused before anything was trained
    build(PARTS, root=tmp_path)
    assert recorded_render_fingerprint(tmp_path) == render_fingerprint()


def test_a_partial_build_beside_weights_no_fingerprint_vouches_for_records_none_and_warns_before_training(monkeypatch, tmp_path):
    # A root without a fingerprint, holding classifiers of an unknown renderer: a build of
    # the oracle (trained from the balanced classifier there) recorded the current
    # renderer's fingerprint, vouching for classifiers it never trained.
    calls = _record_training(monkeypatch)
    weights = classifier_dir("balanced", tmp_path) / "model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"trained on some renderer")
    monkeypatch.setattr(building, "train_oracle", lambda **kw: pytest.fail("trained before the warning") if not warned else "oracle")
    with pytest.warns(building.FingerprintNotRecorded, match=r"holds weights of classifiers but no render_fingerprint.json.*build of oracle") as warned:
        assert set(build(("oracle",), root=tmp_path)) == {"oracle"}
    assert ("save_oracle", "oracle", oracle_dir(tmp_path)) in calls and recorded_render_fingerprint(tmp_path) is None
    # Rebuilt whole, every weight under the root comes from this renderer.
    build(PARTS, root=tmp_path)
    assert recorded_render_fingerprint(tmp_path) == render_fingerprint()


def test_a_partial_build_into_a_root_holding_only_the_parts_it_builds_records_the_fingerprint(monkeypatch, tmp_path, recwarn):
    # What it overwrites does not count: every weight left under the root is this build's.
    _record_training(monkeypatch)
    old_clip = clip_dir(tmp_path) / "open_clip_model.safetensors"
    old_clip.parent.mkdir(parents=True)
    old_clip.write_bytes(b"an earlier clip")
    build(("clip",), root=tmp_path)
    assert recorded_render_fingerprint(tmp_path) == render_fingerprint() and not recwarn.list


def test_a_partial_build_beside_any_scenario_s_classifier_and_no_fingerprint_warns_and_records_none(monkeypatch, tmp_path):
    # Not only the balanced classifier's: every scenario's was trained on some renderer.
    _record_training(monkeypatch)
    other = scenario_names()[-1]
    assert other != "balanced"
    weights = classifier_dir(other, tmp_path) / "model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"trained on some renderer")
    with pytest.warns(building.FingerprintNotRecorded, match="holds weights of classifiers"):
        build(("clip",), root=tmp_path)
    assert recorded_render_fingerprint(tmp_path) is None


def test_a_partial_build_beside_empty_directories_of_other_parts_records_the_fingerprint(monkeypatch, tmp_path, recwarn):
    # A trainer killed before it saved anything leaves its directories, and no weights in them.
    _record_training(monkeypatch)
    (clip_dir(tmp_path) / "checkpoints").mkdir(parents=True)
    t2i_dir(tmp_path).mkdir(parents=True)
    build(("classifiers", "oracle"), root=tmp_path)
    assert recorded_render_fingerprint(tmp_path) == render_fingerprint() and not recwarn.list


def _write_weights(monkeypatch, tmp_path, calls: list[tuple], *, failing: str) -> None:
    """Savers that write a weight file where the real ones would, and a ``failing`` trainer
    that raises, as a build killed in that part."""
    def write(directory) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "weights.safetensors").write_bytes(b"trained")

    monkeypatch.setattr(building, "save_classifier", lambda model, directory: write(directory))
    monkeypatch.setattr(building, "save_oracle", lambda oracle, directory: write(directory))

    def train_clip(out_dir, **kw) -> None:
        if failing == "clip":
            raise RuntimeError("killed while training clip")
        calls.append(("train_clip", kw))
        write(out_dir)

    def train_t2i(out_dir, **kw) -> None:
        if failing == "t2i":
            raise RuntimeError("killed while training t2i")
        calls.append(("train_t2i", kw))
        write(out_dir)

    monkeypatch.setitem(sys.modules, "explaind.world.clip", SimpleNamespace(train_clip=train_clip))
    monkeypatch.setitem(sys.modules, "explaind.world.t2i", SimpleNamespace(UNET_TRAIN_STAGES=((3, 0),), train_t2i=train_t2i))


def test_a_whole_build_killed_in_a_later_part_records_the_fingerprint_of_the_parts_it_finished(monkeypatch, tmp_path, recwarn):
    # The text-to-image model is 2.5 h of a 3 h build: one that failed there could only be
    # finished by building everything again, its fingerprint recorded at the very end.
    calls = _record_training(monkeypatch)
    _write_weights(monkeypatch, tmp_path, calls, failing="t2i")
    with pytest.raises(RuntimeError, match="killed while training t2i"):
        build(PARTS, root=tmp_path)
    assert recorded_render_fingerprint(tmp_path) == render_fingerprint()
    _write_weights(monkeypatch, tmp_path, calls, failing="")
    calls.clear()
    build(("t2i",), root=tmp_path)
    assert [call[0] for call in calls] == ["threads", "train_t2i"] and not recwarn.list
    assert recorded_render_fingerprint(tmp_path) == render_fingerprint()


def test_a_whole_build_killed_before_every_stale_weight_is_replaced_leaves_the_stale_fingerprint(monkeypatch, tmp_path):
    # Parts of the old renderer are still there: the current fingerprint would vouch for them.
    calls = _record_training(monkeypatch)
    stale = render_fingerprint() | {"balanced/train/0": "0" * 16}
    (tmp_path / FINGERPRINT_FILE).write_text(json.dumps(stale))
    for part_dir in (clip_dir(tmp_path), t2i_dir(tmp_path)):
        part_dir.mkdir(parents=True)
        (part_dir / "weights.safetensors").write_bytes(b"trained on the old renderer")
    _write_weights(monkeypatch, tmp_path, calls, failing="clip")
    with pytest.raises(RuntimeError, match="killed while training clip"):
        build(PARTS, root=tmp_path)
    assert recorded_render_fingerprint(tmp_path) == stale


@pytest.mark.parametrize(("old_parts", "failing"), [(PARTS, ""), (("oracle",), "clip")])
def test_a_whole_build_over_old_weights_records_the_fingerprint_once_it_has_replaced_them(monkeypatch, tmp_path, old_parts, failing):
    # Every part's old weights replaced, the last by the text-to-image model; or the old
    # oracle's, by a build then killed in clip: the current renderer made every weight left.
    calls = _record_training(monkeypatch)
    (tmp_path / FINGERPRINT_FILE).write_text(json.dumps(render_fingerprint() | {"balanced/train/0": "0" * 16}))
    saved_in = {"classifiers": classifier_dir("balanced", tmp_path), "oracle": oracle_dir(tmp_path), "clip": clip_dir(tmp_path), "t2i": t2i_dir(tmp_path)}
    for part in old_parts:
        saved_in[part].mkdir(parents=True)
        (saved_in[part] / "weights.safetensors").write_bytes(b"trained on the old renderer")
    _write_weights(monkeypatch, tmp_path, calls, failing=failing)
    if failing:
        with pytest.raises(RuntimeError, match=f"killed while training {failing}"):
            build(PARTS, root=tmp_path)
    else:
        build(PARTS, root=tmp_path)
    assert recorded_render_fingerprint(tmp_path) == render_fingerprint()


def test_build_command_refuses_a_partial_build_on_a_changed_renderer_as_a_usage_error(monkeypatch, capsys, tmp_path):
    calls = _record_training(monkeypatch)
    (tmp_path / FINGERPRINT_FILE).write_text(json.dumps(render_fingerprint() | {"balanced/train/0": "0" * 16}))
    monkeypatch.setattr(sys, "argv", ["build", "--parts", "clip", "--root", str(tmp_path)])
    with pytest.raises(SystemExit) as exited:
        building.main()
    assert exited.value.code == 2 and calls == []
    assert "the renderer draws 1 fingerprint scenes differently" in capsys.readouterr().err


def _run_build_command(monkeypatch, *arguments: str) -> list[tuple]:
    """Run ``python -m explaind.world.build ARGUMENTS`` with build and the quality table recorded."""
    calls: list[tuple] = []
    timings = {"classifier/balanced": 12.4, "oracle": 3.0}
    monkeypatch.setattr(building, "build", lambda parts, **kw: (calls.append(("build", parts, kw)), timings)[1])
    monkeypatch.setattr(building, "print_quality_table", lambda parts, root: calls.append(("quality", parts, root)))
    monkeypatch.setattr(sys, "argv", ["build", *arguments])
    building.main()
    return calls


def test_build_command_passes_its_options_on_and_shows_the_quality_of_what_it_built_unless_smoke(monkeypatch, capsys, tmp_path):
    assert _run_build_command(monkeypatch) == [
        ("build", PARTS, {"root": ASSETS_DIR, "smoke": False, "num_threads": 2}), ("quality", list(PARTS), ASSETS_DIR)]
    assert [line.split() for line in capsys.readouterr().out.splitlines()[1:]] == [["classifier/balanced", "12"], ["oracle", "3"]]
    assert _run_build_command(monkeypatch, "--parts", "oracle,,clip", "--root", str(tmp_path), "--smoke", "--threads", "3") == [
        ("build", ("oracle", "clip"), {"root": tmp_path, "smoke": True, "num_threads": 3})]  # a smoke build's models measure nothing
    assert _run_build_command(monkeypatch, "--parts", "oracle", "--root", str(tmp_path)) == [
        ("build", ("oracle",), {"root": tmp_path, "smoke": False, "num_threads": 2}), ("quality", ["oracle"], tmp_path)]


def test_build_command_refuses_unknown_parts_naming_them_and_the_choices(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exited:
        _run_build_command(monkeypatch, "--parts", "oracle,unet,clips")
    assert exited.value.code == 2
    assert f"unknown parts ['clips', 'unet']; choose from {PARTS}" in capsys.readouterr().err


@pytest.mark.parametrize("total_steps", [1, 2, 3, 10, 20, 40])
@pytest.mark.parametrize("warmup_fraction", [0.05, 0.1, 0.15])
def test_training_schedule_runs_any_step_count_and_peaks_at_the_maximum(total_steps, warmup_fraction):
    # 20 steps at 5 % and 10 steps at 10 % used to divide by zero inside torch's OneCycleLR.
    optimiser = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = one_cycle_schedule(optimiser, max_learning_rate=1e-3, total_steps=total_steps, warmup_fraction=warmup_fraction)
    rates = []
    for _ in range(total_steps):
        rates.append(schedule.get_last_lr()[0])
        optimiser.step()
        schedule.step()
    assert max(rates) <= 1e-3 + 1e-12
    if total_steps >= 3:
        assert max(rates) == pytest.approx(1e-3) and rates[-1] < 1e-4


def test_full_length_schedules_are_torchs_one_cycle_unchanged():
    """The shipped weights were trained with plain OneCycleLR; long runs must reproduce it."""
    def rates(make):
        optimiser = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        schedule = make(optimiser)
        out = []
        for _ in range(5000):
            out.append(schedule.get_last_lr()[0])
            optimiser.step()
            schedule.step()
        return out

    ours = rates(lambda o: one_cycle_schedule(o, max_learning_rate=1e-3, total_steps=5000, warmup_fraction=0.05))
    torchs = rates(lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-3, total_steps=5000, pct_start=0.05))
    assert ours == torchs


def test_training_length_defaults_to_the_scenarios_classifier_epochs_else_the_recipes(capsys):
    """The shipped spurious_background classifier trained its own epochs (scenarios.toml), the others the recipe's."""
    from explaind.world.classifier import ClassifierConfig
    from explaind.world.train_classifier import CLASSIFIER_EPOCHS, train_classifier

    own = get_scenario("spurious_background").classifier_epochs
    assert own not in (None, CLASSIFIER_EPOCHS) and get_scenario("balanced").classifier_epochs is None  # else the two cases are one
    for name, epochs in (("spurious_background", own), ("balanced", CLASSIFIER_EPOCHS)):
        train_classifier(name, train_size=6, test_size=6, config=ClassifierConfig(image_size=32))
        assert [line.split()[:3] for line in capsys.readouterr().out.splitlines()] == [
            [f"[{name}]", "epoch", f"{epoch}/{epochs}"] for epoch in range(1, epochs + 1)]


def test_train_classifier_command_saves_the_model_it_trained_and_prints_its_test_report(monkeypatch, capsys, tmp_path):
    """``python -m explaind.world.train_classifier`` (docs/neuroinspect.md), its test split cut to 12 images."""
    from safetensors.torch import load_file

    from explaind.world import train_classifier as training

    calls, results = [], []
    train = training.train_classifier

    def train_on_few(name, **kw):
        calls.append((name, kw))
        results.append(train(name, **kw, test_size=12, log=False))
        return results[-1]

    monkeypatch.setattr(torch, "set_num_threads", lambda count: calls.append(("threads", count)))
    monkeypatch.setattr(training, "train_classifier", train_on_few)
    monkeypatch.setattr(sys, "argv", ["train_classifier", "--scenario", "spurious_artifact", "--out", str(tmp_path / "model"),
                                      "--epochs", "1", "--learning-rate", "0.01", "--train-size", "12", "--seed", "2", "--threads", "1"])
    training.main()
    assert calls == [("threads", 1), ("spurious_artifact", {"epochs": 1, "learning_rate": 0.01, "train_size": 12, "seed": 2})]
    ((model, report),) = results
    saved = load_file(tmp_path / "model" / "model.safetensors")
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[key], value.half() if value.is_floating_point() else value) for key, value in model.state_dict().items())
    group, worst = report.worst_group
    assert capsys.readouterr().out == f"test accuracy {report.accuracy:.3f}, worst group {group} {worst:.3f}\n"


def test_a_classifier_is_trained_and_tested_at_its_configured_image_size(monkeypatch):
    # The data sets were drawn at 64 px whatever the config's image_size.
    from explaind.world import train_classifier as training
    from explaind.world.classifier import ClassifierConfig, WorldClassifier

    sizes = set()

    class Recording(WorldClassifier):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            sizes.add(tuple(images.shape[-2:]))
            return super().forward(images)

    monkeypatch.setattr(training, "WorldClassifier", Recording)
    training.train_classifier("balanced", epochs=1, train_size=12, test_size=12, config=ClassifierConfig(image_size=32), log=False)
    assert sizes == {(32, 32)}


def test_build_command_where_warnings_are_errors_stops_before_training_with_a_message_not_a_traceback(monkeypatch, capsys, tmp_path):
    # Under -W error (or PYTHONWARNINGS=error) FingerprintNotRecorded left the command as a traceback.
    calls = _record_training(monkeypatch)
    weights = classifier_dir("balanced", tmp_path) / "model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"trained on some renderer")
    monkeypatch.setattr(sys, "argv", ["build", "--parts", "clip", "--root", str(tmp_path)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SystemExit) as exited:
            building.main()
    assert exited.value.code == 1 and calls == []  # nothing trained
    assert capsys.readouterr().err == (
        f"build: error: {tmp_path} holds weights of classifiers but no {FINGERPRINT_FILE}: they may come from another renderer, "
        f"so this build of clip records no fingerprint; rebuild every part to record one\n(a warning, stopped here as warnings "
        f"are errors under -W error or PYTHONWARNINGS; before any training: nothing under {tmp_path} changed)\n")
    assert weights.read_bytes() == b"trained on some renderer" and sorted(tmp_path.rglob("*")) == [weights.parent.parent, weights.parent, weights]
