"""Image features the server records for every request and monitoring compares to a reference."""

from __future__ import annotations

import numpy as np
from PIL import Image

FEATURES = ("width", "height", "aspect_ratio", "brightness", "contrast", "saturation", "sharpness")
THUMBNAIL = 64  # px: the side the features are computed at


def image_features(image: Image.Image, size: tuple[int, int] | None = None) -> dict[str, float]:
    """Size (`size`: the original's, when `image` was shrunk), brightness, contrast, saturation
    and sharpness, on a 64 px thumbnail for speed."""
    width, height = size or image.size
    small = image.convert("RGB")
    small.thumbnail((THUMBNAIL, THUMBNAIL))
    rgb = np.asarray(small, dtype=np.float32) / 255.0
    gray = rgb @ np.asarray([0.299, 0.587, 0.114], np.float32)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    spread = np.maximum(np.maximum(red, green), blue) - np.minimum(np.minimum(red, green), blue)  # faster than axis=2
    laplacian = (
        gray[1:-1, :-2] + gray[1:-1, 2:] + gray[:-2, 1:-1] + gray[2:, 1:-1] - 4 * gray[1:-1, 1:-1]
        if min(gray.shape) >= 3
        else np.zeros(1, np.float32)
    )
    return {
        "width": float(width),
        "height": float(height),
        "aspect_ratio": float(width / height),
        "brightness": float(gray.mean()),
        "contrast": float(gray.std()),
        "saturation": float(spread.mean()),
        "sharpness": float(np.abs(laplacian).mean()),
    }
