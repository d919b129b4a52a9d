"""The shapes world's text-to-image model: SD-style files, the DDIM pipeline's contract, shipped weights."""

import itertools

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file

from explaind.world.assets import oracle_dir, t2i_dir
from explaind.world.clip import caption_constraints, load_world_clip, train_clip
from explaind.world.pipeline_world_t2i import WorldTextToImagePipeline, WorldTextToImagePipelineOutput
from explaind.world.render import BACKGROUNDS, SHAPES, SceneSpec, render
from explaind.world.t2i import (
    SCHEDULER_CONFIG,
    evaluate_t2i,
    evaluation_prompts,
    load_world_t2i,
    min_snr_weights,
    train_t2i,
)

SHIPPED = all((t2i_dir() / part).is_dir() for part in ("vae", "unet", "scheduler"))
needs_shipped = pytest.mark.skipif(not SHIPPED, reason="shipped text-to-image weights not built yet (python -m explaind.world.t2i)")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """A CLIP and a text-to-image model trained for two steps: wrong, but real files and real code."""
    clip_dir = train_clip(steps=2, batch_size=8, out_dir=tmp_path_factory.mktemp("clip"), num_threads=1, log=False)
    out = train_t2i(steps=2, batch_size=4, clip_dir=clip_dir, out_dir=tmp_path_factory.mktemp("t2i"), num_threads=1, log=False)
    clip = load_world_clip(clip_dir)
    return out, clip, load_world_t2i(out, clip)


def _generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_evaluation_prompts_cover_every_shape_background_pair():
    prompts = evaluation_prompts()
    assert len(prompts) == 48 == len(set(prompts))
    pairs = {(caption_constraints(p)["shape"], caption_constraints(p)["background"]) for p in prompts}
    assert pairs == set(itertools.product(SHAPES, BACKGROUNDS))


def test_min_snr_weights_cap_only_the_low_noise_steps():
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    weights = min_snr_weights(scheduler, torch.arange(1000))
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    assert torch.all(weights <= 1) and torch.all(weights[snr <= 5] == 1)
    assert weights[0] < 0.01  # nearly clean latents: SNR in the hundreds


def test_smoke_training_writes_an_sd_style_directory(smoke):
    out, clip, _ = smoke
    vae = AutoencoderKL.from_pretrained(out / "vae")
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    scheduler = DDIMScheduler.from_pretrained(out / "scheduler")
    assert unet.config.cross_attention_dim == clip[0].transformer.width
    assert unet.config.in_channels == vae.config.latent_channels and scheduler.config.clip_sample is False
    assert vae.config.scaling_factor > 0
    for part in ("vae", "unet"):
        stored = load_file(out / part / "diffusion_pytorch_model.safetensors")
        assert all(v.dtype == torch.float16 for v in stored.values() if v.is_floating_point())
    latents = vae.encode(torch.zeros(2, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (2, 4, 16, 16)


def test_pipeline_is_deterministic_per_seed_and_independent_of_the_batch(smoke):
    pipe = smoke[2]
    both = pipe(["a red star on sand", "a blue circle on water"], generator=_generators(0, 1), num_inference_steps=3)
    assert isinstance(both, WorldTextToImagePipelineOutput)
    assert both.images.shape == (2, 3, 64, 64) and 0 <= both.images.min() and both.images.max() <= 1
    alone = pipe("a blue circle on water", generator=_generators(1), num_inference_steps=3).images
    torch.testing.assert_close(alone[0], both.images[1], atol=1e-4, rtol=0)
    again = pipe("a blue circle on water", generator=_generators(2), num_inference_steps=3).images
    assert not torch.allclose(again, alone)
    as_numpy = pipe("a star", generator=_generators(0), num_inference_steps=2, output_type="np").images
    assert as_numpy.shape == (1, 64, 64, 3)
    assert pipe("a star", num_images_per_prompt=3, num_inference_steps=2, output_type="latent").images.shape == (3, 4, 16, 16)


def test_callback_sees_every_step_and_can_cancel(smoke):
    pipe = smoke[2]
    seen = []

    def record(p, step, timestep, tensors):
        seen.append((step, timestep, tuple(tensors["latents"].shape)))
        return {}

    pipe("a star", generator=_generators(0), num_inference_steps=4, callback_on_step_end=record)
    assert [s for s, _, _ in seen] == [0, 1, 2, 3] and seen[0][2] == (1, 4, 16, 16)
    assert [t for _, t, _ in seen] == sorted((t for _, t, _ in seen), reverse=True)

    def stop_after_two(p, step, timestep, tensors):
        seen.append(step)
        p._interrupt = step >= 1
        return {}

    seen.clear()
    pipe("a star", generator=_generators(0), num_inference_steps=6, callback_on_step_end=stop_after_two)
    assert seen == [0, 1]


def test_denoise_is_differentiable_with_per_step_conditioning_and_checkpointing(smoke):
    pipe = smoke[2]
    steps = 3
    start = pipe.prepare_latents(1, _generators(0))
    cond = pipe.encode_prompt("a red star on sand").detach()
    null = pipe.encode_prompt("").detach()

    def gradients(checkpointing):
        z = start.clone().requires_grad_(True)
        per_step = cond.expand(steps, *cond.shape).clone().requires_grad_(True)
        images = pipe.decode_latents(pipe.denoise(z, per_step, null, num_inference_steps=steps, gradient_checkpointing=checkpointing))
        images[..., 0, :, :].mean().backward()
        return z.grad, per_step.grad

    plain, checkpointed = gradients(False), gradients(True)
    for a, b in zip(plain, checkpointed):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b)
    assert (plain[1].abs().sum(dim=(1, 2, 3)) > 0).all()  # every step's conditioning matters


def test_pipeline_rejects_bad_arguments(smoke):
    pipe = smoke[2]
    cond = pipe.encode_prompt("a star")
    with pytest.raises(ValueError, match="exactly one of prompt and prompt_embeds"):
        pipe("a star", prompt_embeds=cond)
    with pytest.raises(ValueError, match="per-step conditionings"):
        pipe(prompt_embeds=cond.expand(5, *cond.shape), num_inference_steps=3)
    with pytest.raises(ValueError, match="output_type"):
        pipe("a star", output_type="jpeg")
    with pytest.raises(ValueError, match="generators"):
        pipe(["a star", "a heart"], generator=_generators(0))


def test_missing_component_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="vae"):
        load_world_t2i(tmp_path)


@pytest.fixture(scope="module")
def shipped():
    return load_world_t2i()


@needs_shipped
def test_shipped_vae_reconstructs_a_known_scene(shipped):
    image = torch.from_numpy(render(SceneSpec("heart", "blue", "stripes", "snow", seed=5)).image).permute(2, 0, 1)
    image = image.float().div(255).unsqueeze(0)
    with torch.no_grad():
        latents = shipped.encode_images(image)
        reconstruction = shipped.decode_latents(latents)
    assert latents.shape == (1, 4, 16, 16) and 0.3 < latents.std() < 3  # scaling factor makes latents ~unit scale
    assert (reconstruction - image).abs().mean() < 0.06


@needs_shipped
@pytest.mark.skipif(not (oracle_dir() / "oracle.safetensors").is_file(), reason="attribute oracle not built yet")
def test_shipped_model_draws_the_prompted_shape_and_background(shipped):
    prompts = evaluation_prompts()[0:30:5] + evaluation_prompts()[2:30:5]
    assert {caption_constraints(p)["shape"] for p in prompts} == set(SHAPES)
    assert {caption_constraints(p)["background"] for p in prompts} == set(BACKGROUNDS)
    report = evaluate_t2i(pipeline=shipped, prompts=prompts, seeds=(0,))
    assert report["num_images"] == 12 and set(report["accuracy"]) == {"shape", "colour", "texture", "background"}
    assert report["accuracy"]["shape"] >= 0.6 and report["accuracy"]["background"] >= 0.7, report
