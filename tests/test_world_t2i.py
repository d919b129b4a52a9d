"""The shapes world's text-to-image model: SD-style files, the DDIM pipeline's contract, shipped weights."""

import itertools
import math
import sys
import time

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

from explaind.world import t2i
from explaind.world.assets import oracle_dir, t2i_dir
from explaind.world.autoencoder_pixel_shuffle import PixelShuffleAutoencoder
from explaind.world.clip import caption_constraints, load_world_clip, train_clip, training_scenes
from explaind.world.pipeline_world_t2i import WorldTextToImagePipeline, WorldTextToImagePipelineOutput, unet_output
from explaind.world.render import BACKGROUNDS, COLOURS, SHAPES, TEXTURES, SceneSpec, render
from explaind.world.t2i import (
    AUTOENCODER_CONFIG,
    SCHEDULER_CONFIG,
    TrainingPaused,
    evaluate_t2i,
    evaluation_prompts,
    load_world_t2i,
    min_snr_weights,
    object_region_weights,
    train_t2i,
    train_unet,
)

from conftest import core_share, torch_threads

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
    return out, clip, load_world_t2i(out, clip), clip_dir


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_cuda_draws_the_same_examples_as_on_cpu(smoke, tmp_path):
    """Random draws come from CPU generators: with one seed, the first step's loss (same
    initial weights, batch, noise and timesteps) agrees across devices up to TF32 rounding."""
    _, _, _, clip_dir = smoke
    losses: dict[str, list[float]] = {"cpu": [], "cuda": []}
    outputs = {
        device: train_t2i(
            steps=3, batch_size=4, clip_dir=clip_dir, out_dir=tmp_path / device, num_threads=1, device=device,
            on_step=lambda step, loss, device=device: losses[device].append(loss), log=False,
        )
        for device in losses
    }
    assert len(losses["cuda"]) == 3 and all(math.isfinite(loss) for loss in losses["cuda"])
    assert losses["cuda"][0] == pytest.approx(losses["cpu"][0], rel=1e-2)
    images = load_world_t2i(outputs["cuda"], load_world_clip(clip_dir)).to("cpu")("a red circle on grass", generator=_generators(0), num_inference_steps=2).images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def test_training_reports_every_step_loss(smoke, tmp_path):
    _, _, _, clip_dir = smoke
    seen: list[tuple[int, float]] = []
    train_t2i(steps=3, batch_size=4, clip_dir=clip_dir, out_dir=tmp_path, num_threads=1, on_step=lambda *pair: seen.append(pair), log=False)
    assert [step for step, _ in seen] == [0, 1, 2] and all(math.isfinite(loss) and loss > 0 for _, loss in seen)


def test_paused_training_resumes_to_the_same_weights_as_an_unbroken_run(smoke, tmp_path):
    """A deadline already past stops after one step with the state saved; the same call
    again continues from there and ends exactly where a run without a pause ends."""
    _, _, _, clip_dir = smoke
    run = {"steps": 4, "batch_size": 4, "clip_dir": clip_dir, "num_threads": 1, "log": False}
    unbroken: list[float] = []
    train_t2i(**run, out_dir=tmp_path / "unbroken", on_step=lambda step, loss: unbroken.append(loss))

    checkpoint = tmp_path / "state" / "t2i.pt"
    resumed: list[float] = []
    with pytest.raises(TrainingPaused) as paused:
        train_t2i(**run, out_dir=tmp_path / "resumed", on_step=lambda step, loss: resumed.append(loss), checkpoint=checkpoint, deadline=0.0)
    assert paused.value.step == 1 and checkpoint.is_file() and not (tmp_path / "resumed" / "unet").exists()
    train_t2i(**run, out_dir=tmp_path / "resumed", on_step=lambda step, loss: resumed.append(loss), checkpoint=checkpoint)

    assert resumed == unbroken  # same batches, noise, timesteps and weights at every step
    weights = [load_file(tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors") for name in ("unbroken", "resumed")]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    assert not checkpoint.exists()  # the finished run's weights replace it


def test_a_run_killed_between_checkpoints_resumes_from_the_last_periodic_save(smoke, tmp_path):
    """Without any deadline the state is saved every ``checkpoint_every`` steps, so a crash
    loses only the steps since; the same call again redoes those and ends as an unbroken run."""
    _, clip, _, _ = smoke
    images, attributes, captions, masks = training_scenes(8, seed=0, watermark_fraction=0.2)
    autoencoder = PixelShuffleAutoencoder(**AUTOENCODER_CONFIG, scaling_factor=2.0)
    checkpoint = tmp_path / "t2i.pt"

    def run(on_step, **saving):
        return train_unet(images, attributes, captions, masks, autoencoder, clip, steps=4, batch_size=4, on_step=on_step, log=False, **saving)

    unbroken: list[float] = []
    expected = run(lambda step, loss: unbroken.append(loss))

    class Killed(Exception):
        pass

    def killed_in_step_three(step, loss):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        run(killed_in_step_three, checkpoint=checkpoint, checkpoint_every=2)
    assert torch.load(checkpoint, weights_only=True)["step"] == 2
    resumed: list[float] = []
    ema = run(lambda step, loss: resumed.append((step, loss)), checkpoint=checkpoint, checkpoint_every=2)
    assert resumed == list(enumerate(unbroken))[2:]
    assert all(torch.equal(value, expected.state_dict()[key]) for key, value in ema.state_dict().items())


def test_warm_restart_continues_from_the_given_weights(smoke, tmp_path):
    """``init_from`` starts the UNet at a saved model's weights: one small first step
    leaves them nearly unchanged, where a run from random weights lands far away."""
    out, _, _, clip_dir = smoke
    run = {"steps": 1, "batch_size": 4, "clip_dir": clip_dir, "num_threads": 1, "seed": 1, "log": False}
    train_t2i(**run, out_dir=tmp_path / "warm", init_from=out)
    train_t2i(**run, out_dir=tmp_path / "cold")
    weights = {name: load_file(path / "unet" / "diffusion_pytorch_model.safetensors") for name, path in (("init", out), ("warm", tmp_path / "warm"), ("cold", tmp_path / "cold"))}

    def distance(name: str) -> float:
        return max((weights[name][key].float() - weights["init"][key].float()).abs().max().item() for key in weights["init"])

    assert distance("warm") < 1e-3 < distance("cold")


def test_resuming_refuses_a_checkpoint_of_another_run(smoke, tmp_path):
    _, _, _, clip_dir = smoke
    checkpoint = tmp_path / "t2i.pt"
    with pytest.raises(TrainingPaused):
        train_t2i(steps=3, batch_size=4, clip_dir=clip_dir, out_dir=tmp_path / "a", num_threads=1, checkpoint=checkpoint, deadline=0.0, log=False)
    with pytest.raises(ValueError, match="steps 3 there, 4 here"):
        train_t2i(steps=4, batch_size=4, clip_dir=clip_dir, out_dir=tmp_path / "b", num_threads=1, checkpoint=checkpoint, log=False)
    with pytest.raises(ValueError, match="needs a checkpoint"):
        train_t2i(steps=3, batch_size=4, clip_dir=clip_dir, out_dir=tmp_path / "c", num_threads=1, deadline=0.0, log=False)


def test_a_deadline_passing_in_the_last_step_finishes_the_run(smoke, tmp_path):
    """Nothing is left to resume: the weights are saved, not a checkpoint."""
    _, _, _, clip_dir = smoke
    checkpoint = tmp_path / "t2i.pt"
    out = train_t2i(steps=1, batch_size=4, clip_dir=clip_dir, out_dir=tmp_path / "out", num_threads=1, checkpoint=checkpoint, deadline=0.0, log=False)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file() and not checkpoint.exists()


def test_training_returns_ema_weights_that_warm_up_from_the_first_step(smoke):
    """The EMA decay warms up as min(decay, (1 + step) / (10 + step)): the average moves 9/10 of
    the way to the trained weights at the first step, 9/11 of the rest at the second. A 2-step
    one-cycle run makes nearly all its move in its first step, so the returned weights end
    1 - 1/10 x 2/11 of the way from the initial ones to the trained ones."""
    out, clip, _, _ = smoke
    images, attributes, captions, masks = training_scenes(4, seed=0, watermark_fraction=0.2)
    autoencoder = PixelShuffleAutoencoder(**AUTOENCODER_CONFIG, scaling_factor=2.0)
    initial = UNet2DConditionModel.from_pretrained(out / "unet", torch_dtype=torch.float32, low_cpu_mem_usage=False).state_dict()

    def moved(ema_decay: float) -> torch.Tensor:
        ema = train_unet(images, attributes, captions, masks, autoencoder, clip, steps=2, batch_size=4, ema_decay=ema_decay, init_from=out / "unet", log=False)
        return torch.cat([(value - initial[key]).flatten() for key, value in ema.state_dict().items() if value.is_floating_point()])

    trained = moved(ema_decay=0.0)  # no averaging: the trained weights themselves
    averaged = moved(ema_decay=0.998)
    assert trained.abs().max() > 0
    assert float(averaged @ trained / (trained @ trained)) == pytest.approx(1 - 0.1 * 2 / 11, abs=2e-3)


def _generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_evaluation_prompts_cover_every_shape_background_pair():
    prompts = evaluation_prompts()
    assert len(prompts) == 48 == len(set(prompts))
    pairs = {(caption_constraints(p)["shape"], caption_constraints(p)["background"]) for p in prompts}
    assert pairs == set(itertools.product(SHAPES, BACKGROUNDS))


def test_evaluation_prompts_vary_colour_and_texture_for_every_shape():
    constraints = [{"texture": "plain", **caption_constraints(p)} for p in evaluation_prompts()]  # a caption leaves "plain" unsaid
    assert {c["colour"] for c in constraints} == set(COLOURS) and {c["texture"] for c in constraints} == set(TEXTURES)
    for shape in SHAPES:
        prompted = [c for c in constraints if c["shape"] == shape]
        assert len({c["colour"] for c in prompted}) > 1 and len({c["texture"] for c in prompted}) > 1, shape


def test_min_snr_weights_cap_only_the_low_noise_steps():
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    weights = min_snr_weights(scheduler, torch.arange(1000))
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    # For v-prediction the plain loss already weighs a step by SNR + 1: min-SNR caps it at gamma.
    torch.testing.assert_close(weights * (snr + 1), snr.clamp(max=5.0))
    assert weights[0] < 0.01 and weights[-1] < 0.01


def test_clean_weight_floor_keeps_the_noisiest_steps_in_the_loss():
    """In clean-image terms min-SNR weighs step t by min(SNR, 5), about 0.005 at the last
    step; the floor lifts only the steps under it, where the prompt alone sets the shape."""
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    timesteps = torch.arange(1000)
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    floored = min_snr_weights(scheduler, timesteps, floor=1.0) * (snr + 1)
    torch.testing.assert_close(floored, snr.clamp(min=1.0, max=5.0))
    low_noise = snr >= 1
    torch.testing.assert_close(floored[low_noise], (min_snr_weights(scheduler, timesteps) * (snr + 1))[low_noise])
    assert floored[-1] == pytest.approx(1.0) and 0 < low_noise.sum() < 1000


def test_object_region_weights_cover_the_object_and_one_cell_around_it():
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 20:24, 40:44] = True  # exactly latent cell (5, 10)
    masks[0, 0:2, 0:4] = True  # half of cell (0, 0)
    weights = object_region_weights(masks, patch_size=4, weight=4.0)
    assert weights.shape == (2, 1, 16, 16)
    assert torch.equal(weights[1], torch.ones(1, 16, 16))  # no object: every cell alike
    expected = torch.ones(16, 16)
    expected[0:2, 0:2] = 3.0  # half covered, dilated by one cell (clipped at the border)
    expected[4:7, 9:12] = 5.0  # fully covered, dilated by one cell
    assert torch.equal(weights[0, 0], expected)


def test_smoke_training_writes_an_sd_style_directory(smoke):
    out, clip, _, _ = smoke
    vae = PixelShuffleAutoencoder.from_pretrained(out / "vae")
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    scheduler = DDIMScheduler.from_pretrained(out / "scheduler")
    assert unet.config.cross_attention_dim == clip[0].transformer.width
    assert unet.config.in_channels == unet.config.out_channels == vae.latent_channels == 48
    assert scheduler.config.clip_sample is False and 1 < vae.config.scaling_factor < 4
    # Global conditioning: the mean token state enters every ResNet block's time embedding.
    assert unet.config.class_embed_type == "projection" and unet.config.projection_class_embeddings_input_dim == unet.config.cross_attention_dim
    stored = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float16 for v in stored.values() if v.is_floating_point())


def test_pixel_autoencoder_is_an_exact_autoencoderkl_stand_in():
    vae = PixelShuffleAutoencoder(scaling_factor=2.0)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    posterior = vae.encode(images).latent_dist
    assert posterior.mean.shape == (2, 48, 16, 16) and torch.equal(posterior.sample(), posterior.mean)
    assert torch.equal(vae.decode(posterior.mean).sample, images)
    as_tuple = vae(images, return_dict=False)  # AutoencoderKL's forward: a round trip
    assert torch.equal(vae(images).sample, images) and type(as_tuple) is tuple and torch.equal(as_tuple[0], images)
    # The top-left 4x4 RGB patch is the first latent pixel.
    assert torch.equal(posterior.mean[0, :, 0, 0], images[0, :, :4, :4].reshape(-1))
    with pytest.raises(ValueError, match="patch_size"):
        vae.encode(torch.zeros(1, 3, 62, 62))


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
    assert pipe("a star", num_images_per_prompt=3, num_inference_steps=2, output_type="latent").images.shape == (3, 48, 16, 16)


def test_guidance_of_at_most_one_leaves_the_negative_prompt_out(smoke):
    """Documented "no guidance when w <= 1": the image is the prompt's alone, whatever the
    negative prompt, given as text or as embeddings; at guidance 3 the negative prompt shows."""
    pipe = smoke[2]
    negatives = pipe.encode_prompt("a blue heart on grass")

    def draw(**kwargs):
        return pipe("a red star on sand", generator=_generators(0), num_inference_steps=2, **kwargs).images

    for scale in (0.5, 1.0):
        alone = draw(guidance_scale=scale, negative_prompt="a green cross on snow")
        assert torch.equal(alone, draw(guidance_scale=scale, negative_prompt_embeds=negatives))
    guided = draw(guidance_scale=3.0, negative_prompt="a blue heart on grass")
    assert not torch.allclose(guided, draw(guidance_scale=3.0), atol=1e-4)  # the negative replaces the empty prompt
    torch.testing.assert_close(draw(guidance_scale=3.0, negative_prompt_embeds=negatives), guided, atol=1e-5, rtol=0)
    # One negative per prompt serves each of its images.
    twice = pipe("a red star on sand", negative_prompt_embeds=negatives, num_images_per_prompt=2, generator=_generators(0, 1),
                 num_inference_steps=2, guidance_scale=3.0).images
    torch.testing.assert_close(twice[:1], guided, atol=1e-4, rtol=0)
    assert not torch.allclose(guided, draw(guidance_scale=0.5), atol=1e-4)


def test_pipeline_starts_from_given_latents_and_returns_pil_images_or_a_tuple(smoke):
    pipe = smoke[2]
    start = pipe.prepare_latents(1, _generators(3))
    seeded = pipe("a star", generator=_generators(3), num_inference_steps=2, output_type="np").images
    from_latents = pipe("a star", latents=start, num_inference_steps=2, output_type="np", return_dict=False)
    assert isinstance(from_latents, tuple) and len(from_latents) == 1
    np.testing.assert_allclose(from_latents[0], seeded, atol=1e-5, rtol=0)
    (picture,) = pipe("a star", latents=start, num_inference_steps=2, output_type="pil").images
    assert isinstance(picture, Image.Image) and picture.size == (64, 64)
    assert np.abs(np.asarray(picture, dtype=np.float64) - seeded[0] * 255).max() <= 1  # 8-bit rounding only


def test_callback_sees_every_step_and_can_cancel(smoke):
    pipe = smoke[2]
    seen = []

    def record(p, step, timestep, tensors):
        seen.append((step, timestep, tuple(tensors["latents"].shape)))
        return {}

    pipe("a star", generator=_generators(0), num_inference_steps=4, callback_on_step_end=record)
    assert [s for s, _, _ in seen] == [0, 1, 2, 3] and seen[0][2] == (1, 48, 16, 16)
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
    with pytest.raises(ValueError, match=r"callback_on_step_end_tensor_inputs \['noise'\]"):
        pipe("a star", callback_on_step_end=lambda *args: {}, callback_on_step_end_tensor_inputs=("latents", "noise"))


def test_the_service_loads_the_world_layout_with_the_configured_clip_as_text_encoder(smoke, tmp_path):
    from explaind.config import ClipSection, DiffusionSection
    from explaind.engine.models import ModelLoadError, load_clip, load_diffusion

    out, _, _, clip_dir = smoke
    clip_status = load_clip(ClipSection(path=str(clip_dir)), required=False)
    assert clip_status.loaded, clip_status.detail
    status = load_diffusion(DiffusionSection(path=str(out)), clip_status, required=True)
    assert status.loaded and isinstance(status.model, WorldTextToImagePipeline)
    assert status.model.text_encoder.clip is clip_status.model[0]  # shared, not copied
    images = status.model("a star", generator=_generators(0), num_inference_steps=2).images
    assert images.shape == (1, 3, 64, 64)
    missing_clip = load_clip(ClipSection(), required=False)
    with pytest.raises(ModelLoadError, match="text encoder.*CLIP"):
        load_diffusion(DiffusionSection(path=str(out)), missing_clip, required=True)
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_diffusion(DiffusionSection(path=str(tmp_path)), clip_status, required=True)


def test_evaluation_lets_the_oracle_read_every_prompt_and_seed_and_scores_only_what_a_prompt_names(smoke, tmp_path):
    pipe = smoke[2]
    read = []

    class ConstantOracle:
        """Reads a red plain star on sand in every image."""

        def predict(self, images):
            read.append(images)
            return {attribute: np.array([value] * len(images)) for attribute, value in
                    {"shape": "star", "colour": "red", "texture": "plain", "background": "sand"}.items()}

    prompts = ["a red star", "a blue circle on sand"]
    report = evaluate_t2i(ConstantOracle(), pipe, prompts=prompts, seeds=(0, 1), guidance_scale=1.5, num_inference_steps=2,
                          grid_path=tmp_path / "grid.png", batch_size=3)
    # No prompt names a texture; only the second names a background.
    assert report == {"accuracy": {"shape": 0.5, "colour": 0.5, "background": 1.0}, "guidance_scale": 1.5, "num_inference_steps": 2, "num_images": 4}
    (images,) = read
    assert images.shape == (4, 3, 64, 64)  # (prompt, seed) in order: prompt 0 seed 0, prompt 0 seed 1, ...
    for index, (prompt, seed) in enumerate(itertools.product(prompts, (0, 1))):
        alone = pipe(prompt, generator=_generators(seed), guidance_scale=1.5, num_inference_steps=2).images
        torch.testing.assert_close(images[index : index + 1], alone, atol=1e-4, rtol=0)
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (4 * 64 + 5, 64 + 2)  # one row per 4 prompts, their seeds side by side; 1-pixel padding


def _run_t2i_command(monkeypatch, *arguments: str) -> None:
    monkeypatch.setattr(sys, "argv", ["t2i", *arguments])
    t2i.main()


def test_t2i_command_passes_its_options_on_and_needs_a_checkpoint_for_max_minutes(monkeypatch, capsys, tmp_path):
    trained = []
    monkeypatch.setattr(t2i, "train_t2i", lambda **kw: (trained.append(kw), tmp_path / "out")[1])
    before = time.monotonic()
    _run_t2i_command(monkeypatch, "--out", str(tmp_path / "out"), "--clip", str(tmp_path / "clip"), "--steps", "7", "--batch-size", "5",
                     "--seed", "3", "--clean-weight-floor", "0.25", "--object-weight", "2.5", "--init-from", str(tmp_path / "prev"),
                     "--threads", "1", "--device", "meta", "--skip-eval", "--checkpoint", str(tmp_path / "state.pt"), "--max-minutes", "1.5")
    after = time.monotonic()
    (options,) = trained
    deadline = options.pop("deadline")
    assert options == {"steps": 7, "seed": 3, "clip_dir": tmp_path / "clip", "out_dir": tmp_path / "out", "batch_size": 5,
                       "clean_weight_floor": 0.25, "object_weight": 2.5, "init_from": tmp_path / "prev", "num_threads": 1,
                       "device": "meta", "checkpoint": tmp_path / "state.pt"}
    assert before + 90 <= deadline <= after + 90  # minutes from the start
    assert capsys.readouterr().out.startswith("[t2i] trained in ")
    _run_t2i_command(monkeypatch, "--skip-eval")
    assert trained[1]["deadline"] is None and trained[1]["checkpoint"] is None and trained[1]["init_from"] is None
    with pytest.raises(SystemExit) as refused:
        _run_t2i_command(monkeypatch, "--skip-eval", "--max-minutes", "8")
    assert refused.value.code == 2 and len(trained) == 2
    assert "--max-minutes needs --checkpoint" in capsys.readouterr().err


def test_t2i_command_exits_75_when_paused_and_the_same_command_finishes_the_run(smoke, monkeypatch, capsys, tmp_path):
    """The loop docs/world.md gives for machines lent minutes at a time: rerun while the exit code is 75."""
    _, _, _, clip_dir = smoke
    monkeypatch.setattr(t2i, "evaluate_t2i", lambda **kw: pytest.fail("evaluated despite --skip-eval"))
    checkpoint, out = tmp_path / "state.pt", tmp_path / "out"
    command = ("--steps", "2", "--batch-size", "4", "--clip", str(clip_dir), "--out", str(out), "--threads", "1",
               "--skip-eval", "--checkpoint", str(checkpoint), "--max-minutes", "0")
    with pytest.raises(SystemExit) as paused:
        _run_t2i_command(monkeypatch, *command)
    assert paused.value.code == 75 and checkpoint.is_file() and not out.exists()
    assert f"[t2i] paused after step 1 of 2; state saved to {checkpoint}" in capsys.readouterr().out
    _run_t2i_command(monkeypatch, *command)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"[t2i] resuming from {checkpoint} at step 1/2"
    assert printed[1].startswith("[t2i] step 2/2 loss ") and printed[-1].endswith(f"-> {out}")
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file() and not checkpoint.exists()


def test_t2i_command_scores_the_model_it_trained_with_the_oracle(smoke, monkeypatch, capsys, tmp_path):
    _, _, _, clip_dir = smoke
    loaded, reports = [], []
    for name in ("load_world_clip", "load_world_t2i"):
        real = getattr(t2i, name)
        monkeypatch.setattr(t2i, name, lambda directory, *args, real=real, **kw: (loaded.append(directory), real(directory, *args, **kw))[1])
    evaluate = t2i.evaluate_t2i

    def evaluate_one_image(**kw):
        reports.append(evaluate(**kw, prompts=["a red star on sand"], seeds=(0,), num_inference_steps=2))
        return reports[-1]

    monkeypatch.setattr(t2i, "evaluate_t2i", evaluate_one_image)
    out, grid = tmp_path / "out", tmp_path / "samples" / "grid.png"
    _run_t2i_command(monkeypatch, "--steps", "1", "--batch-size", "4", "--clip", str(clip_dir), "--out", str(out), "--threads", "1", "--grid", str(grid))
    assert loaded == [clip_dir, clip_dir, out]  # trained against the CLIP, then loaded with it
    (report,) = reports
    assert grid.is_file() and report["num_images"] == 1
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"[t2i] oracle on 1 samples (guidance {report['guidance_scale']}, 2 DDIM steps): "
        + ", ".join(f"{attribute} {value:.3f}" for attribute, value in report["accuracy"].items()))


def test_missing_component_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="vae"):
        load_world_t2i(tmp_path)


@pytest.fixture(scope="module")
def shipped():
    return load_world_t2i()


@needs_shipped
def test_shipped_model_loads_offline_and_denoises_a_known_scene(shipped):
    """Noise a rendered scene to t=500 and let the UNet predict v: it must beat predicting zero."""
    image = torch.from_numpy(render(SceneSpec("heart", "blue", "stripes", "snow", seed=5)).image).permute(2, 0, 1)
    image = image.float().div(255).unsqueeze(0)
    with torch.no_grad():
        latents = shipped.encode_images(image)
        torch.testing.assert_close(shipped.decode_latents(latents), image, atol=1e-5, rtol=0)
        assert latents.shape == (1, 48, 16, 16) and 0.5 < latents.std() < 2  # scaling factor: ~unit scale
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([500])
        noisy = shipped.scheduler.add_noise(latents, noise, t)
        caption = shipped.encode_prompt("a blue striped heart on snow")
        predicted = unet_output(shipped.unet, noisy, t, caption)
        velocity = shipped.scheduler.get_velocity(latents, noise, t)
    assert (predicted - velocity).pow(2).mean() < 0.5 * velocity.pow(2).mean()


needs_oracle = pytest.mark.skipif(not (oracle_dir() / "oracle.safetensors").is_file(), reason="attribute oracle not built yet")


@pytest.fixture(scope="module")
def shipped_report(shipped):
    """Issue 2 acceptance 4 as the quality table measures it: 48 prompts x 4 seeds, every
    shape and background, guidance 3, 25 DDIM steps (70 s on one thread, 44 on two, with
    the same accuracies, 2026-12-02; one per test process when two share two cores)."""
    with torch_threads(min(2, core_share())):
        return evaluate_t2i(pipeline=shipped)


@needs_shipped
@needs_oracle
def test_shipped_model_draws_the_prompted_background_and_colour(shipped_report):
    assert shipped_report["num_images"] == 192 and set(shipped_report["accuracy"]) == {"shape", "colour", "texture", "background"}
    assert shipped_report["accuracy"]["background"] >= 0.8 and shipped_report["accuracy"]["colour"] >= 0.9, shipped_report


@needs_shipped
@needs_oracle
def test_shipped_model_draws_the_prompted_shape(shipped_report):
    assert shipped_report["accuracy"]["shape"] >= 0.7, shipped_report
