"""Images -> `pixel_values` / `image_grid_thw` exactly as HF `Qwen2VLImageProcessorPil`, but faster.

HF's PIL path converts to RGB, resizes with PIL bicubic on uint8, then rescales in float64, normalises in
float32 and patchifies in numpy, with several full-image copies in between. We keep the one step that
decides the pixels (PIL's uint8 bicubic resize: a float torch resize differs from it by up to a few grey
levels) and do the rest in torch on uint8 first: patch reordering moves 1 byte per value instead of 4 or 8,
and normalisation is a 256-entry lookup table per channel computed with HF's own float64 -> float32 steps,
so the result is bitwise equal to HF's (tests/test_vision.py), not merely close.

Media decoding lives here too: bytes from a shard are decoded by PIL only, pickle-style members are refused.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from data.errors import BadSample

MAX_RATIO = 200
# extensions whose readers can execute code (pickle) or that we never decode as media
PICKLE_EXTS = frozenset({".pyd", ".pickle", ".pkl", ".pth", ".pt", ".ckpt", ".joblib", ".dill", ".npz"})
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"})


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int,
                 rule: Literal["hf", "qwen_vl_utils"] = "hf") -> tuple[int, int]:
    """(h, w), multiples of `factor`, area in [min_pixels, max_pixels], aspect ratio kept as well as possible.

    The two references differ only at the edges: transformers rounds first and floors to at least one factor
    when shrinking ("hf"); qwen-vl-utils 0.0.14 clamps the rounded size to one factor first and does not clamp
    after shrinking ("qwen_vl_utils", used for video frames as its fetch_video does).
    """
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_RATIO}, "
                         f"got {max(height, width) / min(height, width)}")
    if rule == "qwen_vl_utils":
        assert max_pixels >= min_pixels, "The max_pixels of image must be greater than or equal to min_pixels."
        h_bar = max(factor, round(height / factor) * factor)
        w_bar = max(factor, round(width / factor) * factor)
    else:
        h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
        if rule == "hf":
            h_bar, w_bar = max(factor, h_bar), max(factor, w_bar)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ---------------------------------------------------------------- decoding


def _ext(name: str) -> str:
    return PurePosixPath(name).suffix.lower()


def refuse_pickle(name: str, key: str) -> None:
    """Raise BadSample("pickle_member") for members whose format can carry pickled objects."""
    if _ext(name) in PICKLE_EXTS:
        raise BadSample("pickle_member", key, f"media {name!r} has a pickle-capable extension; never decoded")


def load_npy(data: bytes, name: str, key: str) -> np.ndarray:
    """A .npy member as a plain array; object arrays (which need pickle) are refused."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:  # numpy's message for object arrays when allow_pickle=False
        if "pickle" in str(e):
            raise BadSample("pickle_member", key, f"{name!r} is an object array (needs pickle)") from None
        raise BadSample("undecodable_image", key, f"{name!r}: {e}") from None
    except Exception as e:
        raise BadSample("undecodable_image", key, f"{name!r}: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB as transformers' convert_to_rgb does: transparency is composited onto white."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(data, name: str, key: str) -> Image.Image:
    """Bytes (or an in-memory PIL image / uint8 HxWxC array) -> RGB PIL image; bad input -> BadSample."""
    refuse_pickle(name, key)
    if isinstance(data, Image.Image):
        return to_rgb(data)
    if isinstance(data, np.ndarray):
        return to_rgb(Image.fromarray(data))
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadSample("undecodable_image", key, f"media {name!r} is a {type(data).__name__}, not bytes")
    if _ext(name) == ".npy":
        arr = load_npy(bytes(data), name, key)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            raise BadSample("undecodable_image", key, f"{name!r}: need uint8 HxW[xC], got {arr.dtype} {arr.shape}")
        return to_rgb(Image.fromarray(arr))
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return to_rgb(img)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise BadSample("undecodable_image", key, f"{name!r}: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------- processing


@dataclass
class VisionConfig:
    """What the HF image processor of a family is configured with (read from it by `from_hf`)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711)
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    rescale_factor: float = 1 / 255
    # "pil": PIL bicubic on uint8, bitwise equal to HF. "torch": torch's antialiased bicubic on uint8, ~3x faster
    # to resize; on the bench mix 3% of values differ, mean 0.03 grey levels, worst ~6 levels (bench.py).
    resize: Literal["pil", "torch"] = "pil"

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_hf(cls, ip, min_pixels: Optional[int] = None, max_pixels: Optional[int] = None,
                resize: str = "pil") -> "VisionConfig":
        """The settings of an HF Qwen2VLImageProcessor(Pil); min/max pixels may be overridden."""
        if resize not in ("pil", "torch"):
            raise ValueError(f"resize={resize!r}: choose 'pil' (bitwise HF parity) or 'torch' (faster, not bitwise)")
        return cls(resize=resize, patch_size=ip.patch_size, temporal_patch_size=ip.temporal_patch_size, merge_size=ip.merge_size,
                   image_mean=tuple(ip.image_mean), image_std=tuple(ip.image_std),
                   min_pixels=min_pixels or ip.size["shortest_edge"], max_pixels=max_pixels or ip.size["longest_edge"],
                   rescale_factor=ip.rescale_factor)


def normalise_lut(cfg: VisionConfig) -> torch.Tensor:
    """[3, 256] float32: HF's value for every uint8 level, by HF's own arithmetic.

    HF rescales in float64 (`x.astype(float64) * scale`), casts to float32, then computes
    `(x - mean) / std` in float32. A value depends only on its level, so 256 entries per channel say it all.
    """
    levels = (np.arange(256, dtype=np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None]
    std = np.asarray(cfg.image_std, dtype=np.float32)[:, None]
    return torch.from_numpy(((levels[None, :] - mean) / std).astype(np.float32))


class Normaliser:
    """uint8 -> HF's float32 values, in place on a float buffer.

    Three float32 ops (`/ (1/scale)`, `- mean`, `/ std`) are much faster than a gather; they are used only after
    checking that they give the lookup table's value for every level (true for the Qwen families' settings).
    Since each output depends on its level alone, agreeing on all 256 levels means agreeing everywhere.
    """

    def __init__(self, cfg: VisionConfig):
        self.lut = normalise_lut(cfg)
        C = self.lut.shape[0]
        self.mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(1, C, 1)
        self.std = torch.tensor(cfg.image_std, dtype=torch.float32).view(1, C, 1)
        self.divisor = round(1 / cfg.rescale_factor)
        # odd length so both the vectorised body and the scalar tail of each kernel are checked
        probe = torch.arange(256, dtype=torch.uint8).repeat(5)[:1277].view(1, 1, -1).expand(1, C, -1).float()
        got = self._arith_(probe.clone())
        want = self.lut[:, torch.arange(256).repeat(5)[:1277]].unsqueeze(0)
        self.exact = self.divisor * cfg.rescale_factor == 1.0 and torch.equal(got, want)

    def _arith_(self, y: torch.Tensor) -> torch.Tensor:
        return y.div_(self.divisor).sub_(self.mean).div_(self.std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: uint8 [N, C, k] -> float32 [N, C, k]."""
        if self.exact:
            return self._arith_(x.float())
        C = x.shape[1]
        return self.lut.reshape(-1)[x.long() + (torch.arange(C) * 256).view(1, C, 1)]


def patchify(frames: torch.Tensor, cfg: VisionConfig, norm: Normaliser) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """uint8 [T, H, W, C] frames -> ([t*h*w, C*Tp*P*P] float32, (t, h, w)), HF's row and column order.

    T must be a multiple of the temporal patch, except T == 1 (a still image), which HF repeats over the temporal
    patch: then the frame is normalised once and copied. Rows are (t, h/m, w/m, m, m), columns (C, Tp, P, P).
    Reordering happens on uint8 (a quarter of the bytes of float32).
    """
    T, H, W, C = frames.shape
    P, m, Tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    assert (T == 1 or T % Tp == 0) and H % (P * m) == 0 and W % (P * m) == 0, (frames.shape, P, m, Tp)
    gt, gh, gw = max(T // Tp, 1), H // P, W // P
    n = gt * gh * gw
    if T == 1:
        x = frames[0].view(gh // m, m, P, gw // m, m, P, C).permute(0, 3, 1, 4, 6, 2, 5)  # (h, w, mh, mw, C, ph, pw)
        y = norm(x.contiguous().view(n, C, P * P))
        out = y.unsqueeze(2).expand(n, C, Tp, P * P)
    else:
        x = frames.view(gt, Tp, gh // m, m, P, gw // m, m, P, C).permute(0, 2, 5, 3, 6, 8, 1, 4, 7)
        out = norm(x.contiguous().view(n, C, Tp * P * P))
    return out.reshape(n, C * Tp * P * P), (gt, gh, gw)


class ImageProcessor:
    """Torch twin of `Qwen2VLImageProcessorPil`: same outputs, several times faster."""

    def __init__(self, cfg: VisionConfig):
        self.cfg = cfg
        self.norm = Normaliser(cfg)

    def frame(self, img: Image.Image) -> torch.Tensor:
        """RGB, resized to the smart_resize size: uint8 [H, W, 3]. The resize is the step that must stay PIL
        for bitwise parity (PIL's fixed-point uint8 bicubic); cfg.resize="torch" trades that for speed."""
        c = self.cfg
        img = to_rgb(img)
        w, h = img.size
        rh, rw = smart_resize(h, w, c.factor, c.min_pixels, c.max_pixels)
        if c.resize == "pil" or (rw, rh) == (w, h):
            return torch.from_numpy(np.array(img if (rw, rh) == (w, h) else img.resize((rw, rh), Image.Resampling.BICUBIC)))
        return resize_frames(torch.from_numpy(np.array(img)).unsqueeze(0), rh, rw)[0]

    def one(self, img: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """One image -> (pixel rows, grid). A still image is one frame repeated over the temporal patch."""
        return patchify(self.frame(img).unsqueeze(0), self.cfg, self.norm)

    def __call__(self, images: Sequence[Image.Image]) -> dict:
        """Same keys and values as `Qwen2VLImageProcessorPil(images, return_tensors="pt")`."""
        rows, grids = zip(*(self.one(im) for im in images))
        return {"pixel_values": torch.cat(rows) if len(rows) > 1 else rows[0],
                "image_grid_thw": torch.tensor(grids, dtype=torch.long)}


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [T, H, W, C] -> uint8 [T, height, width, C], antialiased bicubic: what torchvision's tensor resize
    (used by qwen-vl-utils for video) computes."""
    x = frames.permute(0, 3, 1, 2)
    y = torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return y.permute(0, 2, 3, 1).contiguous()
