"""The shapes world's tiny text-to-image model, a diffusion model in diffusers format.

Like Stable Diffusion, a ``UNet2DConditionModel`` denoises latents conditioned
through cross-attention on the per-token states of the (tiny) CLIP text transformer,
and samples with DDIM and classifier-free guidance; like SDXL it also adds pooled text
(here the mean token state) to every block's time embedding. The "VAE" is the documented
pixel-space equivalent :class:`PixelShuffleAutoencoder` (64x64x3 RGB <-> 16x16x48,
exact and weightless): a learned ``AutoencoderKL`` small enough to train here blurred
shapes into blobs. The UNet is trained on the balanced scenario's train split
(v-prediction, min-SNR-5 loss weights floored at 1 and raised around the object,
10 % empty prompts for guidance, horizontal flips); its EMA weights are shipped.

Layout written by :func:`train_t2i`, loadable like an SD checkpoint::

    <dir>/vae/        PixelShuffleAutoencoder.from_pretrained(<dir>/vae)  (config only)
    <dir>/unet/       UNet2DConditionModel.from_pretrained(<dir>/unet)
    <dir>/scheduler/  DDIMScheduler.from_pretrained(<dir>/scheduler)

    python -m explaind.world.t2i --out server/explaind/world/assets/t2i    # one run, 10000 steps

The shipped weights are :data:`UNET_TRAIN_STAGES` run in turn (``python -m explaind.world.build
--parts t2i``): each stage after the first adds ``--steps S --seed K --init-from <the same dir>``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from ..config import WORLD_T2I_PARTS
from .assets import clip_dir as default_clip_dir
from .assets import t2i_dir
from .autoencoder_pixel_shuffle import PixelShuffleAutoencoder
from .clip import load_world_clip, sample_caption, text_token_states, training_scenes
from .pipeline_world_t2i import OpenCLIPTextEncoder, WorldTextToImagePipeline, unet_output
from .render import BACKGROUNDS, COLOURS, SHAPES, TEXTURES, SceneSpec, caption_for
from .scenarios import get_scenario
from .train_classifier import one_cycle_schedule, seed_everything

# Architectures and noise schedule, as data. The UNet's in/out channels and
# cross_attention_dim come from the autoencoder and the CLIP text width.
AUTOENCODER_CONFIG: dict[str, Any] = {"in_channels": 3, "patch_size": 4, "sample_size": 64}
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [48, 96, 96],
    "layers_per_block": 1,
    "attention_head_dim": 4,
    "norm_num_groups": 16,
    # Global conditioning besides cross-attention: the mean of the text token states is
    # projected into the timestep embedding of every ResNet block (as SDXL adds pooled
    # text). Background and colour are global attributes that cross-attention alone
    # learned slowly.
    "class_embed_type": "projection",
}
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "v_prediction",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
}
# The shipped recipe, (steps, seed) per run: every run after the first continues the
# UNet the previous one saved (``init_from``, a warm restart with a fresh one-cycle
# schedule), so that 2-core sessions can add training in pieces of about an hour.
UNET_TRAIN_STAGES: tuple[tuple[int, int], ...] = ((10000, 0), (6000, 1), (8000, 2))
UNET_TRAIN_STEPS = UNET_TRAIN_STAGES[0][0]
EVAL_GUIDANCE_SCALE = 3.0
EVAL_INFERENCE_STEPS = 25
EVAL_SEEDS = (0, 1, 2, 3)
_MIN_SNR_GAMMA = 5.0
# Clean-image loss weight floor for the noisiest steps and extra weight on the object's
# neighbourhood; see min_snr_weights and object_region_weights for why.
_CLEAN_WEIGHT_FLOOR = 1.0
_OBJECT_LOSS_WEIGHT = 4.0
_EMPTY_PROMPT_RATE = 0.1
_PARTIAL_PROMPT_RATE = 0.2


def evaluation_prompts() -> list[str]:
    """48 full captions covering all 30 (shape, background) pairs, with varied colour and texture."""
    colours = list(COLOURS)
    return [
        caption_for(
            SceneSpec(
                shape=SHAPES[i % 6],
                colour=colours[(i + i // 6) % 6],
                texture=TEXTURES[(i // 2) % 4],
                background=BACKGROUNDS[(i // 6) % 5],
            )
        )
        for i in range(48)
    ]


def min_snr_weights(
    scheduler: DDIMScheduler, timesteps: torch.Tensor, gamma: float = _MIN_SNR_GAMMA, floor: float = 0.0
) -> torch.Tensor:
    """Per-sample v-loss weights max(min(SNR, gamma), floor) / (SNR + 1) (min-SNR, Hang et al., 2023).

    The v-loss is (SNR + 1) times the clean-image loss, so these weigh the clean image
    by max(min(SNR, gamma), floor). Min-SNR alone (``floor`` 0) gives the noisiest steps a
    clean-image weight of about SNR, near 0; yet in pixel space those are the only steps
    where the outline is gone from the input and the prompt alone says which shape to draw.
    """
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    return snr.clamp(max=gamma).clamp(min=floor) / (snr + 1)


def object_region_weights(object_masks: torch.Tensor, patch_size: int, weight: float) -> torch.Tensor:
    """Per-latent-cell loss weights (N, 1, H/p, W/p): 1 + ``weight`` x the object's coverage
    of the cell, dilated by one cell.

    Why: the noisy backgrounds fill most of the image and most of the loss, while a wrong
    shape differs from the right one only along the outline, a few dozen pixels in or just
    outside the object. The dilation covers the outside where another shape would paint.
    """
    coverage = torch.nn.functional.avg_pool2d(object_masks.float()[:, None], patch_size)
    return 1 + weight * torch.nn.functional.max_pool2d(coverage, 3, stride=1, padding=1)


class TrainingPaused(Exception):
    """Training stopped at its deadline with its whole state saved in ``checkpoint``;
    the same call again resumes from ``step`` and ends bit-identical to an unbroken run."""

    def __init__(self, step: int, steps: int, checkpoint: Path) -> None:
        super().__init__(f"paused after step {step} of {steps}; state saved to {checkpoint}; run the same command again to continue")
        self.step, self.steps, self.checkpoint = step, steps, checkpoint


def train_unet(
    images: torch.Tensor,
    attributes: list[dict[str, str]],
    captions: list[str],
    object_masks: torch.Tensor,
    autoencoder: PixelShuffleAutoencoder,
    clip: tuple,
    *,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    ema_decay: float = 0.998,
    seed: int = 0,
    clean_weight_floor: float = _CLEAN_WEIGHT_FLOOR,
    object_weight: float = _OBJECT_LOSS_WEIGHT,
    init_from: Path | None = None,
    device: str | torch.device = "cpu",
    on_step: Callable[[int, float], None] | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: int = 500,
    deadline: float | None = None,
    log: bool = True,
) -> UNet2DConditionModel:
    """Train the conditional UNet on uint8 images (N, 3, 64, 64), their captions and object
    masks (N, 64, 64); returns its EMA weights (on CPU).

    The loss is the v-prediction error weighted per sample by :func:`min_snr_weights`
    (``clean_weight_floor``) and per latent cell by :func:`object_region_weights`
    (``object_weight``; 0 weighs every cell alike).

    ``init_from`` (a saved UNet directory, e.g. ``<t2i dir>/unet``) starts the UNet and
    its EMA from those weights instead of at random: a warm restart that adds training to
    shipped weights without their optimiser state, so training can grow in pieces.

    ``device`` runs the UNet and the text tower there (e.g. ``"cuda"``; the CLIP model
    is moved in place); images stay on the CPU and go over one batch at a time. Every
    random draw (batches, flips, noise, timesteps, prompt dropping) comes from CPU
    generators, so a seed picks the same training examples on any device.
    ``on_step(step, loss)`` follows every step (loss curves, progress bars).

    With a ``checkpoint`` file the run survives interruption: its whole state (weights,
    EMA, optimiser, schedule, random generators) is saved there every
    ``checkpoint_every`` steps and a later call with the same arguments resumes from it.
    ``deadline`` (a ``time.monotonic()`` value; needs ``checkpoint``) saves and raises
    :class:`TrainingPaused` once a step ends past it, for machines lent minutes at a time.
    """
    if deadline is not None and checkpoint is None:
        raise ValueError("a deadline needs a checkpoint file to save the state in")
    seed_everything(seed)
    device = torch.device(device)
    text_model, tokenizer = clip[0].eval().to(device), clip[1]
    channels = autoencoder.latent_channels
    width = text_model.transformer.width
    unet = UNet2DConditionModel(
        **UNET_CONFIG, in_channels=channels, out_channels=channels, cross_attention_dim=width,
        projection_class_embeddings_input_dim=width,
    )
    if init_from is not None:
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(init_from, torch_dtype=torch.float32, low_cpu_mem_usage=False).state_dict())
    unet = unet.to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    optimiser = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=0.01)
    schedule = one_cycle_schedule(optimiser, max_learning_rate=learning_rate, total_steps=steps, warmup_fraction=0.05)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    state = _TrainingState(
        checkpoint, {
            "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate, "ema_decay": ema_decay, "seed": seed,
            "num_images": len(images), "clean_weight_floor": clean_weight_floor, "object_weight": object_weight,
            "init_from": None if init_from is None else str(init_from),
        },
        unet, ema, optimiser, schedule, generator, rng,
    )
    first_step = state.restore()
    # Once for every image, not per visit: (N, 1, 16, 16) instead of the (N, 64, 64) masks.
    all_cell_weights = object_region_weights(object_masks, autoencoder.config.patch_size, object_weight)
    if log and first_step:
        print(f"[t2i] resuming from {checkpoint} at step {first_step}/{steps}", flush=True)
    start = time.perf_counter()
    unet.train()
    for step in range(first_step, steps):
        index = torch.randint(len(images), (min(batch_size, len(images)),), generator=generator)
        pixels = images[index].to(device).float().div_(127.5).sub_(1.0)
        flip = (torch.rand(len(index), generator=generator) < 0.5).to(device)
        pixels[flip] = pixels[flip].flip(-1)
        cell_weights = all_cell_weights[index].to(device)
        cell_weights[flip] = cell_weights[flip].flip(-1)
        latents = autoencoder.encode(pixels).latent_dist.mean * autoencoder.config.scaling_factor
        prompts = []
        for i in index.tolist():
            draw = rng.random()
            if draw < _EMPTY_PROMPT_RATE:
                prompts.append("")
            elif draw < _EMPTY_PROMPT_RATE + _PARTIAL_PROMPT_RATE:
                prompts.append(sample_caption(attributes[i], captions[i], rng))
            else:
                prompts.append(captions[i])
        with torch.no_grad():
            states = text_token_states(text_model, tokenizer(prompts).to(device))
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        weights = min_snr_weights(scheduler, timesteps, floor=clean_weight_floor).to(device)
        timesteps = timesteps.to(device)
        predicted = unet_output(unet, scheduler.add_noise(latents, noise, timesteps), timesteps, states)
        target = scheduler.get_velocity(latents, noise, timesteps)
        per_sample = ((predicted - target).pow(2) * cell_weights).mean(dim=(1, 2, 3)) / cell_weights.mean(dim=(1, 2, 3))
        loss = (weights * per_sample).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        if on_step is not None:
            on_step(step, loss.item())
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1 - decay)  # one call, not one kernel per tensor
        if log and (step % 100 == 0 or step == steps - 1):
            print(f"[t2i] step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)", flush=True)
        done = step + 1
        out_of_time = deadline is not None and time.monotonic() >= deadline
        if checkpoint is not None and done < steps and (out_of_time or done % checkpoint_every == 0):
            state.save(done)
            if out_of_time:
                raise TrainingPaused(done, steps, checkpoint)
    return ema.eval().cpu()


class _TrainingState:
    """Everything a resumed run needs to continue exactly where a stopped one ended,
    saved atomically to one file and refused if it belongs to a different run."""

    def __init__(self, path: Path | None, run: dict[str, Any], unet, ema, optimiser, schedule, generator: torch.Generator, rng: np.random.Generator) -> None:
        self.path, self.run = path, run
        self.unet, self.ema, self.optimiser, self.schedule, self.generator, self.rng = unet, ema, optimiser, schedule, generator, rng

    def save(self, step: int) -> None:
        state = {
            "step": step, "run": self.run,
            "unet": self.unet.state_dict(), "ema": self.ema.state_dict(),
            "optimiser": self.optimiser.state_dict(), "schedule": self.schedule.state_dict(),
            "generator": self.generator.get_state(), "rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        torch.save(state, partial)
        os.replace(partial, self.path)

    def restore(self) -> int:
        """Load the checkpoint if there is one; returns the step to continue from (0 if none)."""
        if self.path is None or not self.path.is_file():
            return 0
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        differences = [f"{key} {state['run'].get(key)} there, {value} here" for key, value in self.run.items() if state["run"].get(key) != value]
        if differences:
            raise ValueError(f"checkpoint {self.path} belongs to another run ({'; '.join(differences)}); delete it or name another checkpoint")
        self.unet.load_state_dict(state["unet"])
        self.ema.load_state_dict(state["ema"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.schedule.load_state_dict(state["schedule"])
        self.generator.set_state(state["generator"])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        return state["step"]


def train_t2i(
    *,
    steps: int | None = None,
    seed: int = 0,
    clip_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    batch_size: int = 32,
    train_size: int | None = None,
    clean_weight_floor: float = _CLEAN_WEIGHT_FLOOR,
    object_weight: float = _OBJECT_LOSS_WEIGHT,
    init_from: str | Path | None = None,
    num_threads: int = 2,
    device: str | torch.device = "cpu",
    on_step: Callable[[int, float], None] | None = None,
    checkpoint: str | Path | None = None,
    deadline: float | None = None,
    log: bool = True,
) -> Path:
    """Train the UNet against the CLIP in ``clip_dir`` and save the SD-style directory; returns ``out_dir``.

    ``steps`` defaults to :data:`UNET_TRAIN_STEPS`; ``clean_weight_floor`` and
    ``object_weight`` as in :func:`train_unet` (the defaults are the shipped recipe);
    ``init_from`` a saved text-to-image directory whose UNet is trained further.
    Only as many scenes are rendered as ``steps * batch_size`` can visit, so a smoke
    run (``steps=3``) takes seconds.
    ``checkpoint`` and ``deadline`` as in :func:`train_unet` (raises
    :class:`TrainingPaused`); the checkpoint is deleted once the weights are saved.
    """
    torch.set_num_threads(num_threads)
    steps = UNET_TRAIN_STEPS if steps is None else steps
    out_dir = Path(out_dir or t2i_dir())
    clip = load_world_clip(clip_dir or default_clip_dir())
    size = min(train_size or get_scenario("balanced").sizes["train"], steps * batch_size)
    images, attributes, captions, object_masks = training_scenes(size, seed, watermark_fraction=0.2)
    # Unit-variance latents, as Stable Diffusion's scaling_factor gives its VAE latents.
    autoencoder = PixelShuffleAutoencoder(**AUTOENCODER_CONFIG)
    autoencoder.register_to_config(scaling_factor=float(1.0 / images.float().div(127.5).sub(1.0).std()))
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    unet = train_unet(
        images, attributes, captions, object_masks, autoencoder, clip, steps=steps, batch_size=batch_size, seed=seed,
        clean_weight_floor=clean_weight_floor, object_weight=object_weight,
        init_from=None if init_from is None else Path(init_from) / "unet", device=device,
        on_step=on_step, checkpoint=checkpoint, deadline=deadline, log=log,
    )
    autoencoder.save_pretrained(out_dir / "vae")
    unet.save_pretrained(out_dir / "unet")
    DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(out_dir / "scheduler")
    _halve_weights(out_dir)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return out_dir


def _halve_weights(directory: Path) -> None:
    """Store the component weights in fp16 (loaders upcast to the fp32 model dtype)."""
    from safetensors.torch import load_file, save_file

    for path in directory.glob("*/diffusion_pytorch_model.safetensors"):
        state = load_file(path)
        save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path, metadata={"format": "pt"})


def load_world_t2i(
    directory: str | Path | None = None, clip: tuple | None = None, *, device: str | torch.device = "cpu"
) -> WorldTextToImagePipeline:
    """The shipped pipeline from files only; ``clip`` is ``load_world_clip()``'s tuple (loaded if None)."""
    directory = Path(directory or t2i_dir())
    for part in WORLD_T2I_PARTS:
        if not (directory / part).is_dir():
            raise FileNotFoundError(f"text-to-image component missing: {directory / part} (build it with python -m explaind.world.t2i)")
    model, tokenizer = (clip or load_world_clip())[:2]
    pipeline = WorldTextToImagePipeline(
        vae=PixelShuffleAutoencoder.from_pretrained(directory / "vae"),
        unet=UNet2DConditionModel.from_pretrained(directory / "unet", torch_dtype=torch.float32, low_cpu_mem_usage=False),
        scheduler=DDIMScheduler.from_pretrained(directory / "scheduler"),
        text_encoder=OpenCLIPTextEncoder(model.eval()),
        tokenizer=tokenizer,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


@torch.no_grad()
def evaluate_t2i(
    oracle: Any = None,
    pipeline: WorldTextToImagePipeline | None = None,
    *,
    prompts: list[str] | None = None,
    seeds: tuple[int, ...] = EVAL_SEEDS,
    guidance_scale: float = EVAL_GUIDANCE_SCALE,
    num_inference_steps: int = EVAL_INFERENCE_STEPS,
    grid_path: str | Path | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Generate every (prompt, seed) pair and let the attribute oracle read the images.

    Returns ``{"accuracy": {attribute: fraction recognised}, "guidance_scale", "num_inference_steps",
    "num_images"}``; ``grid_path`` gets a PNG grid (one row per 4 prompts, seeds side by side).
    Loads the shipped pipeline and oracle when not given.
    """
    from torchvision.utils import save_image

    from .clip import caption_constraints
    from .oracle import ORACLE_ATTRIBUTES, load_oracle

    oracle = oracle or load_oracle()
    pipeline = pipeline or load_world_t2i()
    prompts = prompts or evaluation_prompts()
    jobs = [(prompt, seed) for prompt in prompts for seed in seeds]
    images = []
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i : i + batch_size]
        generators = [torch.Generator().manual_seed(seed) for _, seed in chunk]
        output = pipeline(
            [prompt for prompt, _ in chunk],
            generator=generators,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
        )
        images.append(output.images.cpu())
    images = torch.cat(images)
    predicted = oracle.predict(images)
    accuracy = {}
    for attribute in ORACLE_ATTRIBUTES:
        asked = [caption_constraints(prompt).get(attribute) for prompt, _ in jobs]
        hits = [p == a for p, a in zip(predicted[attribute], asked) if a is not None]
        if hits:
            accuracy[attribute] = float(np.mean(hits))
    if grid_path is not None:
        Path(grid_path).parent.mkdir(parents=True, exist_ok=True)
        save_image(images, str(grid_path), nrow=4 * len(seeds), padding=1)
    return {
        "accuracy": accuracy,
        "guidance_scale": guidance_scale,
        "num_inference_steps": num_inference_steps,
        "num_images": len(jobs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=t2i_dir())
    parser.add_argument("--clip", type=Path, default=default_clip_dir())
    parser.add_argument("--steps", type=int, default=UNET_TRAIN_STEPS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clean-weight-floor", type=float, default=_CLEAN_WEIGHT_FLOOR, help="least clean-image loss weight of a noisy step (0: plain min-SNR)")
    parser.add_argument("--object-weight", type=float, default=_OBJECT_LOSS_WEIGHT, help="extra loss weight around the object (0: every pixel alike)")
    parser.add_argument("--init-from", type=Path, default=None, help="continue training the UNet of this text-to-image directory (a warm restart)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 is faster on a busy machine)")
    parser.add_argument("--device", default="cpu", help="train (and evaluate) on this torch device, e.g. cuda")
    parser.add_argument("--grid", type=Path, default=None, help="write a PNG grid of evaluation samples here")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--checkpoint", type=Path, default=None, help="save the training state here every 500 steps and resume from it")
    parser.add_argument("--max-minutes", type=float, default=None, help="with --checkpoint: save and exit (code 75) once this long has passed since start; rerun to continue")
    args = parser.parse_args()
    if args.max_minutes is not None and args.checkpoint is None:
        parser.error("--max-minutes needs --checkpoint, where the state is saved for the next run")
    start = time.perf_counter()
    deadline = None if args.max_minutes is None else time.monotonic() + args.max_minutes * 60
    try:
        out = train_t2i(
            steps=args.steps, seed=args.seed, clip_dir=args.clip, out_dir=args.out,
            batch_size=args.batch_size, clean_weight_floor=args.clean_weight_floor, object_weight=args.object_weight,
            init_from=args.init_from, num_threads=args.threads, device=args.device,
            checkpoint=args.checkpoint, deadline=deadline,
        )
    except TrainingPaused as paused:
        print(f"[t2i] {paused}", flush=True)
        sys.exit(75)  # EX_TEMPFAIL: not an error, the work continues on the next run
    print(f"[t2i] trained in {time.perf_counter() - start:.0f}s -> {out}")
    if not args.skip_eval:
        pipeline = load_world_t2i(out, load_world_clip(args.clip, device=args.device), device=args.device)
        report = evaluate_t2i(pipeline=pipeline, grid_path=args.grid)
        print(f"[t2i] oracle on {report['num_images']} samples (guidance {report['guidance_scale']}, "
              f"{report['num_inference_steps']} DDIM steps): "
              + ", ".join(f"{a} {v:.3f}" for a, v in report["accuracy"].items()))


if __name__ == "__main__":
    main()
