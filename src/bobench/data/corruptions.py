"""Seeded image corruptions for small embedded OOD sets (``patches13-blur`` and friends).

In the spirit of ImageNet-C (Hendrycks & Dietterich 2019): each kind is one common corruption at one
fixed severity, applied to every image. This is not ImageNet-C's code and its numbers are not
comparable: the parameters below are chosen for 64 px crops, and the colour shift is not an ImageNet-C
corruption at all.

========  =================================================================================
kind      what it does
========  =================================================================================
blur      Gaussian blur, sigma :data:`BLUR_SIGMA` px, mirrored edges (separable, exact kernel)
noise     additive Gaussian noise, std :data:`NOISE_STD` of the 0..255 range, clipped; image
          ``i`` draws from a generator seeded ``(seed, i)``, so it is reproducible per index
color     hue rotation by :data:`HUE_DEGREES` degrees in YIQ space (luma kept), deterministic
jpeg      JPEG round trip at quality :data:`JPEG_QUALITY` (Pillow, 4:2:0 chroma subsampling)
========  =================================================================================

Only numpy is imported at the top; Pillow is imported by the JPEG corruption alone. The JPEG bytes
depend on the libjpeg build Pillow ships, so ``jpeg`` pixels may change across Pillow releases.
"""

from __future__ import annotations

import io

import numpy as np

KINDS: tuple[str, ...] = ("blur", "noise", "color", "jpeg")
BLUR_SIGMA = 1.5  # px; at 64 px this removes most detail finer than ~4 px
NOISE_STD = 0.12  # fraction of the 0..255 range (ImageNet-C's gaussian_noise severity 2)
HUE_DEGREES = 60.0
JPEG_QUALITY = 10  # ImageNet-C's jpeg_compression severity 4

# RGB -> YIQ (NTSC): Y is luma; I and Q span chroma, so rotating (I, Q) turns the hue and keeps Y.
_RGB_TO_YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float64
)


def apply(kind: str, images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Corrupt a batch of images.

    Args:
        kind: one of :data:`KINDS`.
        images: ``[N, H, W, 3]`` uint8 RGB; not modified.
        seed: seeds the random corruptions (``noise``); the others are deterministic and ignore it.

    Returns:
        A new ``[N, H, W, 3]`` uint8 array.

    Raises:
        ValueError: an unknown ``kind`` or images of the wrong shape or dtype.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected [N, H, W, 3] uint8 images, got {images.shape} {images.dtype}")
    if kind == "blur":
        return gaussian_blur(images, BLUR_SIGMA)
    if kind == "noise":
        return gaussian_noise(images, NOISE_STD, seed)
    if kind == "color":
        return hue_rotate(images, HUE_DEGREES)
    if kind == "jpeg":
        return jpeg(images, JPEG_QUALITY)
    raise ValueError(f"unknown corruption {kind!r}; use one of {', '.join(KINDS)}")


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Blur each image with a Gaussian of std ``sigma`` px, truncated at 3 sigma, mirrored edges."""
    radius = max(1, int(np.ceil(3 * sigma)))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    out = images.astype(np.float32)
    for axis in (1, 2):  # separable: rows, then columns
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        length = out.shape[axis]
        out = np.zeros_like(out)
        for j, w in enumerate(kernel):
            window = [slice(None)] * 4
            window[axis] = slice(j, j + length)
            out += np.float32(w) * padded[tuple(window)]
    return _to_uint8(out)


def gaussian_noise(images: np.ndarray, std: float, seed: int) -> np.ndarray:
    """Add N(0, ``std`` * 255) noise per pixel and channel; image ``i`` uses generator ``(seed, i)``.

    Seeding per index (not one stream for the batch) makes an image's noise independent of which other
    images are corrupted with it.
    """
    out = np.empty_like(images)
    for i, image in enumerate(images):
        noise = np.random.default_rng([seed, i]).normal(0.0, std * 255.0, size=image.shape)
        out[i] = _to_uint8(image + noise)
    return out


def hue_rotate(images: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate every pixel's hue by ``degrees`` in YIQ space (luma unchanged up to clipping)."""
    t = np.deg2rad(degrees)
    rotate = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    matrix = np.linalg.inv(_RGB_TO_YIQ) @ rotate @ _RGB_TO_YIQ
    return _to_uint8(images.astype(np.float32) @ matrix.T.astype(np.float32))


def jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    """Encode each image as JPEG at ``quality`` with Pillow and decode it again."""
    from PIL import Image

    out = np.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            out[i] = np.asarray(decoded.convert("RGB"))
    return out
