"""The shapes world's tiny CLIP: open_clip loading path, caption matching, smoke training, shipped weights."""

import sys

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file

from explaind.config import WORLD_CLIP_ILLUSION_EPSILON, ClipSection
from explaind.world import clip
from explaind.world.assets import clip_dir
from explaind.world.clip import (
    CAPTION_WORDS,
    CHECKPOINT_NAME,
    CLIP_MODEL_NAME,
    caption_constraints,
    caption_match_matrix,
    encode_images,
    evaluate_clip_zero_shot,
    load_world_clip,
    multi_positive_clip_loss,
    prompt_set_loss,
    sample_caption,
    text_token_states,
    train_clip,
    training_scenes,
    zero_shot_classifier,
)
from explaind.world.render import SceneSpec, render
from explaind.world.scenarios import get_scenario

SHIPPED = (clip_dir() / CHECKPOINT_NAME).is_file()
needs_shipped = pytest.mark.skipif(not SHIPPED, reason="shipped CLIP weights not built yet (python -m explaind.world.clip)")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def smoke_clip(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip")
    train_clip(steps=2, batch_size=16, out_dir=out, num_threads=1, log=False)
    return out


def _image(spec: SceneSpec) -> torch.Tensor:
    return torch.from_numpy(render(spec).image).permute(2, 0, 1).float().div(255).unsqueeze(0)


def test_captions_assert_exactly_what_they_name():
    assert caption_constraints("a red striped triangle on water with a watermark") == {
        "colour": "red",
        "texture": "stripes",
        "shape": "triangle",
        "background": "water",
        "artifact": "watermark",
    }
    assert caption_constraints("a photo of a checkered") == {"texture": "checker"}
    assert caption_constraints("") == {}


def test_sampled_captions_are_true_of_their_scene_and_only_of_matching_scenes():
    batch = get_scenario("balanced").dataset("train", size=60).all()
    attributes = [{a: str(batch.attributes[a][i]) for a in batch.attributes} for i in range(60)]
    rng = np.random.default_rng(0)
    captions = [sample_caption(a, c, rng) for a, c in zip(attributes, batch.captions)]
    matches = caption_match_matrix(captions, attributes)
    assert matches.diagonal().all()
    assert len(set(captions)) > 20  # variants, not one template
    for j, caption in enumerate(captions):
        for i, scene in enumerate(attributes):
            expected = all(scene[k] == v for k, v in caption_constraints(caption).items())
            assert bool(matches[i, j]) == expected


def test_multi_positive_loss_reduces_to_clip_loss_and_rewards_all_true_pairs():
    logits = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    identity = torch.eye(6, dtype=torch.bool)
    clip_loss = (torch.nn.functional.cross_entropy(logits, torch.arange(6)) + torch.nn.functional.cross_entropy(logits.T, torch.arange(6))) / 2
    torch.testing.assert_close(multi_positive_clip_loss(logits, identity), clip_loss)
    # Captions 0 and 1 are both true of images 0 and 1: preferring the other true caption
    # is penalised only by plain CLIP's one-positive targets.
    matches = identity.clone()
    matches[0, 1] = matches[1, 0] = True
    swapped = 10.0 * identity.float()
    swapped[0, 0] = swapped[1, 1] = 0.0
    swapped[0, 1] = swapped[1, 0] = 10.0
    assert multi_positive_clip_loss(swapped, matches) < 0.6 * multi_positive_clip_loss(swapped, identity)


def test_a_caption_true_of_no_image_in_the_batch_is_only_a_negative():
    """A prompt of the fixed prompt set fits no image of many batches ("a photo of a heart"
    without hearts): it has no text-to-image target, only competes in its images' softmax,
    and leaves the loss finite."""
    logits = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    matches = torch.zeros(3, 4, dtype=torch.bool)
    matches[0, 0] = matches[1, 1] = matches[2, 2] = True  # caption 3 is true of none
    image_to_text = torch.nn.functional.cross_entropy(logits, torch.arange(3))
    text_to_image = torch.nn.functional.cross_entropy(logits[:, :3].T, torch.arange(3))
    torch.testing.assert_close(multi_positive_clip_loss(logits, matches), (image_to_text + text_to_image) / 2)


def test_sampled_captions_come_in_every_variant_and_each_names_something_true():
    """Full captions, one prompt per attribute ("a photo of a watermark" included) and partial
    captions; a partial one never degenerates to "a shape", which says nothing of the scene."""
    scene = render(SceneSpec("star", "red", "stripes", "sand", artifact=True))
    rng = np.random.default_rng(0)
    captions = [sample_caption(scene.attributes, scene.caption, rng) for _ in range(400)]
    constraints = [caption_constraints(c) for c in captions]
    assert all(constraints) and all(scene.attributes[a] == v for c in constraints for a, v in c.items())
    single = [c for caption, c in zip(captions, constraints) if caption.startswith("a photo of a ")]
    partial = [c for caption, c in zip(captions, constraints) if caption != scene.caption and not caption.startswith("a photo of a ")]
    assert scene.caption in captions
    assert {a for c in single for a in c} == set(CAPTION_WORDS) and all(len(c) == 1 for c in single)
    assert {a for c in partial for a in c} == set(CAPTION_WORDS)


def test_prompt_set_loss_is_a_per_attribute_zero_shot_cross_entropy():
    prompts = [("shape", "star"), ("shape", "circle"), ("colour", "red"), ("colour", "blue"), ("artifact", "watermark")]
    scenes = [{"shape": "star", "colour": "blue", "artifact": "none"}, {"shape": "circle", "colour": "red", "artifact": "none"}]
    right = torch.tensor([[9.0, 0.0, 0.0, 9.0, 5.0], [0.0, 9.0, 9.0, 0.0, 5.0]])
    expected = (torch.nn.functional.cross_entropy(right[:, :2], torch.tensor([0, 1])) + torch.nn.functional.cross_entropy(right[:, 2:4], torch.tensor([1, 0])))
    torch.testing.assert_close(prompt_set_loss(right, prompts, scenes), expected)
    assert prompt_set_loss(right, prompts, scenes) < 0.01 < prompt_set_loss(right.flip(0), prompts, scenes)


def test_training_scenes_render_the_train_split_with_the_asked_watermark_fraction():
    images, attributes, captions, masks = training_scenes(4, seed=0, watermark_fraction=0.0)
    dataset = get_scenario("balanced").dataset("train", size=4)
    assert images.shape == (4, 3, 64, 64) and images.dtype == torch.uint8 and masks.shape == (4, 64, 64)
    for i in range(4):
        scene = render(dataset.spec(i))
        assert torch.equal(images[i], torch.from_numpy(scene.image).permute(2, 0, 1))  # channels first, not transposed
        assert attributes[i] == scene.attributes and captions[i] == scene.caption
        assert torch.equal(masks[i], torch.from_numpy(scene.object_mask))
    _, marked, marked_captions, _ = training_scenes(4, seed=0, watermark_fraction=1.0)
    assert all(a["artifact"] == "watermark" for a in marked) and all(c.endswith("with a watermark") for c in marked_captions)


def test_smoke_training_writes_a_checkpoint_that_open_clip_loads(smoke_clip):
    model, tokenizer, preprocess = load_world_clip(smoke_clip)
    tokens = tokenizer(["a photo of a star", "a red striped triangle on water"])
    assert tokens.shape == (2, 16)
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        features = encode_images(model, images)
        states = text_token_states(model, tokens)
        pooled = model.encode_text(tokens)
    assert features.shape == (3, 64) and torch.allclose(features.norm(dim=1), torch.ones(3), atol=1e-5)
    assert states.shape == (2, 16, 64)
    # The token states are the final-layer-norm output the pooled text feature is projected from.
    eot = tokens.argmax(dim=1)
    torch.testing.assert_close(states[torch.arange(2), eot] @ model.text_projection, pooled)
    # The same files also load through open_clip's local-dir: schema.
    same = open_clip.create_model(f"local-dir:{smoke_clip}").eval()
    with torch.no_grad():
        torch.testing.assert_close(encode_images(same, images), features)
    assert preprocess is not None
    classifier = zero_shot_classifier(model, tokenizer, ["star", "red", "sand"])
    assert classifier.shape == (3, 64) and torch.allclose(classifier.norm(dim=1), torch.ones(3), atol=1e-5)
    # A retrained CLIP's cosines go negative as the shipped one's do: its directory carries the ε they need.
    assert ClipSection(path=str(smoke_clip)).default_epsilon() == WORLD_CLIP_ILLUSION_EPSILON


def test_zero_shot_checks_during_training_are_logged_and_leave_the_training_as_it_was(tmp_path, capsys):
    """``eval_every`` logs zero-shot accuracy that often; the check switches the model to eval
    mode (batch norm), so training must go on in train mode and end at the same weights."""
    run = {"steps": 3, "batch_size": 8, "num_threads": 1}
    plain = train_clip(**run, out_dir=tmp_path / "plain", log=False)
    capsys.readouterr()
    checked = train_clip(**run, out_dir=tmp_path / "checked", eval_every=2)
    printed = capsys.readouterr().out.splitlines()
    checks = [line for line in printed if "zero-shot" in line]
    assert len(checks) == 1 and checks[0].startswith("[clip] step 2 zero-shot shape ")
    assert [line.split(" loss ")[0] for line in printed if " loss " in line] == ["[clip] step 1/3", "[clip] step 3/3"]
    weights = [load_file(directory / CHECKPOINT_NAME) for directory in (plain, checked)]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def _run_clip_command(monkeypatch, *arguments: str) -> None:
    monkeypatch.setattr(sys, "argv", ["clip", *arguments])
    clip.main()


def test_clip_command_trains_with_its_options_and_prints_the_zero_shot_accuracy_of_what_it_wrote(monkeypatch, capsys, tmp_path):
    """``python -m explaind.world.clip --out DIR`` (the module's docstring), kept to a few steps and images."""
    trained = []
    train = clip.train_clip
    monkeypatch.setattr(clip, "train_clip", lambda **kw: (trained.append(kw), train(**kw, log=False))[1])
    _run_clip_command(monkeypatch, "--out", str(tmp_path), "--steps", "2", "--batch-size", "8", "--train-size", "16",
                      "--seed", "1", "--eval-size", "12", "--threads", "1")
    assert trained == [{"steps": 2, "seed": 1, "out_dir": tmp_path, "batch_size": 8, "train_size": 16, "num_threads": 1}]
    model, tokenizer, _ = load_world_clip(tmp_path)
    accuracy = evaluate_clip_zero_shot(model, tokenizer, size=12)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("[clip] trained in ") and printed[0].endswith(f"-> {tmp_path}")
    assert printed[1] == "[clip] zero-shot top-1 on balanced test: " + ", ".join(f"{a} {v:.3f}" for a, v in accuracy.items())


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=CHECKPOINT_NAME):
        load_world_clip(tmp_path)


@needs_shipped
def test_shipped_clip_loads_offline_and_reads_a_known_scene():
    model, tokenizer, _ = load_world_clip()
    assert CLIP_MODEL_NAME in open_clip.list_models()
    image = _image(SceneSpec("star", "red", "plain", "sand", seed=3))
    with torch.no_grad():
        features = encode_images(model, image)
        for attribute, value in {"shape": "star", "colour": "red", "background": "sand"}.items():
            words = list(CAPTION_WORDS[attribute].values())
            scores = features @ zero_shot_classifier(model, tokenizer, words).T
            assert words[int(scores.argmax())] == value, attribute
        # Full captions: the true one outranks captions that change one attribute.
        captions = ["a red star on sand", "a blue star on sand", "a red heart on sand", "a red star on water"]
        scores = features @ model.encode_text(tokenizer(captions), normalize=True).T
    assert int(scores.argmax()) == 0


@needs_shipped
def test_shipped_clip_zero_shot_accuracy():
    accuracy = evaluate_clip_zero_shot(size=600, attributes=("shape", "colour", "background"))
    assert min(accuracy.values()) >= 0.9, accuracy


@needs_shipped
def test_zero_shot_accuracy_is_the_fraction_of_test_images_whose_true_prompt_scores_highest():
    """Counted over batches of 4 and read back from prompt words to attribute values
    ("striped" is the value "stripes")."""
    model, tokenizer, _ = load_world_clip()
    batch = get_scenario("balanced").dataset("test", size=10).all()
    expected = {}
    with torch.no_grad():
        features = encode_images(model, batch.images)
        for attribute in ("colour", "texture"):
            values, words = list(CAPTION_WORDS[attribute]), list(CAPTION_WORDS[attribute].values())
            predicted = (features @ zero_shot_classifier(model, tokenizer, words).T).argmax(1)
            expected[attribute] = sum(values[int(k)] == truth for k, truth in zip(predicted, batch.attributes[attribute])) / 10
    assert evaluate_clip_zero_shot(model, tokenizer, size=10, attributes=("colour", "texture"), batch_size=4) == pytest.approx(expected)
