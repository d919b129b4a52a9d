"""Decorrelated Fourier image parametrisation and the per-step transforms of feature
visualisation (Olah et al., "Feature Visualization", Distill 2017).

Optimising a spectrum scaled by 1/f, in a decorrelated colour space, squashed by a
sigmoid, gives every spatial frequency and colour direction a comparable effective
learning rate, which suppresses the high-frequency noise pixel-space optimisation finds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import count, number

# Square root of the ImageNet colour covariance (from Lucid); normalised by its largest
# column norm so decorrelated unit noise stays in range.
_COLOUR_CORRELATION_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], device="cpu")
_COLOUR_CORRELATION = _COLOUR_CORRELATION_SQRT / _COLOUR_CORRELATION_SQRT.norm(dim=0).max()


class FourierImage(nn.Module):
    """A batch of images (B, 3, H, W) in (0, 1), parametrised by a scaled FFT spectrum.

    Spectrum amplitudes scale as 1 / f^``decay_power``. The default 1.5 and the missing
    division by 4 follow the NeuroInspect authors' code (``(fx² + fy²) ** 0.75``), not
    Lucid (1 / f, image / 4): on the shapes world, 400 AdamW steps at lr 9e-3 with Lucid's
    settings leave most post-ReLU channels dead and the image full of pixel noise, while
    this reaches several times a neuron's top-1 % real activation. The lowest frequencies
    are floored as in Lucid (f clamped to 1/S before the power), not as in the authors'
    code (which floors the scaled power, flattening them): at S = 64 the DC amplitude is
    about 180 times the Nyquist one here, about 27 times there. ``init_std`` is the std of
    the initial (Gaussian) spectrum. Each image draws its initial spectrum from its own
    generator in ``generators``, so its start does not depend on the rest of the batch.
    """

    scale: torch.Tensor  # (S, S // 2 + 1) spectrum amplitudes, a buffer
    colour: torch.Tensor  # (3, 3) decorrelated colour to RGB, a buffer

    def __init__(self, generators: Sequence[torch.Generator], image_size: int, *, decay_power: float = 1.5,
                 init_std: float = 0.05) -> None:
        super().__init__()
        if isinstance(generators, torch.Generator) or not isinstance(generators, Sequence) or not all(
                isinstance(generator, torch.Generator) for generator in generators):
            raise TypeError(f"generators must be a sequence of torch.Generator, one per image, got {generators!r}")
        if not generators:
            raise ValueError("generators must hold at least one torch.Generator (one per image)")
        self.image_size = image_size = count(image_size, "image_size")
        decay_power, init_std = number(decay_power, "decay_power"), number(init_std, "init_std")
        device = generators[0].device  # the spectrum's: its buffers beside it, as forward multiplies them
        fy = torch.fft.fftfreq(image_size, device=device).unsqueeze(1)
        fx = torch.fft.rfftfreq(image_size, device=device).unsqueeze(0)
        frequency = (fx * fx + fy * fy).sqrt()
        self.register_buffer("scale", 1.0 / frequency.clamp_min(1.0 / image_size) ** decay_power, persistent=False)
        if not torch.isfinite(self.scale).all():  # the images would be NaN from the start
            raise ValueError(f"decay_power {decay_power:g} is too large for image_size {image_size}: the lowest frequency's "
                             f"amplitude, {image_size}^{decay_power:g}, overflows {self.scale.dtype}")
        self.register_buffer("colour", _COLOUR_CORRELATION.to(device, copy=True), persistent=False)
        shape = (3, image_size, image_size // 2 + 1, 2)
        self.spectrum = nn.Parameter(torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generators]) * init_std)

    def forward(self) -> torch.Tensor:
        spectrum = torch.view_as_complex(self.spectrum) * self.scale
        image = torch.fft.irfft2(spectrum, s=(self.image_size, self.image_size), norm="ortho")
        image = torch.einsum("bchw,dc->bdhw", image, self.colour)
        return torch.sigmoid(image)


def random_affine(images: torch.Tensor, *, generators: Sequence[torch.Generator], max_rotation_degrees: float = 15.0,
                  max_translation: float = 0.15, scale_range: tuple[float, float] = (0.7, 1.2)) -> torch.Tensor:
    """Rotate, scale and then translate each image (B, 3, H, W) by its own generator's draw.

    The translation moves the content by up to ``max_translation`` of the image size
    whatever the scale: ``affine_grid`` maps output to input coordinates, so the shift d
    enters its matrix as −A·d, with A the inverse rotation/scale.
    """
    draws = torch.stack([torch.rand(4, generator=g, device=g.device) for g in generators])  # (B, 4) in [0, 1)
    angle = (draws[:, 0] * 2 - 1) * math.radians(max_rotation_degrees)
    low, high = scale_range
    scale = low + (high - low) * draws[:, 1]
    shift = (draws[:, 2:] * 2 - 1) * max_translation * 2  # grid coordinates span 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    inverse = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (B, 2, 2)
    theta = torch.cat([inverse, -(inverse @ shift.unsqueeze(2))], 2)
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def gaussian_noise(like: torch.Tensor, *, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Standard normal noise shaped like ``like`` (B, ...), each row from its own generator,
    drawn on the generator's device (on a GPU, drawing each step's noise on the CPU and
    copying it over took longer than the step)."""
    return torch.stack([torch.randn(like.shape[1:], generator=g, device=g.device) for g in generators]).to(like)
