"""A parameter-free, exactly invertible stand-in for ``AutoencoderKL``: space-to-depth.

The shapes world's text-to-image model diffuses in pixel space, folded into a latent
grid: each ``patch_size x patch_size`` RGB patch becomes ``3 * patch_size**2``
channels, so a 64x64x3 image is a 16x16x48 "latent" (Simple Diffusion / DiT style
patching). A learned VAE small enough to train on a shared CPU in minutes blurred
the shapes away; this one reconstructs every pixel exactly and trains in no time.

It keeps ``AutoencoderKL``'s interface (``encode(x).latent_dist``, ``decode(z).sample``,
``config.scaling_factor``, ``save_pretrained`` / ``from_pretrained``), so pipelines and
methods written for Stable Diffusion's VAE use it unchanged. Images are in [-1, 1].
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin


class PixelShuffleAutoencoder(ModelMixin, ConfigMixin):
    """(N, C, H, W) images <-> (N, C * p**2, H / p, W / p) latents, deterministically."""

    @register_to_config
    def __init__(self, in_channels: int = 3, patch_size: int = 4, sample_size: int = 64, scaling_factor: float = 1.0) -> None:
        super().__init__()
        # ModelMixin reads device and dtype off a tensor; this one carries no weights.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> PixelShuffleAutoencoder:
        """Rebuild from ``config.json`` alone (there are no weights); dtype/device kwargs are ignored."""
        return cls.from_config(cls.load_config(pretrained_model_name_or_path))

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels * self.config.patch_size**2

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """A zero-variance "posterior" whose mean is the unscaled latent (N, C * p**2, H / p, W / p)."""
        if x.shape[-1] % self.config.patch_size or x.shape[-2] % self.config.patch_size:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of patch_size {self.config.patch_size}")
        latents = F.pixel_unshuffle(x, self.config.patch_size)
        posterior = DiagonalGaussianDistribution(torch.cat([latents, torch.zeros_like(latents)], dim=1), deterministic=True)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None) -> DecoderOutput | tuple:
        """Images (N, C, H, W) from unscaled latents; exact inverse of :meth:`encode`."""
        sample = F.pixel_shuffle(z, self.config.patch_size)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        return self.decode(self.encode(sample).latent_dist.mean, return_dict=return_dict)
