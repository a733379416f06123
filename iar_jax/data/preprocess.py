"""Image preprocessing for code extraction, as LlamaGen / IAR (`dataset/augmentation.py`, ADM).

* `center_crop_arr`: ADM's rule: halve with a box filter while the short side is >= 2x the target,
  then bicubic-resize the short side to the target (sizes rounded), then center-crop (offsets
  floored).
* `ten_crop`: torchvision's `TenCrop(size)` order: crops of the image at top-left, top-right,
  bottom-left, bottom-right, centre (offset round((H - size) / 2), Python rounding), then the same
  five crops of the horizontally flipped image.
* `augmented_views`: what `extract_codes` encodes per image: center-crop-arr to
  int(size * crop_range) (1.1 in IAR) and ten-crop, or with `ten_crop=False` the image at `size`
  and its flip (the reference's 2 views).
* Small images (both sides <= the crop size, e.g. Fashion-MNIST 28 px for a 32 px tokenizer) are
  padded with black, centred (extra pixel at the bottom/right), rather than upsampled by
  default (`small="pad"`, the rule the tokenizer's training data uses); `small="resize"` applies
  ADM's rule to them as well.
* `to_model_range`: uint8 -> float32 in [-1, 1] (ToTensor then Normalize(0.5, 0.5)).
Images are HWC uint8 with 3 channels: grayscale is repeated, alpha dropped (PIL `convert("RGB")`).
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def to_rgb_array(image) -> np.ndarray:
    """PIL image or array (HW, HW1, HW3, HW4) -> uint8 HW3."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    x = np.asarray(image)
    if x.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (0..255); got dtype {x.dtype}. Convert with np.uint8 first")
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image must be HxW, HxWx1, HxWx3 or HxWx4; got shape {x.shape}")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return np.ascontiguousarray(x[..., :3])


def center_crop_arr(image, image_size: int) -> np.ndarray:
    """ADM / LlamaGen center crop of a PIL image (or uint8 array) -> uint8 [image_size, image_size, 3]."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(to_rgb_array(image))
    pil = pil.convert("RGB")
    while min(*pil.size) >= 2 * image_size:
        pil = pil.resize(tuple(s // 2 for s in pil.size), resample=Image.BOX)
    scale = image_size / min(*pil.size)
    pil = pil.resize(tuple(round(s * scale) for s in pil.size), resample=Image.BICUBIC)
    arr = np.asarray(pil)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return np.ascontiguousarray(arr[top:top + image_size, left:left + image_size])


def pad_to(arr: np.ndarray, size: int) -> np.ndarray:
    """Centre an image no larger than size x size on a black square."""
    h, w = arr.shape[:2]
    if h > size or w > size:
        raise ValueError(f"image {h}x{w} is larger than {size}x{size}; it cannot be padded, crop or resize it")
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((size, size) + arr.shape[2:], arr.dtype)
    out[top:top + h, left:left + w] = arr
    return out


def five_crop_offsets(height: int, width: int, size: int):
    """(top, left) of torchvision's five crops: tl, tr, bl, br, centre."""
    if size > height or size > width:
        raise ValueError(f"crop size {size} is larger than the image {height}x{width}")
    center = (int(round((height - size) / 2.0)), int(round((width - size) / 2.0)))
    return [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size), center]


def ten_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, C] -> [10, size, size, C]: five crops, then five crops of the flipped image."""
    views = []
    for img in (arr, arr[:, ::-1]):
        for top, left in five_crop_offsets(arr.shape[0], arr.shape[1], size):
            views.append(img[top:top + size, left:left + size])
    return np.stack(views)


def augmented_views(image, image_size: int, crop_range: float = 1.1, ten_crop_views: bool = True,
                    small: str = "pad") -> np.ndarray:
    """uint8 [A, image_size, image_size, 3] views of one image (A = 10, or 2 without ten-crop)."""
    if small not in ("pad", "resize"):
        raise ValueError(f"small={small!r} is not a rule; use 'pad' or 'resize'")
    crop = int(image_size * crop_range) if ten_crop_views else image_size
    if crop < image_size:
        raise ValueError(f"crop_range {crop_range} makes the crop smaller than image_size; use crop_range >= 1")
    if isinstance(image, Image.Image):
        w, h = image.size
    else:
        h, w = np.shape(image)[:2]
    if small == "pad" and h <= crop and w <= crop:
        base = pad_to(to_rgb_array(image), crop)
    else:
        base = center_crop_arr(image, crop)
    if ten_crop_views:
        return ten_crop(base, image_size)
    return np.stack([base, base[:, ::-1]])


def to_model_range(images_uint8) -> np.ndarray:
    """uint8 -> float32 in [-1, 1]."""
    return np.asarray(images_uint8, np.float32) / 127.5 - 1.0
