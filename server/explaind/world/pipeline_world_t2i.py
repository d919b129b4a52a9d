"""Text-to-image pipeline of the shapes world, shaped like diffusers' Stable Diffusion.

Prompts are encoded by an open_clip text tower into per-token states (N, L, W), a
``UNet2DConditionModel`` denoises latents with DDIM and classifier-free guidance
(conditioned on the states by cross-attention, and on their mean by a ``projection``
class embedding when its config has one), and
the VAE (an ``AutoencoderKL`` or anything with its interface, such as
:class:`PixelShuffleAutoencoder`) decodes them to RGB in [0, 1].

Everything below ``__call__`` is differentiable: DiG-IN optimises the start latent
and per-step conditionings through :meth:`denoise` and :meth:`decode_latents` (with
``gradient_checkpointing=True`` so memory does not grow with the step count).
``__call__`` itself runs under ``torch.no_grad`` like every diffusers pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.utils import BaseOutput
from torch import nn
from torch.utils.checkpoint import checkpoint

from .autoencoder_pixel_shuffle import PixelShuffleAutoencoder
from .clip import text_token_states

StepCallback = Callable[["WorldTextToImagePipeline", int, int, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def unet_output(unet: UNet2DConditionModel, latents: torch.Tensor, timestep: torch.Tensor | int, states: torch.Tensor) -> torch.Tensor:
    """The UNet's prediction for token states (N, L, W); a UNet with a ``projection``
    class embedding also gets their mean over tokens (N, W) as global conditioning."""
    pooled = states.mean(dim=1) if unet.config.class_embed_type == "projection" else None
    return unet(latents, timestep, encoder_hidden_states=states, class_labels=pooled).sample


class OpenCLIPTextEncoder(nn.Module):
    """An open_clip ``CLIP`` as a diffusers text encoder: tokens (N, L) -> per-token states (N, L, W).

    Holds (does not copy) the CLIP model, so the pipeline and CLIP-based methods share weights.
    """

    def __init__(self, clip_model: nn.Module) -> None:
        super().__init__()
        self.clip = clip_model

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return text_token_states(self.clip, tokens)


@dataclass
class WorldTextToImagePipelineOutput(BaseOutput):
    """``images``: (N, 3, H, W) float in [0, 1] for ``output_type="pt"``, (N, H, W, 3) for ``"np"``,
    a list of PIL images for ``"pil"``, or the final latents (N, C, h, w) for ``"latent"``."""

    images: torch.Tensor | np.ndarray | list


class WorldTextToImagePipeline(DiffusionPipeline):
    """DDIM + classifier-free guidance over a tiny latent diffusion model.

    ``text_encoder`` wraps an open_clip ``CLIP`` (only its text tower runs) and
    ``tokenizer`` is its open_clip tokenizer, as for any Stable-Diffusion-like model
    whose text encoder is CLIP.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL | PixelShuffleAutoencoder,
        unet: UNet2DConditionModel,
        scheduler: DDIMScheduler,
        text_encoder: OpenCLIPTextEncoder,
        tokenizer: Callable[..., torch.Tensor],
    ) -> None:
        super().__init__()
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
        self._interrupt = False

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` in a ``callback_on_step_end`` to stop after that step."""
        return self._interrupt

    def encode_prompt(self, prompt: str | Sequence[str]) -> torch.Tensor:
        """Per-token text states (N, L, W) of the prompt(s); ``""`` gives the null conditioning."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        tokens = self.tokenizer(prompts).to(self.device)
        return self.text_encoder(tokens).to(self.unet.dtype)

    def prepare_latents(
        self, batch_size: int, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> torch.Tensor:
        """Start latents z_T (N, C, h, w) ~ N(0, I) scaled by the scheduler's init sigma.

        A list of generators (one per image) makes image i depend only on its own seed.
        """
        shape = (self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        if isinstance(generator, list):
            if len(generator) != batch_size:
                raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}")
            noise = torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generator])
        else:
            noise = torch.randn((batch_size, *shape), generator=generator, device=generator.device if generator else None)
        return noise.to(self.device, self.unet.dtype) * self.scheduler.init_noise_sigma

    def predict_noise(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | int,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """Guided model output eps_uncond + w * (eps_cond - eps_uncond); no guidance when w <= 1."""
        if negative_prompt_embeds is None or guidance_scale <= 1.0:
            return unet_output(self.unet, latents, timestep, prompt_embeds)
        both = unet_output(self.unet, torch.cat([latents, latents]), timestep, torch.cat([negative_prompt_embeds, prompt_embeds]))
        uncond, cond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def denoise(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None = None,
        *,
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        gradient_checkpointing: bool = False,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> torch.Tensor:
        """Run the deterministic DDIM chain z_T -> z_0; differentiable in every tensor input.

        ``prompt_embeds`` / ``negative_prompt_embeds`` are (N, L, W), or (T, N, L, W) for
        one conditioning per step (DiG-IN's C_t and null-text tokens).
        """
        self.scheduler.set_timesteps(num_inference_steps, device=latents.device)
        timesteps = self.scheduler.timesteps
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is not None and embeds.ndim == 4 and len(embeds) != len(timesteps):
                raise ValueError(f"{name} has {len(embeds)} per-step conditionings for {len(timesteps)} steps")
        self._interrupt = False
        for i, t in enumerate(timesteps):
            if self.interrupt:
                break
            cond = prompt_embeds[i] if prompt_embeds.ndim == 4 else prompt_embeds
            uncond = None
            if negative_prompt_embeds is not None:
                uncond = negative_prompt_embeds[i] if negative_prompt_embeds.ndim == 4 else negative_prompt_embeds
            if gradient_checkpointing and torch.is_grad_enabled():
                latents = checkpoint(self._ddim_step, latents, t, cond, uncond, guidance_scale, use_reentrant=False)
            else:
                latents = self._ddim_step(latents, t, cond, uncond, guidance_scale)
            if callback_on_step_end is not None:
                local = {"latents": latents, "prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}
                outputs = callback_on_step_end(self, i, int(t), {k: local[k] for k in callback_on_step_end_tensor_inputs})
                latents = outputs.pop("latents", latents)
                prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                negative_prompt_embeds = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
        return latents

    def _ddim_step(
        self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float
    ) -> torch.Tensor:
        model_input = self.scheduler.scale_model_input(latents, t)
        noise = self.predict_noise(model_input, t, cond, uncond, guidance_scale)
        return self.scheduler.step(noise, t, latents, eta=0.0, return_dict=False)[0]

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """RGB images (N, 3, H, W) in [0, 1] from latents (N, C, h, w); differentiable."""
        images = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return (images / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents (N, C, h, w) of RGB images (N, 3, H, W) in [0, 1] (posterior mean unless a generator is given)."""
        posterior = self.vae.encode(images.to(self.device, self.vae.dtype) * 2 - 1).latent_dist
        latents = posterior.sample(generator) if generator is not None else posterior.mean
        return latents * self.vae.config.scaling_factor

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        *,
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> WorldTextToImagePipelineOutput | tuple[Any]:
        """Generate images for ``prompt`` (or precomputed ``prompt_embeds``).

        Defaults (25 DDIM steps, guidance 3.0) are DiG-IN's. ``callback_on_step_end(pipe,
        step, timestep, tensors)`` may return replacements for the tensors it was given
        and may set ``pipe._interrupt = True`` to cancel.
        """
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt and prompt_embeds")
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {sorted(unknown)} not in {self._callback_tensor_inputs}")
        if output_type not in ("pt", "np", "pil", "latent"):
            raise ValueError(f"output_type must be one of pt, np, pil, latent; got {output_type!r}")
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt(prompt)
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=-3)
        batch_size = prompt_embeds.shape[-3]
        if negative_prompt_embeds is None and guidance_scale > 1.0:
            negatives = negative_prompt if negative_prompt is not None else ""
            negatives = [negatives] * (batch_size // num_images_per_prompt) if isinstance(negatives, str) else negatives
            negative_prompt_embeds = self.encode_prompt(negatives)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=-3)
        if latents is None:
            latents = self.prepare_latents(batch_size, generator)
        latents = latents.to(self.device, self.unet.dtype)
        latents = self.denoise(
            latents,
            prompt_embeds,
            negative_prompt_embeds,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        images = latents if output_type == "latent" else self.decode_latents(latents).float()
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).cpu().numpy()
        elif output_type == "pil":
            images = self.numpy_to_pil(images.permute(0, 2, 3, 1).cpu().numpy())
        if not return_dict:
            return (images,)
        return WorldTextToImagePipelineOutput(images=images)
