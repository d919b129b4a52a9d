"""Procedural renderer of the shapes world.

Every image is a pure function of its :class:`SceneSpec`, so the same seed always
gives identical bytes, and the ground truth (attributes, caption, masks) is exact:
pixels are drawn without anti-aliasing, so a mask covers exactly the pixels that the
object (or artifact) painted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 230),
    "yellow": (245, 215, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
}
TEXTURES: tuple[str, ...] = ("plain", "stripes", "dots", "checker")
BACKGROUNDS: tuple[str, ...] = ("grass", "water", "sand", "snow", "brick")

# Words used in captions and prompts, per attribute value.
TEXTURE_WORDS: dict[str, str] = {"plain": "plain", "stripes": "striped", "dots": "dotted", "checker": "checkered"}

ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "texture": TEXTURES,
    "background": BACKGROUNDS,
    "artifact": ("none", "watermark"),
}
MIN_IMAGE_SIZE = 16  # pixels: the smallest scene the renderer draws


def whole_number(name: str, value: object, minimum: int) -> int:
    """``value`` as an int of at least ``minimum``; ValueError naming ``name`` otherwise
    (a float or string size would fail later, in numpy, without it)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


@dataclass(frozen=True)
class SceneSpec:
    """Everything that determines one image. ``seed`` drives jitter and noise."""

    shape: str
    colour: str
    texture: str
    background: str
    artifact: bool = False
    seed: int = 0
    size: int = 64

    def __post_init__(self) -> None:
        for name in ("shape", "colour", "texture", "background"):
            value = getattr(self, name)
            if value not in ATTRIBUTE_VALUES[name]:
                raise ValueError(f"unknown {name} {value!r}; expected one of {ATTRIBUTE_VALUES[name]}")
        if not isinstance(self.artifact, (bool, np.bool_)):  # "no" would draw a watermark
            raise ValueError(f"artifact must be True or False, got {self.artifact!r}")
        whole_number("size", self.size, MIN_IMAGE_SIZE)
        whole_number("seed", self.seed, 0)


@dataclass
class Scene:
    """A rendered sample: ``image`` (H, W, 3) uint8, boolean masks (H, W)."""

    spec: SceneSpec
    image: np.ndarray
    object_mask: np.ndarray
    artifact_mask: np.ndarray
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def caption(self) -> str:
        return caption_for(self.spec)


def caption_for(spec: SceneSpec) -> str:
    """Natural-language ground truth, e.g. ``"a red striped triangle on water"``."""
    texture = "" if spec.texture == "plain" else TEXTURE_WORDS[spec.texture] + " "
    text = f"a {spec.colour} {texture}{spec.shape} on {spec.background}"
    return text + (" with a watermark" if spec.artifact else "")


def render(spec: SceneSpec) -> Scene:
    """Draw one scene; deterministic in ``spec``."""
    rng = np.random.default_rng([spec.seed, 0x5EED])
    size = spec.size
    image = _background(spec.background, size, rng)

    # Pose: centre, radius (pixels) and rotation of the shape.
    cx, cy = rng.uniform(0.32, 0.68, size=2) * size
    radius = rng.uniform(0.20, 0.30) * size
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    cos, sin = np.cos(angle), np.sin(angle)
    u = ((xs - cx) * cos + (ys - cy) * sin) / radius
    v = (-(xs - cx) * sin + (ys - cy) * cos) / radius
    object_mask = _shape_mask(spec.shape, u, v)

    colour = np.array(COLOURS[spec.colour], dtype=np.float64)
    colour = np.clip(colour * rng.uniform(0.9, 1.1), 0, 255)
    pattern = _texture_mask(spec.texture, u, v)
    shade = np.where(pattern[..., None], colour * 0.45, colour)
    image[object_mask] = shade[object_mask]

    artifact_mask = np.zeros((size, size), dtype=bool)
    if spec.artifact:
        artifact_mask = _watermark_mask(size, rng)
        image[artifact_mask] = (255.0, 255.0, 255.0)
        # A watermark always wins over the object where they overlap.
        object_mask &= ~artifact_mask

    return Scene(
        spec=spec,
        image=np.clip(image, 0, 255).astype(np.uint8),
        object_mask=object_mask,
        artifact_mask=artifact_mask,
        attributes=scene_attributes(spec),
    )


def scene_attributes(spec: SceneSpec) -> dict[str, str]:
    """The ground-truth attributes of a scene, known from its spec before it is drawn."""
    return {
        "shape": spec.shape,
        "colour": spec.colour,
        "texture": spec.texture,
        "background": spec.background,
        "artifact": "watermark" if spec.artifact else "none",
    }


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of shape-local coordinates (unit radius) in ``shape``."""
    if shape == "circle":
        return u**2 + v**2 <= 0.85**2
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.72
    if shape == "triangle":
        # Equilateral triangle inscribed in the unit circle, apex up.
        half_planes = [(0.0, 1.0), (np.sqrt(3) / 2, -0.5), (-np.sqrt(3) / 2, -0.5)]
        inside = np.ones_like(u, dtype=bool)
        for nx, ny in half_planes:
            inside &= (u * nx - v * ny) <= 0.5
        return inside
    if shape == "star":
        theta = np.arctan2(v, u)
        r = np.hypot(u, v)
        # Five points: radius goes linearly from outer (1.0) to inner (0.42) and back.
        phase = np.abs(((theta / (2 * np.pi / 5)) % 1.0) - 0.5) * 2.0
        return r <= 0.42 + 0.58 * phase
    if shape == "cross":
        arm, half = 0.28, 0.9
        return ((np.abs(u) <= arm) & (np.abs(v) <= half)) | ((np.abs(v) <= arm) & (np.abs(u) <= half))
    if shape == "heart":
        x, y = u * 1.25, -v * 1.25 + 0.15
        return (x**2 + y**2 - 1.0) ** 3 - x**2 * y**3 <= 0.0
    raise ValueError(f"unknown shape {shape!r}")


def _texture_mask(texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pixels of the shape painted in the darker texture shade."""
    period = 0.42
    if texture == "plain":
        return np.zeros_like(u, dtype=bool)
    if texture == "stripes":
        return np.floor((u + v) / period) % 2 == 0
    if texture == "dots":
        du = (u / period) % 1.0 - 0.5
        dv = (v / period) % 1.0 - 0.5
        return du**2 + dv**2 <= 0.28**2
    if texture == "checker":
        return (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    raise ValueError(f"unknown texture {texture!r}")


def _watermark_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """A small ring with a bar through it, in the bottom-right corner."""
    radius = max(2.5, size * 0.07)
    margin = radius + 1.5 + rng.uniform(0.0, size * 0.03)
    cx, cy = size - margin, size - margin
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    r = np.hypot(xs - cx, ys - cy)
    ring = (r <= radius) & (r >= radius - max(1.0, size / 48))
    bar = (np.abs(ys - cy) <= max(0.5, size / 96)) & (np.abs(xs - cx) <= radius)
    return ring | bar


def _background(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A noisy, recognisable pattern (H, W, 3) float64 in [0, 255]."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) / size
    grain = rng.normal(0.0, 1.0, size=(size, size))
    if name == "grass":
        blades = _smooth_noise(rng, size, cells=(size // 16, size // 2))
        base = np.array([70, 140, 55]) + np.array([20, 45, 15]) * blades[..., None]
        return base + 8.0 * grain[..., None]
    if name == "water":
        phase = rng.uniform(0, 2 * np.pi)
        waves = np.sin(2 * np.pi * (ys * 7.0 + 0.15 * np.sin(2 * np.pi * xs * 2.0 + phase)))
        base = np.array([35, 95, 175]) + np.array([20, 30, 40]) * waves[..., None]
        return base + 6.0 * grain[..., None]
    if name == "sand":
        dunes = _smooth_noise(rng, size, cells=(4, 4))
        base = np.array([215, 185, 125]) + np.array([15, 15, 10]) * dunes[..., None]
        return base + 14.0 * grain[..., None]
    if name == "snow":
        base = np.full((size, size, 3), (232.0, 236.0, 244.0))
        flakes = rng.random((size, size)) < 0.06
        base[flakes] = (170.0, 180.0, 205.0)
        return base + 4.0 * grain[..., None]
    if name == "brick":
        rows = max(4, size // 8)
        row = np.floor(ys * rows)
        offset = (row % 2) * 0.5
        col = (xs * rows / 2 + offset) % 1.0
        mortar = ((ys * rows) % 1.0 < 0.18) | (col < 0.09)
        base = np.where(mortar[..., None], np.array([205, 200, 190]), np.array([160, 65, 45]))
        return base + 10.0 * grain[..., None]
    raise ValueError(f"unknown background {name!r}")


def _smooth_noise(rng: np.random.Generator, size: int, cells: tuple[int, int]) -> np.ndarray:
    """Value noise in [-1, 1]: a coarse (rows, cols) grid bilinearly upsampled to (size, size)."""
    rows, cols = max(2, cells[0]), max(2, cells[1])
    grid = rng.uniform(-1.0, 1.0, size=(rows + 1, cols + 1))
    y = np.linspace(0, rows, size, endpoint=False)
    x = np.linspace(0, cols, size, endpoint=False)
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy
