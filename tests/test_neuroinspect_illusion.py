"""CLIP-Illusion mechanics on a tiny randomly initialised open_clip model (no weights, no
network), and its quality on the shipped world CLIP when that asset exists."""

import copy
import math

import open_clip
import pytest
import torch

from explaind.config import WORLD_CLIP_ILLUSION_EPSILON
from explaind.methods.neuroinspect import ClipIllusion, FeatureExtractor, concept_neurons
from explaind.methods.neuroinspect._fourier import FourierImage, gaussian_noise, random_affine
from explaind.methods.neuroinspect._illusion import DEFAULT_PROMPT_TEMPLATES, activation_masks
from explaind.world.assets import classifier_dir, clip_dir
from explaind.world.illusion_check import attribute_similarity
from explaind.world.scenarios import WorldBatch

from conftest import TINY_VIT_KWARGS, cores, default_device_meta

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return open_clip.CLIP(**TINY_CLIP).eval(), open_clip.get_tokenizer("ViT-B-32", context_length=16)


@pytest.fixture(scope="module")
def illusion(world_model, tiny_clip):
    return ClipIllusion(world_model, "layer3", *tiny_clip)


def test_batched_pairs_give_images_masks_and_scores(illusion, world_model):
    top_class = int(world_model.fc.weight[:, 5].argmax())
    other_class = (top_class + 1) % world_model.fc.out_features  # neuron 5 again, conditioned otherwise: no repeated pair
    result = illusion.visualize([(5, None), (17, 2), (5, other_class)], steps=4)
    assert result.images.shape == result.masked_images.shape == (3, 3, 64, 64)
    assert result.masks.shape == (3, 64, 64) and result.masks.dtype == torch.bool
    assert 0 <= result.images.min() and result.images.max() <= 1
    assert result.neurons.tolist() == [5, 17, 5] and result.steps == 4 and not result.cancelled
    assert result.classes.tolist() == [top_class, 2, other_class]
    # Kept regions are untouched, the rest dimmed to mask_dim.
    keep = result.masks.unsqueeze(1).expand_as(result.images)
    assert torch.equal(result.masked_images[keep], result.images[keep])
    torch.testing.assert_close(result.masked_images[~keep], 0.2 * result.images[~keep])
    for scores in (result.activations, result.logits, result.clip_similarity, result.core_relevance):
        assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert (result.clip_similarity.abs() <= 1 + 1e-5).all()
    # The reported activation and logit are those of the returned image.
    with torch.no_grad():
        logits = world_model(result.images)
        maps = FeatureExtractor(world_model, feature_layer="layer3").feature_maps(result.images)
    torch.testing.assert_close(result.logits, logits[[0, 1, 2], result.classes])
    torch.testing.assert_close(result.activations, maps[[0, 1, 2], result.neurons].mean(dim=(1, 2)))


def test_core_relevance_is_the_similarity_lost_when_the_neuron_s_region_is_greyed(illusion):
    from explaind.methods.neuroinspect import grey_out

    result = illusion.visualize([(5, None), (17, 2)], steps=3)
    keep = result.masks.unsqueeze(1).to(result.images.dtype)
    targets = torch.stack([illusion.class_embedding(int(c)) for c in result.classes])
    with torch.no_grad():
        greyed = illusion.clip_similarity(result.images * (1 - keep) + 0.5 * keep, targets)
    torch.testing.assert_close(result.core_relevance, result.clip_similarity - greyed)
    with pytest.raises(ValueError, match=r"masks must be \(B, H, W\) of the images' \(2, 3, 64, 64\), got \(2, 64, 16\)"):
        grey_out(result.images, result.masks[..., :16])


def test_the_defaults_are_the_papers():
    # NeuroInspect's settings as the issue states them: a wrong default changes every result
    # a caller gets without passing the option, and no end-to-end test pins it exactly.
    import inspect

    from explaind.methods.neuroinspect import FaithfulSGD, HeadEditor, MistakeNeuronRanker
    from explaind.methods.neuroinspect._editing import DEFAULT_STRENGTH

    def defaults(function):
        return {name: p.default for name, p in inspect.signature(function).parameters.items() if p.default is not p.empty}

    assert defaults(ClipIllusion.visualize).items() >= {"steps": 400, "gamma": 0.5, "epsilon": 0.05, "learning_rate": 9e-3}.items()
    assert defaults(MistakeNeuronRanker.rank).items() >= {"l1": 0.1, "l2": 0.01, "max_iterations": 1000, "cut_ratio": 0.03}.items()
    assert (FaithfulSGD().learning_rate, FaithfulSGD().momentum) == (0.01, 0.9)
    assert defaults(HeadEditor.edit)["learning_rate"] == 1e-3 and DEFAULT_STRENGTH["probability_ratio"] == 0.01


@pytest.mark.parametrize("method", ["clip_illusion", "no_clip", "feature_visualization"])
def test_each_step_descends_the_loss_the_issue_writes(world_model, tiny_clip, monkeypatch, method):
    # L = −(cos + ε)·(α_n + γ·l_c), summed over the images; no_clip drops the CLIP factor,
    # feature_visualization also the class term. Read at the one step from what the
    # classifier and CLIP gave for the augmented images.
    illusion = ClipIllusion(world_model, "layer3", *tiny_clip)
    losses, similarities, reads = [], [], []
    backward = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: (losses.append(self.detach()), backward(self, *a, **k))[1])
    clip_similarity = illusion.clip_similarity
    monkeypatch.setattr(illusion, "clip_similarity", lambda *a: (similarities.append(clip_similarity(*a).detach()), similarities[-1])[1])
    hook = world_model.fc.register_forward_hook(lambda module, inputs, output: reads.append((inputs[0].detach(), output.detach())))
    try:
        illusion.visualize([(5, 1), (17, 2)], method=method, steps=1, gamma=0.3, epsilon=0.7)
    finally:
        hook.remove()
    features, logits = next(read for read in reads if len(read[0]) == 2)  # the step's (the first read is a check's probe)
    expected = features[[0, 1], [5, 17]]
    if method != "feature_visualization":
        expected = expected + 0.3 * logits[[0, 1], [1, 2]]
    if method == "clip_illusion":
        expected = (similarities[0] + 0.7) * expected
    assert len(losses) == 1 and losses[0].item() == pytest.approx(-expected.sum().item(), rel=1e-5)


def test_clip_sees_images_normalised_as_it_was_trained(illusion, tiny_clip):
    # At CLIP's own input size nothing is resized: the cosine is that of CLIP's embedding
    # of the images normalised as its preprocessing says (this one names no statistics, so
    # OpenAI's, open_clip's default); unnormalised pixels gave other cosines silently.
    clip, _ = tiny_clip
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    texts = torch.nn.functional.normalize(torch.randn(2, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    mean, std = (torch.tensor(values).view(1, 3, 1, 1) for values in (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD))
    with torch.no_grad():
        expected = (torch.nn.functional.normalize(clip.encode_image((images - mean) / std), dim=-1) * texts).sum(1)
        torch.testing.assert_close(illusion.clip_similarity(images, texts), expected)


def test_feature_visualization_has_no_class_term(world_model):
    # L = −α_n alone: γ, which weighs the class logit, changes nothing.
    illusion = ClipIllusion(world_model, "layer3")
    plain = illusion.visualize([(3, 1)], method="feature_visualization", steps=3, gamma=0.5)
    weighted = illusion.visualize([(3, 1)], method="feature_visualization", steps=3, gamma=5.0)
    assert torch.equal(plain.images, weighted.images)
    assert not torch.equal(plain.images, illusion.visualize([(3, 1)], method="no_clip", steps=3, gamma=5.0).images)


def test_each_step_anneals_the_learning_rate_by_a_cosine_and_the_noise_linearly(world_model, monkeypatch):
    from explaind.methods.neuroinspect import _illusion

    illusion = ClipIllusion(world_model, "layer3")
    rates = []
    adamw_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (rates.append(self.param_groups[0]["lr"]), adamw_step(self, *a, **k))[1])
    illusion.visualize([(3, 1)], method="no_clip", steps=8)
    assert rates == pytest.approx([9e-3 * (1 + math.cos(math.pi * t / 8)) / 2 for t in range(8)])

    # With a learning rate of 0 the image stays put: what the classifier sees beyond it is
    # the noise, here ones times its std, which falls from noise_std to 0 over the steps.
    monkeypatch.setattr(_illusion, "random_affine", lambda images, generators: images)
    monkeypatch.setattr(_illusion, "gaussian_noise", lambda like, generators: torch.ones_like(like))
    seen = []
    hook = world_model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    try:
        result = illusion.visualize([(3, 1), (4, 2)], method="no_clip", steps=4, learning_rate=0.0, noise_std=0.1)
    finally:
        hook.remove()
    stepped = [images for images in seen if len(images) == 2][:-1]  # the last forward scores the final images
    assert len(stepped) == 4
    for k, images in enumerate(stepped):
        torch.testing.assert_close(images - result.images, torch.full_like(images, 0.1 * (1 - k / 4)))


def test_the_augmentations_span_the_specified_ranges(monkeypatch):
    # Rotation ±15°, scale 0.7–1.2, translation ±15 % of the image, read back from the
    # affine matrices (which map output to input coordinates: the inverse transform).
    captured = []
    affine_grid = torch.nn.functional.affine_grid
    monkeypatch.setattr(torch.nn.functional, "affine_grid", lambda theta, *a, **k: (captured.append(theta), affine_grid(theta, *a, **k))[1])
    generators = [torch.Generator().manual_seed(i) for i in range(3000)]
    random_affine(torch.rand(3000, 3, 4, 4), generators=generators)
    (theta,) = captured
    inverse = theta[:, :, :2]
    scale = 1 / inverse.det().sqrt()
    angle = torch.rad2deg(torch.atan2(inverse[:, 1, 0], inverse[:, 0, 0]))
    shift = -(torch.linalg.inv(inverse) @ theta[:, :, 2:]).squeeze(2) / 2  # in image widths
    for values, low, high in ((scale, 0.7, 1.2), (angle, -15.0, 15.0), (shift, -0.15, 0.15)):
        assert low - 1e-4 <= values.min() < low + 0.02 * (high - low) and high - 0.02 * (high - low) < values.max() <= high + 1e-4


def test_same_seed_same_images_other_seed_other_images(illusion):
    first = illusion.visualize([(3, 1), (9, 0)], steps=3, seed=7)
    again = illusion.visualize([(3, 1), (9, 0)], steps=3, seed=7)
    other = illusion.visualize([(3, 1), (9, 0)], steps=3, seed=8)
    assert torch.equal(first.images, again.images) and torch.equal(first.masks, again.masks)
    assert not torch.equal(first.images, other.images)


def test_an_image_follows_the_same_random_draws_whatever_shares_its_batch(illusion):
    alone = illusion.visualize([(3, 1)], steps=5, seed=7)
    batched = illusion.visualize([(9, 0), (3, 1), (40, 2)], steps=5, seed=7)
    torch.testing.assert_close(batched.images[1], alone.images[0], rtol=0, atol=1e-4)
    # Each method starts from the pair's own spectrum, so ablations compare like with like.
    first = illusion.visualize([(3, 1)], steps=1, seed=7, method="feature_visualization", learning_rate=0.0)
    assert torch.equal(first.images, illusion.visualize([(3, 1)], steps=1, seed=7, learning_rate=0.0).images)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_every_random_draw_is_made_there_and_still_follows_its_pair(world_model, tiny_clip):
    # The per-step noise was drawn on the CPU and copied over: slower than the step itself.
    import copy

    clip, tokenizer = tiny_clip
    illusion = ClipIllusion(copy.deepcopy(world_model).cuda(), "layer3", copy.deepcopy(clip).cuda(), tokenizer)
    drawn_on = []
    real_randn = torch.randn

    def recording_randn(*args, **kwargs):
        drawn_on.append(kwargs["generator"].device.type if "generator" in kwargs else "unseeded")
        return real_randn(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "randn", recording_randn)
        alone = illusion.visualize([(3, 1)], steps=5, seed=7)
    assert drawn_on and set(drawn_on) == {"cuda"}
    batched = illusion.visualize([(9, 0), (3, 1), (40, 2)], steps=5, seed=7)
    # Not 1e-4 as on the CPU: cuDNN picks its convolutions (TF32 by default) by batch size,
    # and on an H200 the pair's image came out up to 5e-4 apart; another seed's draws put
    # it about 0.8 apart (0.78 on the CPU), so this still tells whose draws it got.
    torch.testing.assert_close(batched.images[1], alone.images[0], rtol=0, atol=5e-3)
    assert (illusion.visualize([(3, 1)], steps=5, seed=8).images[0] - alone.images[0]).abs().max() > 0.1
    assert alone.images.device.type == "cuda" and torch.isfinite(alone.activations).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_models_moved_to_a_gpu_after_a_first_visualisation_are_followed_there(world_model, tiny_clip):
    # The class prompt's embedding was cached on the device of the first call.
    import copy

    clip, tokenizer = copy.deepcopy(tiny_clip[0]), tiny_clip[1]
    illusion = ClipIllusion(copy.deepcopy(world_model), "layer3", clip, tokenizer)
    on_cpu = illusion.visualize([(3, 1)], steps=2, seed=7)
    illusion.classifier.cuda(), clip.cuda()
    on_gpu = illusion.visualize([(3, 1)], steps=2, seed=7)
    assert on_cpu.images.device.type == "cpu" and on_gpu.images.device.type == "cuda"
    assert torch.isfinite(on_gpu.clip_similarity).all()


@pytest.mark.parametrize("scale", [0.7, 1.2])
def test_random_affine_translates_up_to_15_percent_at_every_scale(scale):
    size = 65
    dot = torch.zeros(1, 3, size, size)
    dot[..., size // 2, size // 2] = 1
    generators = [torch.Generator().manual_seed(i) for i in range(300)]
    moved = random_affine(dot.expand(300, -1, -1, -1), generators=generators, max_rotation_degrees=0.0,
                          scale_range=(scale, scale))[:, 0]
    coords = torch.arange(size, dtype=torch.float32)
    weight = moved.sum(dim=(1, 2))
    shift_x = (moved.sum(1) * coords).sum(1) / weight - size // 2
    shift_y = (moved.sum(2) * coords).sum(1) / weight - size // 2
    largest = torch.stack([shift_x, shift_y]).abs().amax(1) / size
    assert (largest <= 0.15 + 1 / size).all() and (largest >= 0.14).all(), largest


def test_activation_masks_keep_the_high_part_of_a_map_and_all_of_a_flat_one():
    maps = torch.tensor([[[0.0, 1.0], [2.0, 4.0]], [[3.0, 3.0], [3.0, 3.0]]])
    masks = activation_masks(maps, (2, 2), 0.5)
    assert masks[0].tolist() == [[False, False], [True, True]]
    assert masks[1].all()
    # A flat map whose upsampling rounds into one that varies in its last bits (0.1 from
    # 3x3 to 7x7) is still flat: the threshold would have split it into noise.
    assert activation_masks(torch.full((1, 3, 3), 0.1), (7, 7), 0.5).all()


def test_callback_streams_progress_and_cancels_at_the_next_step(illusion):
    seen = []

    def progress(step, total, images):
        seen.append((step, total, tuple(images.shape)))
        return step == 3

    result = illusion.visualize([(3, 1), (9, 0)], steps=50, callback_on_step_end=progress)
    assert seen == [(1, 50, (2, 3, 64, 64)), (2, 50, (2, 3, 64, 64)), (3, 50, (2, 3, 64, 64))]
    assert result.cancelled and result.steps == 3


def test_optimisation_raises_the_neuron_and_the_clip_score(illusion):
    pairs = [(n, None) for n in range(0, 128, 16)]
    start = illusion.visualize(pairs, steps=1, method="feature_visualization")
    raised = illusion.visualize(pairs, steps=25, method="feature_visualization")
    assert raised.activations.mean() > 1.2 * start.activations.mean()
    # The CLIP term pulls the image towards the class prompt; without it nothing does.
    with_clip = illusion.visualize(pairs, steps=25, method="clip_illusion")
    without = illusion.visualize(pairs, steps=25, method="no_clip")
    assert with_clip.clip_similarity.mean() > without.clip_similarity.mean()


def test_runs_without_clip_for_the_clip_free_methods(world_model):
    plain = ClipIllusion(world_model, "layer3")
    result = plain.visualize([(2, 0)], steps=2, method="no_clip")
    assert math.isnan(result.clip_similarity.item()) and math.isnan(result.core_relevance.item())
    with pytest.raises(ValueError, match="CLIP"):
        plain.visualize([(2, 0)], steps=2, method="clip_illusion")


@pytest.mark.parametrize(
    ("pairs", "kwargs", "field"),
    [([(500, 0)], {}, r"pairs\[0\]"), ([(1, 0), (2, 9)], {}, r"pairs\[1\]"), ([], {}, "pairs"),
     ([(1, 0)], {"method": "dream"}, "method"), ([(1, 0)], {"steps": 0}, "steps"),
     ([(1, 0)], {"mask_threshold": 1.5}, "mask_threshold")],
)
def test_bad_requests_raise_value_errors_naming_the_field(illusion, pairs, kwargs, field):
    with pytest.raises(ValueError, match=field):
        illusion.visualize(pairs, **kwargs)


def test_top_classes_can_rank_every_class_by_the_neuron_s_head_weight(illusion, world_model):
    # k may be every class (the paper conditions a neuron on its 25 most related classes).
    num_classes = world_model.fc.out_features
    weights = world_model.fc.weight[:, 5].detach()
    ranked = illusion.top_classes(5, k=num_classes)
    assert sorted(ranked) == list(range(num_classes))
    assert all(weights[a] >= weights[b] for a, b in zip(ranked, ranked[1:]))


def test_classes_of_equal_head_weight_are_taken_by_class_index(world_model):
    model = copy.deepcopy(world_model)
    with torch.no_grad():
        model.fc.weight[:, 3] = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0])  # topk took classes 1 and 3
    assert ClipIllusion(model, "layer3").top_classes(3, k=2) == [1, 2]


def test_a_class_prompt_is_the_unit_mean_of_its_templates_unit_embeddings(illusion, tiny_clip):
    # T_c: every template filled with the class name, each embedding normalised before the
    # mean (a template with a longer raw embedding would otherwise outweigh the others).
    clip, tokenizer = tiny_clip
    name = illusion.class_names[2]
    with torch.no_grad():
        raw = clip.encode_text(tokenizer([template.format(name) for template in DEFAULT_PROMPT_TEMPLATES]))
    norms = raw.norm(dim=-1)
    assert norms.max() > 1.05 * norms.min()  # unequal lengths, so the two readings differ
    expected = torch.nn.functional.normalize(torch.nn.functional.normalize(raw, dim=-1).mean(0), dim=0)
    torch.testing.assert_close(illusion.class_embedding(2), expected)


def test_prompts_and_class_indices_are_refused_where_they_would_embed_the_wrong_text(illusion):
    # A str was embedded one character per prompt; class -1 was the last class's prompt,
    # and class 6 a bare IndexError (tuple index out of range).
    with pytest.raises(TypeError, match=r"prompts must be a non-empty sequence of prompts, got 'a photo of a circle.'"):
        illusion.text_embedding("a photo of a circle.")
    with pytest.raises(TypeError, match=r"prompts must be a non-empty sequence of prompts, got \[\]"):
        illusion.text_embedding([])
    for class_index in (-1, len(illusion.class_names)):
        with pytest.raises(ValueError, match=rf"class_index must lie in \[0, {len(illusion.class_names)}\), got {class_index}"):
            illusion.class_embedding(class_index)


def test_class_prompts_are_embedded_with_clip_in_eval_mode_and_its_mode_is_kept(world_model):
    # A CLIP left in training mode (dropout on) gave a random T_c and kept it cached.
    class DropoutClip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Module()
            self.visual.image_size = 32
            self.dropout = torch.nn.Dropout(0.5)

        def encode_image(self, image):
            return image.mean(dim=(2, 3))

        def encode_text(self, text):
            return self.dropout(torch.ones(len(text), 3))

    clip = DropoutClip().train()
    illusion = ClipIllusion(world_model, "layer3", clip, lambda prompts: torch.zeros(len(prompts), 1))
    torch.testing.assert_close(illusion.class_embedding(0), torch.full((3,), 3**-0.5))
    assert clip.training


def test_the_callback_sees_the_images_being_optimised_not_their_augmented_views(illusion):
    # Previews show the image as it is returned, not a rotated, noisy view of it.
    seen = []

    def progress(step, total, images):
        seen.append(images.clone())
        return step == 2

    result = illusion.visualize([(3, 1), (9, 0)], steps=10, method="no_clip", callback_on_step_end=progress)
    torch.testing.assert_close(seen[-1], result.images)


def test_a_negative_seed_is_its_twos_complement(illusion):
    # seed_value takes any int64, and numpy's SeedSequence refuses negative entropy.
    negative = illusion.visualize([(3, 1)], steps=2, method="no_clip", seed=-1)
    assert torch.equal(negative.images, illusion.visualize([(3, 1)], steps=2, method="no_clip", seed=2**64 - 1).images)


def test_mask_dim_is_the_brightness_left_outside_the_mask(illusion):
    # Not only the default 0.2: mask_dim 0 blacks the low-activation regions out.
    result = illusion.visualize([(5, None), (17, 2)], steps=2, method="no_clip", mask_dim=0.0, mask_threshold=0.7)
    keep = result.masks.unsqueeze(1).expand_as(result.images)
    assert (~keep).any() and keep.any()
    assert torch.equal(result.masked_images[keep], result.images[keep]) and (result.masked_images[~keep] == 0).all()


def test_each_class_a_neuron_is_conditioned_on_starts_from_its_own_image(illusion):
    # Each (neuron, class) pair draws from its own stream, the class included.
    start = illusion.visualize([(3, 1), (3, 2)], steps=1, method="feature_visualization", learning_rate=0.0)
    assert not torch.equal(start.images[0], start.images[1])


def test_the_mask_is_where_the_visualised_neuron_s_own_map_is_high(illusion, world_model):
    # Channel n of the feature layer on the final image, thresholded at mask_threshold.
    result = illusion.visualize([(5, 1), (17, 2)], steps=2, method="no_clip", mask_threshold=0.7)
    with torch.no_grad():
        maps = FeatureExtractor(world_model, feature_layer="layer3").feature_maps(result.images)[[0, 1], [5, 17]]
    expected = activation_masks(maps, (64, 64), 0.7)
    assert not expected.all() and torch.equal(result.masks, expected)


def test_activation_masks_measure_the_threshold_from_the_map_s_minimum():
    # Halfway from 2 to 6 is 4: a threshold taken from zero would keep the 3 too.
    masks = activation_masks(torch.tensor([[[2.0, 3.0], [4.0, 6.0]]]), (2, 2), 0.5)
    assert masks[0].tolist() == [[False, False], [True, True]]


def test_the_image_is_optimised_by_the_authors_adamw(illusion, monkeypatch):
    # betas (0.5, 0.99) and weight decay 1e-3, as the NeuroInspect code optimises its images.
    groups = []
    adamw_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (groups.append(dict(self.param_groups[0])), adamw_step(self, *a, **k))[1])
    illusion.visualize([(3, 1)], method="no_clip", steps=1)
    assert (groups[0]["betas"], groups[0]["weight_decay"]) == ((0.5, 0.99), 1e-3)


def test_activation_masks_place_the_boundary_on_the_interpolated_map():
    # A 1x2 map (0 | 1) upsampled to 1x8 ramps from 0 to 1 over the middle columns, so the
    # threshold moves the boundary between map cells rather than snapping to them.
    ramp = torch.tensor([[[0.0, 1.0]]])
    kept = [int(activation_masks(ramp, (1, 8), threshold).sum()) for threshold in (0.25, 0.5, 0.75)]
    assert kept == [5, 4, 3]


@pytest.mark.parametrize("mask_threshold", [0.0, 1.0])
def test_a_mask_threshold_at_either_end_is_refused(illusion, mask_threshold):
    # 0 would keep every pixel and 1 only the maximum: neither splits the map.
    with pytest.raises(ValueError, match=r"mask_threshold must lie in \(0, 1\)"):
        illusion.visualize([(1, 0)], method="no_clip", steps=1, mask_threshold=mask_threshold)


def test_clip_sees_images_normalised_by_the_statistics_its_preprocessing_names(world_model, tiny_clip):
    # The world CLIP names its own mean and std: OpenAI's would shift every cosine.
    import copy

    clip, tokenizer = copy.deepcopy(tiny_clip[0]), tiny_clip[1]
    clip.visual.preprocess_cfg = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
    illusion = ClipIllusion(world_model, "layer3", clip, tokenizer)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    texts = torch.nn.functional.normalize(torch.randn(2, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = (torch.nn.functional.normalize(clip.encode_image((images - mean) / std), dim=-1) * texts).sum(1)
        torch.testing.assert_close(illusion.clip_similarity(images, texts), expected)


def test_a_negative_epsilon_is_taken_as_given(illusion, monkeypatch):
    # ε only shifts the CLIP factor; below zero it is an experiment's choice, not an error.
    similarities = []
    clip_similarity = illusion.clip_similarity
    monkeypatch.setattr(illusion, "clip_similarity", lambda *a: (similarities.append(clip_similarity(*a).detach()), similarities[-1])[1])
    losses = []
    backward = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: (losses.append(self.detach()), backward(self, *a, **k))[1])
    reads = []
    hook = illusion.head.register_forward_hook(lambda module, inputs, output: reads.append((inputs[0].detach(), output.detach())))
    try:
        illusion.visualize([(3, 1)], steps=1, gamma=0.0, epsilon=-0.25)
    finally:
        hook.remove()
    features = reads[1][0]  # the step's (the first read is a check's probe)
    assert losses[0].item() == pytest.approx(-((similarities[0] - 0.25) * features[0, 3]).item(), rel=1e-5)


def test_a_negative_activation_is_raised_as_it_is(monkeypatch):
    # α_n enters the loss as the head reads it: a ViT's class-token feature can be
    # negative, and the loss still rises with it rather than flattening at zero.
    vit = _tiny_vit()
    illusion = ClipIllusion(vit, "encoder", class_names=["a", "b", "c"], head="heads.head", image_size=32)
    losses, reads = [], []
    backward = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: (losses.append(self.detach()), backward(self, *a, **k))[1])
    hook = vit.heads.head.register_forward_hook(lambda module, inputs, output: reads.append(inputs[0].detach()))
    try:
        illusion.visualize([(n, 0) for n in range(16)], method="feature_visualization", steps=1)
    finally:
        hook.remove()
    activations = reads[1][torch.arange(16), torch.arange(16)]
    assert (activations < 0).any()
    assert losses[0].item() == pytest.approx(-activations.sum().item(), rel=1e-5)


def test_the_visualisation_uses_the_image_parametrisation_s_default_spectrum_and_noisy_steps(illusion, monkeypatch):
    # One default decay power (FourierImage documents why 1.5), and noise by default.
    import inspect

    from explaind.methods.neuroinspect import _illusion

    def default(function, name):
        return inspect.signature(function).parameters[name].default

    assert default(ClipIllusion.visualize, "decay_power") == default(FourierImage, "decay_power")
    # By default each step adds noise (the image itself held still here).
    monkeypatch.setattr(_illusion, "random_affine", lambda images, generators: images)
    seen = []
    hook = illusion.classifier.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    try:
        result = illusion.visualize([(3, 1)], method="no_clip", steps=2, learning_rate=0.0)
    finally:
        hook.remove()
    assert (seen[1] - result.images).std() > 0.01


def test_each_step_follows_its_own_gradient_alone(illusion, monkeypatch):
    # Held still (no augmentation, no noise, learning rate 0), every step sees the same
    # loss, so every step's gradient is the same: gradients accumulated over steps grew.
    from explaind.methods.neuroinspect import _illusion

    monkeypatch.setattr(_illusion, "random_affine", lambda images, generators: images)
    monkeypatch.setattr(_illusion, "gaussian_noise", lambda like, generators: torch.zeros_like(like))
    gradients = []
    adamw_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (gradients.append(self.param_groups[0]["params"][0].grad.clone()), adamw_step(self, *a, **k))[1])
    illusion.visualize([(3, 1)], method="no_clip", steps=3, learning_rate=0.0)
    assert len(gradients) == 3 and gradients[0].abs().max() > 0
    for gradient in gradients[1:]:
        torch.testing.assert_close(gradient, gradients[0])


def test_clip_sees_the_images_resized_to_its_height_and_width(world_model):
    # A CLIP tower of (H, W) = (24, 40) gets 24 rows of 40 pixels, not 40 of 24.
    class WideClip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Module()
            self.visual.image_size = (24, 40)
            self.projection = torch.nn.Linear(3, 4)
            self.shapes = []

        def encode_image(self, image):
            self.shapes.append(tuple(image.shape))
            return self.projection(image.mean(dim=(2, 3)))

        def encode_text(self, text):
            return torch.ones(len(text), 4)

    clip = WideClip()
    illusion = ClipIllusion(world_model, "layer3", clip, lambda prompts: torch.zeros(len(prompts), 1))
    illusion.clip_similarity(torch.rand(2, 3, 64, 64), torch.ones(2, 4) / 2)
    assert clip.shapes == [(2, 3, 24, 40)]


def _fourier_image(size=64, seed=0, **kwargs):
    """A one-image FourierImage of ``size`` px from ``seed``."""
    return FourierImage([torch.Generator().manual_seed(seed)], size, **kwargs)


@pytest.mark.parametrize("decay_power", [1.0, 1.5])
def test_spectrum_amplitudes_fall_as_a_power_of_frequency_floored_at_the_lowest(decay_power):
    # 1 / f^p with f floored at 1/S: the DC term weighs as the lowest non-zero frequency,
    # and negative frequencies as their positive twins.
    size = 64
    scale = _fourier_image(size, decay_power=decay_power).scale
    assert scale.shape == (size, size // 2 + 1)
    assert scale[0, 0] == scale[0, 1] == scale[1, 0] == pytest.approx(size**decay_power)
    assert (scale[0, 0] / scale[0, size // 2]).item() == pytest.approx((size / 2) ** decay_power, rel=1e-5)
    torch.testing.assert_close(scale[1:], scale[1:].flip(0))  # f_y = k and −k


def test_a_zero_spectrum_is_mid_grey_and_the_first_colour_direction_is_grey_light():
    # The sigmoid maps 0 to 0.5; Lucid's first decorrelated direction is luminance, so a
    # spectrum in it alone changes R, G and B alike (to within its few per cent).
    image = _fourier_image(8)
    with torch.no_grad():
        image.spectrum.zero_()
        torch.testing.assert_close(image(), torch.full((1, 3, 8, 8), 0.5))
        image.spectrum[0, 0, 0, 0, 0] = 0.1  # the DC term of the first direction
        pixel = image()[0, :, 0, 0]
    assert (pixel > 0.5).all() and (pixel.max() - 0.5) < 1.05 * (pixel.min() - 0.5)
    # Scaled so that the longest colour direction has unit length: unit decorrelated noise
    # stays unit in RGB at most.
    assert image.colour.norm(dim=0).max().item() == pytest.approx(1.0)


def test_the_start_image_s_contrast_does_not_depend_on_its_size():
    # An orthonormal inverse FFT keeps the spectrum's energy: the start image's pixel std
    # (before the sigmoid) is the same at 32 and 128 px for a white spectrum.
    stds = [torch.logit(_fourier_image(size, decay_power=0.0)().detach()).std().item() for size in (32, 128)]
    assert stds[1] == pytest.approx(stds[0], rel=0.2)


def test_each_image_starts_from_its_own_generator_at_init_std():
    # An image's start does not depend on the rest of the batch, and its spectrum is
    # Gaussian with std init_std.
    batch = FourierImage([torch.Generator().manual_seed(seed) for seed in (0, 1)], 16, init_std=0.1)
    torch.testing.assert_close(batch.spectrum[1], _fourier_image(16, seed=1, init_std=0.1).spectrum[0])
    assert batch.spectrum.std().item() == pytest.approx(0.1, rel=0.1)


def test_an_odd_sized_image_keeps_its_size():
    # A half spectrum of S // 2 + 1 columns fits both S and S − 1 columns: the size is passed on.
    assert _fourier_image(9)().shape == (1, 3, 9, 9)


def test_the_image_s_buffers_are_made_on_its_generators_device_whatever_the_default_device():
    # The spectrum is drawn on the generators' device; its amplitudes and colours were made
    # on the default one, so an image drawn by GPU generators multiplied CUDA by CPU tensors.
    expected = _fourier_image(8)().detach()
    with default_device_meta():
        image = _fourier_image(8)
        pixels = image().detach()
    assert image.scale.device == image.colour.device == torch.device("cpu")
    assert torch.equal(pixels, expected)


def test_the_augmentations_draw_rotation_scale_and_shift_independently(monkeypatch):
    captured = []
    affine_grid = torch.nn.functional.affine_grid
    monkeypatch.setattr(torch.nn.functional, "affine_grid", lambda theta, *a, **k: (captured.append(theta), affine_grid(theta, *a, **k))[1])
    random_affine(torch.rand(2000, 3, 4, 4), generators=[torch.Generator().manual_seed(i) for i in range(2000)])
    (theta,) = captured
    inverse = theta[:, :, :2]
    scale = 1 / inverse.det().sqrt()
    angle = torch.atan2(inverse[:, 1, 0], inverse[:, 0, 0])
    shift = -(torch.linalg.inv(inverse) @ theta[:, :, 2:]).squeeze(2)
    correlations = torch.corrcoef(torch.stack([angle, scale, shift[:, 0], shift[:, 1]]))
    assert (correlations - torch.eye(4)).abs().max() < 0.1, correlations


def test_the_default_start_is_noise_around_grey_not_saturated():
    # A saturated sigmoid passes almost no gradient back to the spectrum.
    start = FourierImage([torch.Generator().manual_seed(i) for i in range(8)], 64)().detach()
    assert ((start < 0.05) | (start > 0.95)).float().mean() < 0.05
    assert 0.45 < start.mean() < 0.55


def test_the_augmentations_add_no_borders_a_flat_image_stays_flat():
    # Content moved or shrunk away from an edge is filled by reflection: a black border
    # would be an edge in every step's image that the optimiser could feed on.
    grey = torch.full((64, 3, 16, 16), 0.4)
    moved = random_affine(grey, generators=[torch.Generator().manual_seed(i) for i in range(64)])
    torch.testing.assert_close(moved, grey)


def test_an_augmentation_of_nothing_returns_the_image_pixel_for_pixel():
    # No rotation, unit scale, no shift: the sampling grid lands on the pixel centres.
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    same = random_affine(images, generators=[torch.Generator().manual_seed(i) for i in range(4)], max_rotation_degrees=0.0,
                         max_translation=0.0, scale_range=(1.0, 1.0))
    torch.testing.assert_close(same, images)
    # In the images' dtype, not the default one the draws are made in: grid_sample refuses a mix.
    doubled = random_affine(images.double(), generators=[torch.Generator().manual_seed(i) for i in range(4)], max_rotation_degrees=0.0,
                            max_translation=0.0, scale_range=(1.0, 1.0))
    torch.testing.assert_close(doubled, images.double())


def test_the_step_noise_is_standard_normal_each_row_from_its_own_generator_in_the_images_dtype():
    # The tests of visualize replace the noise: its law and its generators are pinned here.
    like = torch.zeros(3, 3, 32, 32, dtype=torch.float64)
    noise = gaussian_noise(like, generators=[torch.Generator().manual_seed(seed) for seed in (5, 6, 7)])
    assert noise.shape == like.shape and noise.dtype == torch.float64
    for row, seed in zip(noise, (5, 6, 7)):
        torch.testing.assert_close(row, torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(seed)).double())


def test_a_half_precision_clip_gets_pixels_in_its_own_dtype(world_model, tiny_clip):
    # float32 pixels into a bfloat16 CLIP failed in its first convolution.
    import copy

    clip, tokenizer = copy.deepcopy(tiny_clip[0]).to(torch.bfloat16), tiny_clip[1]
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    texts = torch.nn.functional.normalize(torch.randn(2, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    with torch.no_grad():
        half = ClipIllusion(world_model, "layer3", clip, tokenizer).clip_similarity(images, texts)
        full = ClipIllusion(world_model, "layer3", *tiny_clip).clip_similarity(images, texts)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0, atol=0.05)


# --- Acceptance 4: quality on the shipped world CLIP -----------------------------------

SHIPPED_CLIP = (clip_dir() / "open_clip_model.safetensors").is_file()


def require_shipped(*scenarios: str) -> None:
    """Skip unless the world CLIP and the classifiers of ``scenarios`` have been built."""
    missing = [name for name in scenarios if not (classifier_dir(name) / "model.safetensors").is_file()]
    if missing or not SHIPPED_CLIP:
        pytest.skip(f"shipped world CLIP or classifiers {missing} not built yet")


def shipped_illusion(scenario: str) -> tuple[ClipIllusion, torch.Tensor, WorldBatch]:
    """ClipIllusion on a shipped classifier and the world CLIP, with its layer3 features
    (600, D) on attribute-independent probe scenes and the scenes themselves."""
    require_shipped(scenario)
    from explaind.world.classifier import load_classifier
    from explaind.world.clip import load_world_clip
    from explaind.world.probes import probe_batch

    classifier = load_classifier(classifier_dir(scenario))
    clip_model, tokenizer, _ = load_world_clip()
    probe = probe_batch(600, seed=1)
    features = FeatureExtractor(classifier, feature_layer="layer3").features(probe.images)
    return ClipIllusion(classifier, "layer3", clip_model, tokenizer), features, probe


def _own_shape_images():
    """The world's default (balanced) classifier: the strongest detector of each shape
    (AUC >= 0.9), conditioned on that shape's class, by CLIP-Illusion and by feature
    visualisation (in an acceptance worker: see ``acceptance_runs``)."""
    illusion, features, probe = shipped_illusion("balanced")
    found = concept_neurons(features, {shape: probe.attributes["shape"] == shape for shape in illusion.class_names},
                            per_concept=1)
    shapes = [shape for shape, neurons in found.items() if neurons]
    assert len(shapes) >= 3, found
    pairs = [(found[shape][0], illusion.class_names.index(shape)) for shape in shapes]
    ours = illusion.visualize(pairs, steps=400, method="clip_illusion", epsilon=WORLD_CLIP_ILLUSION_EPSILON)
    baseline = illusion.visualize(pairs, steps=400, method="feature_visualization")
    return shapes, features[:, [neuron for neuron, _ in pairs]], ours, baseline


def _water_neuron_images():
    """CLIP-Illusion and feature-visualisation images of the spurious_background
    classifier's four strongest water neurons, each conditioned on its top class (in an
    acceptance worker)."""
    illusion, features, probe = shipped_illusion("spurious_background")
    # Neurons with a known attribute: the strongest water detectors of the water-biased model.
    neurons = concept_neurons(features, {"water": probe.attributes["background"] == "water"}, per_concept=4)["water"]
    assert len(neurons) == 4
    pairs = [(neuron, None) for neuron in neurons]  # conditioned on each neuron's top class
    # The world CLIP's cosines go negative, so it runs with its configured ε (cos + ε >= 0).
    ours = illusion.visualize(pairs, steps=400, method="clip_illusion", epsilon=WORLD_CLIP_ILLUSION_EPSILON)
    baseline = illusion.visualize(pairs, steps=400, method="feature_visualization")
    return features[:, neurons], ours, baseline


def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def acceptance_runs():
    """Every 400-step acceptance run of this module, started together in min(2, cores)
    spawned processes on one thread each: the five classifiers of
    ``known_attribute_comparisons``, then the two smaller runs
    behind ``own_shape_neuron_images`` and ``water_neuron_images``, which fill the core
    the fifth classifier leaves idle. One thread gives the numbers of one thread, the
    thread count the acceptance protocol uses; the runs share nothing. Futures by name."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from explaind.world.illusion_check import compare_shipped_classifiers
    from explaind.world.scenarios import scenario_names

    names = scenario_names()
    require_shipped(*names)
    with ProcessPoolExecutor(max_workers=min(2, cores()), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_one_thread) as pool:
        runs = {name: pool.submit(compare_shipped_classifiers, [name], epsilon=WORLD_CLIP_ILLUSION_EPSILON) for name in names}
        runs["own_shape"] = pool.submit(_own_shape_images)
        runs["water"] = pool.submit(_water_neuron_images)
        try:
            yield runs
        finally:
            for run in runs.values():
                run.cancel()


@pytest.fixture(scope="module")
def own_shape_neuron_images(acceptance_runs):
    """The world's default (balanced) classifier: the strongest detector of each shape
    (AUC >= 0.9), conditioned on that shape's class, by CLIP-Illusion and by feature
    visualisation."""
    shapes, neuron_features, ours, baseline = acceptance_runs["own_shape"].result()
    return shipped_illusion("balanced")[0], shapes, neuron_features, ours, baseline


def test_conditioned_on_its_own_shape_clip_illusion_shows_the_shape_and_fires_the_neuron(own_shape_neuron_images):
    """The case CLIP-Illusion is built for: the class it is conditioned on is the neuron's
    attribute. The similarity half guards the CLIP term (its sign, preprocessing and
    prompts); the activation half guards against the class term drowning the neuron."""
    illusion, shapes, neuron_features, ours, baseline = own_shape_neuron_images
    ours_score = attribute_similarity(illusion, ours.images, shapes)
    baseline_score = attribute_similarity(illusion, baseline.images, shapes)
    assert ours_score.mean() > baseline_score.mean() + 0.1, (ours_score, baseline_score)
    assert (ours_score > 0).all(), ours_score
    assert (ours.activations >= neuron_features.quantile(0.99, dim=0)).all(), ours.activations


@pytest.fixture(scope="module")
def water_neuron_images(acceptance_runs):
    """CLIP-Illusion and feature-visualisation images of the spurious_background
    classifier's four strongest water neurons, each conditioned on its top class."""
    neuron_features, ours, baseline = acceptance_runs["water"].result()
    return shipped_illusion("spurious_background")[0], neuron_features, ours, baseline


@pytest.mark.xfail(reason="issue 4 acceptance 4 (activation) does not hold on the current spurious_background classifier: "
                          "water neuron 75, conditioned on its top class (triangle), ends at activation 0.04-0.05 against a "
                          "top-1 % of 1.98 because the loss raises the triangle logit (to 123-130) instead; the other three "
                          "exceed theirs (docs/neuroinspect.md)", strict=True)
def test_clip_illusion_reaches_the_neurons_top_activations_and_reads_as_the_class(water_neuron_images):
    _, neuron_features, ours, _ = water_neuron_images
    assert (ours.clip_similarity > 0).all(), ours.clip_similarity  # each image reads as its class
    top_percent = neuron_features.quantile(0.99, dim=0)
    assert (ours.activations >= top_percent).all(), (ours.activations, top_percent)


@pytest.mark.xfail(reason="issue 4 acceptance 4 (attribute similarity) does not hold on the current spurious_background "
                          "classifier: three of its four strongest water neurons weigh most for cross or triangle, "
                          "conditioning on those shapes pulls the image away from plain water, and CLIP reads feature "
                          "visualisation's water texture as more 'water' (mean cosine 0.14-0.16 vs 0.17-0.19 by CPU; conditioned on heart "
                          "instead, all four give 0.18). It held on the previous classifier (docs/neuroinspect.md)", strict=True)
def test_clip_illusion_shows_the_neurons_attribute_better_than_feature_visualization(water_neuron_images):
    illusion, _, ours, baseline = water_neuron_images
    ours_score = attribute_similarity(illusion, ours.images, ["water"] * len(ours.images))
    baseline_score = attribute_similarity(illusion, baseline.images, ["water"] * len(baseline.images))
    assert ours_score.mean() > baseline_score.mean(), (ours_score, baseline_score)


def test_classifiers_compared_in_worker_processes_get_the_numbers_they_get_in_process():
    """The acceptance fixture below runs classifiers in worker processes: that changes
    when the work is done, not its numbers, and every option reaches the workers."""
    from explaind.world.illusion_check import compare_shipped_classifiers

    names = ["balanced", "spurious_background"]
    require_shipped(*names)
    options = {"probe_size": 200, "seed": 1, "steps": 3, "per_value": 1, "epsilon": WORLD_CLIP_ILLUSION_EPSILON}
    in_process = compare_shipped_classifiers(names, **options)
    in_workers = compare_shipped_classifiers(names, workers=2, threads_per_worker=torch.get_num_threads(), **options)
    assert all(in_process[name] for name in names), in_process
    assert list(in_workers) == names and in_workers == in_process
    with pytest.raises(ValueError, match="workers must be at least 1"):
        compare_shipped_classifiers(names, workers=0, **options)



def test_each_known_attribute_neuron_is_scored_against_its_attribute_s_prompt_and_its_top_percent_on_the_probe(world_model, tiny_clip):
    """Acceptance 4's numbers as defined, on the tiny CLIP and a few steps: the neurons are
    the concept detectors of the probe scenes, each image's cosine is to its own
    attribute's prompt (the masked image's apart), the top 1 % is the 99th percentile
    of the neuron's α_n (the head's input) over the probe scenes, and the core relevance
    and mask share are those of the CLIP-Illusion image. Its controls grey, the same way,
    the mask rolled by half the image, everything but the mask, and the whole image."""
    from explaind.world.clip import CAPTION_WORDS
    from explaind.world.illusion_check import compare_on_known_attributes
    from explaind.world.probes import probe_batch

    probe = probe_batch(120, seed=0)
    comparisons = compare_on_known_attributes("balanced", world_model, tiny_clip, probe, per_value=1, steps=2, epsilon=0.05)
    features = FeatureExtractor(world_model, feature_layer="layer3").features(probe.images)
    concepts = {(a, v): probe.attributes[a] == v for a, words in CAPTION_WORDS.items() for v in words}
    expected = [(a, v, n) for (a, v), neurons in concept_neurons(features, concepts, per_concept=1).items() for n in neurons]
    assert [(c.attribute, c.value, c.neuron) for c in comparisons] == expected and len(expected) >= 2
    for c in comparisons:
        assert c.top_percent == pytest.approx(float(features[:, c.neuron].quantile(0.99)))
        assert c.conditioned_on == world_model.config.class_names[int(world_model.fc.weight[:, c.neuron].argmax())]

    illusion = ClipIllusion(world_model, "layer3", *tiny_clip, head="fc")
    pairs = [(c.neuron, None) for c in comparisons]
    words = [CAPTION_WORDS[c.attribute][c.value] for c in comparisons]
    ours = illusion.visualize(pairs, steps=2, method="clip_illusion", epsilon=0.05, seed=0)
    baseline = illusion.visualize(pairs, steps=2, method="feature_visualization", seed=0)
    scores = {"similarity_ours": attribute_similarity(illusion, ours.images, words),
              "similarity_baseline": attribute_similarity(illusion, baseline.images, words),
              "masked_similarity_ours": attribute_similarity(illusion, ours.masked_images, words),
              "masked_similarity_baseline": attribute_similarity(illusion, baseline.masked_images, words),
              "activation_ours": ours.activations, "activation_baseline": baseline.activations,
              "core_relevance": ours.core_relevance, "mask_fraction": ours.masks.float().mean(dim=(1, 2)),
              "class_similarity": ours.clip_similarity}
    targets = torch.stack([illusion.class_embedding(int(c)) for c in ours.classes])
    side = ours.images.shape[-1]
    shifted = torch.cat([ours.masks[:, side // 2:], ours.masks[:, :side // 2]], dim=1)
    shifted = torch.cat([shifted[:, :, side // 2:], shifted[:, :, :side // 2]], dim=2)
    with torch.no_grad():
        for field, greyed in (("shifted_relevance", shifted), ("rest_relevance", ~ours.masks)):
            keep = greyed.unsqueeze(1).float()
            scores[field] = ours.clip_similarity - illusion.clip_similarity(ours.images * (1 - keep) + 0.5 * keep, targets)
        scores["grey_similarity"] = illusion.clip_similarity(torch.full_like(ours.images, 0.5), targets)
    for field, expected_scores in scores.items():
        assert [getattr(c, field) for c in comparisons] == pytest.approx(expected_scores.tolist(), abs=1e-6), field


def test_a_classifier_without_known_attribute_neurons_has_nothing_to_compare(tiny_clip):
    """A dead network (every weight zero, so every feature 0) detects no attribute: the
    comparison is empty instead of asking CLIP-Illusion to visualise no neuron."""
    from explaind.world.classifier import ClassifierConfig, WorldClassifier
    from explaind.world.illusion_check import compare_on_known_attributes
    from explaind.world.probes import probe_batch

    dead = WorldClassifier(ClassifierConfig()).eval()
    with torch.no_grad():
        for parameter in dead.parameters():
            parameter.zero_()
    assert compare_on_known_attributes("dead", dead, tiny_clip, probe_batch(40, seed=0), steps=1, epsilon=0.05) == []


def test_a_neuron_detecting_two_attribute_values_is_compared_on_each(world_model, tiny_clip):
    """Below AUC 0.9 a neuron detects two values (`bench/illusion_eval.py --min-auc 0.8` finds
    some): its one image, visualised once, is scored for each. Its (neuron, class) pair went
    to visualize twice, which refuses a repeated pair."""
    from explaind.world.illusion_check import compare_on_known_attributes
    from explaind.world.probes import probe_batch

    probe = probe_batch(120, seed=0)
    for condition in ("top-class", "own-shape"):
        comparisons = compare_on_known_attributes("balanced", world_model, tiny_clip, probe, min_auc=0.6, steps=1, epsilon=0.05,
                                                  condition=condition)
        by_image: dict[tuple[int, str], list] = {}
        for c in comparisons:
            by_image.setdefault((c.neuron, c.conditioned_on), []).append(c)
        repeated = [rows for rows in by_image.values() if len(rows) > 1]
        assert repeated, condition  # the case under test
        for first, *others in repeated:  # the same image: its activation and class similarity alike
            assert all((c.activation_ours, c.class_similarity) == (first.activation_ours, first.class_similarity) for c in others)


def test_own_shape_conditioning_changes_only_shape_neurons_whose_top_class_is_another_shape(tiny_clip):
    """Acceptance 4's protocol conditions every neuron on its top class; "own-shape" gives a
    shape neuron its own shape instead. class_plus_context_colour's strongest cross
    detector weighs most for the triangle, so the two protocols differ on it."""
    from explaind.world.classifier import load_classifier
    from explaind.world.illusion_check import compare_on_known_attributes
    from explaind.world.probes import probe_batch

    name = "class_plus_context_colour"
    if not (classifier_dir(name) / "model.safetensors").is_file():
        pytest.skip(f"shipped {name} classifier not built yet")
    model, probe = load_classifier(classifier_dir(name)), probe_batch(120, seed=0)
    runs = {condition: compare_on_known_attributes(name, model, tiny_clip, probe, per_value=1, steps=1, epsilon=0.05,
                                                   condition=condition) for condition in ("top-class", "own-shape")}
    top_class = {c.neuron: model.config.class_names[int(model.fc.weight[:, c.neuron].argmax())] for c in runs["top-class"]}
    assert [c.conditioned_on for c in runs["top-class"]] == [top_class[c.neuron] for c in runs["top-class"]]
    assert [c.conditioned_on for c in runs["own-shape"]] == [c.value if c.attribute == "shape" else top_class[c.neuron]
                                                             for c in runs["own-shape"]]
    assert any(c.attribute == "shape" and top_class[c.neuron] != c.value for c in runs["top-class"])
    assert [c.own_class for c in runs["own-shape"]] == [c.attribute == "shape" for c in runs["own-shape"]]

@pytest.fixture(scope="module")
def known_attribute_comparisons(acceptance_runs):
    """Acceptance 4 as the issue words it, and the protocol of ``bench/illusion_eval.py``:
    every neuron with a known attribute (the three strongest per attribute value, AUC >=
    0.9 on 600 probe scenes) of the five shipped classifiers, each conditioned on its top
    class (the automatic choice), against feature visualisation, 400 steps each; each
    classifier in a process on one thread (``acceptance_runs``), as
    ``compare_shipped_classifiers(..., workers=2)`` runs them."""
    from explaind.world.scenarios import scenario_names

    return [comparison for name in scenario_names() for comparison in acceptance_runs[name].result()[name]]


@pytest.mark.timeout(1200)  # as above: whichever test runs first builds the fixture
def test_on_every_neuron_with_a_known_attribute_clip_illusion_shows_it_better_on_average(known_attribute_comparisons):
    from explaind.world.scenarios import scenario_names

    comparisons = known_attribute_comparisons
    assert {c.classifier for c in comparisons} == set(scenario_names())
    ours = sum(c.similarity_ours for c in comparisons) / len(comparisons)
    baseline = sum(c.similarity_baseline for c in comparisons) / len(comparisons)
    assert ours > baseline, (ours, baseline)


# Acceptance 4's activation half misses on these (classifier, neuron) pairs, and only these.
KNOWN_ACTIVATION_MISSES = {("class_plus_context_colour", 75), ("class_plus_context_colour", 83)}


@pytest.mark.timeout(1200)  # the fixture: 69 neurons, twice 400 steps, about 4 minutes on one core
def test_no_neuron_with_a_known_attribute_misses_its_top_percent_but_the_two_known_ones(known_attribute_comparisons):
    """The strict xfail below cannot tell two misses from forty; this can."""
    missed = {(c.classifier, c.neuron) for c in known_attribute_comparisons if not c.reaches_top_percent}
    assert missed <= KNOWN_ACTIVATION_MISSES, missed


@pytest.mark.xfail(reason="issue 4 acceptance 4 (activation) misses on 2 of the 69 neurons with a known attribute: two "
                          "cross detectors of class_plus_context_colour weigh most for the triangle, and conditioned on it "
                          "end at 1.62-1.63 and 1.40-1.42 (by thread count) against top-1 % activations of 1.74 and 1.68 "
                          "(docs/neuroinspect.md, 'Which protocol is the acceptance test')",
                   strict=True)
def test_on_every_neuron_with_a_known_attribute_clip_illusion_reaches_its_top_percent(known_attribute_comparisons):
    missed = [c for c in known_attribute_comparisons if not c.reaches_top_percent]
    assert not missed, missed


def _tiny_vit() -> torch.nn.Module:
    """A torchvision ViT on 32 px images: 16 patch tokens of width 16 after a class token."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(**TINY_VIT_KWARGS).eval()
    torch.nn.init.normal_(vit.heads.head.weight)  # torchvision starts it at zero: every class would score 0
    return vit


def test_channel_maps_read_cnn_channels_last_and_token_layouts():
    from explaind.methods.neuroinspect import channel_maps

    maps = torch.rand(2, 5, 3, 3)
    assert channel_maps(maps, 5) is maps
    torch.testing.assert_close(channel_maps(maps.permute(0, 2, 3, 1), 5), maps)  # Swin: (N, h, w, C)
    tokens = torch.rand(2, 1 + 9, 5)  # ViT: a class token, then 3 x 3 patches in row order
    read = channel_maps(tokens, 5)
    assert read.shape == (2, 5, 3, 3) and torch.equal(read[:, 4, 1, 2], tokens[:, 1 + 1 * 3 + 2, 4])
    torch.testing.assert_close(channel_maps(tokens[:, 1:], 5), read)  # no class token
    assert channel_maps(torch.rand(2, 5), 5).shape == (2, 5, 1, 1)
    one_token = torch.rand(2, 1, 5)  # 1 is a square, and so is the 0 left without a first token: one position, not none
    torch.testing.assert_close(channel_maps(one_token, 5), one_token.transpose(1, 2)[:, :, :, None])
    with pytest.raises(ValueError, match=r"output \(2, 7, 5\) cannot be read as maps of 5 channels"):
        channel_maps(torch.rand(2, 7, 5), 5)


def test_a_vit_is_split_at_its_class_token_and_its_neurons_are_visualised_on_the_patch_grid():
    vit = _tiny_vit()
    images = torch.rand(4, 3, 32, 32)
    extractor = FeatureExtractor(vit, "encoder", head="heads.head")
    features = extractor.features(images)
    with torch.no_grad():
        torch.testing.assert_close(extractor.head(features), vit(images))  # the class token, not a mean over patches
    assert extractor.feature_maps(images).shape == (4, 16, 4, 4)
    result = ClipIllusion(vit, "encoder", class_names=["a", "b", "c"], head="heads.head", image_size=32).visualize(
        [(3, 0), (11, None)], method="no_clip", steps=3)
    assert result.images.shape == (2, 3, 32, 32) and result.masks.shape == (2, 32, 32)
    # α_n is the feature the head reads (the class token's channel n), which ranking and edits use too.
    torch.testing.assert_close(result.activations, extractor.features(result.images)[[0, 1], [3, 11]])
    assert not torch.allclose(result.activations, extractor.feature_maps(result.images)[[0, 1], [3, 11]].mean(dim=(1, 2)))


def test_a_vit_at_another_image_size_is_refused_naming_image_size():
    # torchvision's ViT asserts its input size: a bare "AssertionError: Wrong image height!".
    illusion = ClipIllusion(_tiny_vit(), "encoder", head="heads.head", image_size=64)
    with pytest.raises(ValueError, match=r"the classifier fails on a 64x64 image \(image_size\): Wrong image height!"):
        illusion.visualize([(3, 0)], method="no_clip", steps=1)
