"""Images -> `pixel_values` / `image_grid_thw` bitwise equal to one of HF's two Qwen2-VL image-processor backends,
but faster.

HF's PIL backend (`Qwen2VLImageProcessorPil`) converts to RGB, resizes with PIL bicubic on uint8, rescales in
float64, normalises in float32 and patchifies in numpy; its torchvision backend (`Qwen2VLImageProcessor`, HF's
default with torchvision) resizes with torch's uint8 antialiased bicubic and normalises with fused float32
arithmetic. `VisionConfig.resize` picks which one to equal. We keep the resize that decides the pixels (PIL's or
torch's, the two differ by 1-2 grey levels) and do the rest in torch: patches are reordered as packed 4-byte
pixels (Pillow stores RGB as RGBX, read in place through its Arrow export), channels are split with integer
masks, and normalisation uses the backend's own float steps, checked level by level against a lookup table, so
the result is bitwise equal (tests/test_vision.py), not merely close.

Threads (`VisionConfig.threads`): Pillow's resize is two separable passes (horizontal, vertical) that release
the GIL. Each pass is split into strips along the axis it does not resample (coefficients depend only on the
full sizes, so every strip gets exactly the one-shot result), run in the order Pillow itself uses (probed once at
import: newer Pillow runs the vertical pass first when the height shrinks much more than the width), and the
strips of the last pass are patchified by the thread that made them. torch's resize is split the same way (its
one-shot result is a horizontal pass then a vertical one). HF's paths are single-threaded.

Media decoding lives here too: bytes from a shard are decoded by PIL only, pickle-style members are refused.
"""
from __future__ import annotations

import ctypes
import io
import itertools
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Callable, Literal, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from data.errors import BadSample, is_pickle_name

MAX_RATIO = 200
# pickle-capable extensions (never decoded) are data.errors.PICKLE_EXTENSIONS
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
    if is_pickle_name(name):
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


def default_threads() -> int:
    """min(2, the CPUs this process may use, shared among the DataLoader workers when it is one of them)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    info = torch.utils.data.get_worker_info()
    if info is not None:
        cpus //= max(1, info.num_workers)
    return max(1, min(2, cpus))


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
    # Which of HF's two image-processor backends to equal bitwise (resize and normalisation arithmetic):
    # "torch": torch's antialiased bicubic on uint8, then fused float32 normalisation = `Qwen2VLImageProcessor`
    #   with torchvision installed (HF's default backend; HF's video processors work this way too). ~4x faster
    #   to resize than PIL.
    # "pil": PIL's fixed-point bicubic, float64 rescale = `Qwen2VLImageProcessorPil` (HF's backend without
    #   torchvision) and qwen-vl-utils' PIL resize. The two differ by 1-2 grey levels on ~0.5% of pixels.
    resize: Literal["pil", "torch"] = "pil"
    # Threads per image processor, the calling thread included: Pillow's resize passes (split into strips) and the
    # patchify of each strip run on them; outputs are bitwise the same for any count. Every DataLoader worker
    # process has its own, so keep loader workers x threads <= CPU cores: past that, threads only add hand-off
    # overhead (with as many workers as cores, threads=1 is best). The default, default_threads(), is
    # min(2, CPUs / loader workers) in the process that builds the config (a loader worker builds its own).
    # torch ops called from these threads also use torch's intra-op threads (1 in DataLoader workers).
    threads: int = field(default_factory=default_threads)

    def __post_init__(self):
        if self.threads < 1:
            raise ValueError(f"threads={self.threads}: need at least 1")

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_hf(cls, ip, min_pixels: Optional[int] = None, max_pixels: Optional[int] = None,
                resize: str = "pil", threads: Optional[int] = None) -> "VisionConfig":
        """The settings of an HF Qwen2VLImageProcessor(Pil); min/max pixels may be overridden."""
        if resize not in ("pil", "torch"):
            raise ValueError(f"resize={resize!r}: choose 'torch' (HF's torchvision backend, faster) or 'pil' "
                             "(HF's PIL backend)")
        return cls(resize=resize, patch_size=ip.patch_size, temporal_patch_size=ip.temporal_patch_size, merge_size=ip.merge_size,
                   image_mean=tuple(ip.image_mean), image_std=tuple(ip.image_std),
                   min_pixels=min_pixels or ip.size["shortest_edge"], max_pixels=max_pixels or ip.size["longest_edge"],
                   rescale_factor=ip.rescale_factor, threads=threads or default_threads())


def normalise_lut(cfg: VisionConfig) -> torch.Tensor:
    """[3, 256] float32: HF's value for every uint8 level, by the arithmetic of the HF backend `cfg.resize` names.

    PIL backend (`Qwen2VLImageProcessorPil`): rescale in float64 (`x.astype(float64) * scale`), cast to float32,
    then `(x - mean) / std` in float32. Torchvision backend (`Qwen2VLImageProcessor` with torchvision installed,
    and every HF video processor): rescale fused into normalisation, `(float32(x) - mean/scale) / (std/scale)` in
    float32, with mean/scale and std/scale computed in float32. The two differ by an ulp on some levels. A value
    depends only on its level, so 256 entries per channel say it all.
    """
    if cfg.resize == "torch":
        mean, std = _fused_mean_std(cfg)
        return (torch.arange(256, dtype=torch.float32)[None, :] - mean[:, None]) / std[:, None]
    levels = (np.arange(256, dtype=np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None]
    std = np.asarray(cfg.image_std, dtype=np.float32)[:, None]
    return torch.from_numpy(((levels[None, :] - mean) / std).astype(np.float32))


def _fused_mean_std(cfg: VisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """HF TorchvisionBackend._fuse_mean_std_and_rescale_factor: float32 tensors times 1/scale."""
    return (torch.tensor(list(cfg.image_mean)) * (1.0 / cfg.rescale_factor),
            torch.tensor(list(cfg.image_std)) * (1.0 / cfg.rescale_factor))


class Normaliser:
    """uint8 levels -> HF's float32 values.

    Float32 ops (PIL backend: `/ (1/scale)`, `- mean`, `/ std`; torchvision backend: `- mean/scale`,
    `/ std/scale`) are much faster than a gather; they are used only after checking that they give the lookup
    table's value for every level (true for the Qwen families' settings).
    Since each output depends on its level alone, agreeing on all 256 levels means agreeing everywhere. Packed
    pixels (int32 RGBX, little-endian) take channel c as `v & (255 << 8c)` divided by `divisor << 8c`: the same
    quotient, both operands exact in float32; checked the same way (`packed_exact`), else the table is used.
    """

    def __init__(self, cfg: VisionConfig):
        self.lut = normalise_lut(cfg)
        C = self.lut.shape[0]
        if cfg.resize == "torch":  # levels as they are, scaled mean and std
            mean, std = _fused_mean_std(cfg)
            self.divisor = 1
        else:
            mean, std = torch.tensor(cfg.image_mean, dtype=torch.float32), torch.tensor(cfg.image_std, dtype=torch.float32)
            self.divisor = round(1 / cfg.rescale_factor)
        self.mean, self.std = mean.view(1, C, 1), std.view(1, C, 1)
        # odd length so both the vectorised body and the scalar tail of each kernel are checked
        idx = torch.arange(256).repeat(5)[:1277]
        probe = idx.to(torch.uint8).view(1, 1, -1).expand(1, C, -1).float()
        got = self._arith_(probe.clone())
        want = self.lut[:, idx].unsqueeze(0)
        self.exact = (self.divisor == 1 or self.divisor * cfg.rescale_factor == 1.0) and torch.equal(got, want)
        # packed path: channel c's level in byte c, the other bytes random (byte 3 is Pillow's pad byte)
        self.shifts = torch.tensor([8 * c for c in range(C)], dtype=torch.int32).view(1, C, 1)
        self.masks = torch.tensor([255 << (8 * c) for c in range(C)], dtype=torch.int32).view(1, C, 1)
        self.fdivs = torch.tensor([float(self.divisor << (8 * c)) for c in range(C)], dtype=torch.float32).view(C, 1)
        self.packed_exact = False
        if C <= 3 and sys.byteorder == "little" and self.exact and self.divisor << (8 * (C - 1)) < 2 ** 24:
            rng = np.random.default_rng(0)
            ok = True
            for c in range(C):
                b = rng.integers(0, 256, (1277, 4), dtype=np.uint8)
                b[:, c] = idx.numpy()
                v = torch.from_numpy(b.view(np.int32).reshape(1, 1, -1).copy())
                dst = torch.empty(1, C, 2, 1277)
                self.packed_(v, dst, exact=True)
                ok &= torch.equal(dst[:, c], self.lut[c, idx].expand(1, 2, -1))
            self.packed_exact = bool(ok)

    def _arith_(self, y: torch.Tensor) -> torch.Tensor:
        if self.divisor != 1:
            y.div_(self.divisor)
        return y.sub_(self.mean).div_(self.std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: uint8 [N, C, k] -> float32 [N, C, k]."""
        if self.exact:
            return self._arith_(x.float())
        C = x.shape[1]
        return self.lut.reshape(-1)[x.long() + (torch.arange(C) * 256).view(1, C, 1)]

    def packed_(self, v: torch.Tensor, dst: torch.Tensor, exact: Optional[bool] = None) -> None:
        """v: int32 [..., 1, k] packed pixels -> dst float32 [..., C, Tp, k] (any strides): every temporal slot
        gets the normalised channel planes, written once by the last op."""
        C = dst.shape[-3]
        if self.packed_exact if exact is None else exact:
            # int32 -> float32 first: mixed-dtype ops take torch's slow casting loops
            y = torch.bitwise_and(v, self.masks.view(C, 1)).float().div_(self.fdivs).sub_(self.mean.view(C, 1))
            torch.div(y.unsqueeze(-2).expand(dst.shape), self.std.view(C, 1, 1), out=dst)
        else:
            levels = torch.bitwise_and(torch.bitwise_right_shift(v, self.shifts.view(C, 1)), 255).long()
            y = self.lut.reshape(-1)[levels + (torch.arange(C) * 256).view(C, 1)]
            dst.copy_(y.unsqueeze(-2).expand(dst.shape))


def patchify(frames: torch.Tensor, cfg: VisionConfig, norm: Normaliser) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """uint8 [T, H, W, C] frames -> ([t*h*w, C*Tp*P*P] float32, (t, h, w)), HF's row and column order.

    T must be a multiple of the temporal patch, except T == 1 (a still image), which HF repeats over the temporal
    patch: then the frame is normalised once and written to every temporal slot. Rows are (t, h/m, w/m, m, m),
    columns (C, Tp, P, P). Reordering happens on uint8 (a quarter of the bytes of float32). A still frame may
    also be RGBX (C == 4, the 4th byte ignored), the layout `pil_pixels` reads PIL images in.
    """
    T, H, W, C = frames.shape
    P, m, Tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    assert (T == 1 or T % Tp == 0) and H % (P * m) == 0 and W % (P * m) == 0, (frames.shape, P, m, Tp)
    gt, gh, gw = max(T // Tp, 1), H // P, W // P
    n = gt * gh * gw
    if T == 1:
        C = norm.lut.shape[0]
        out = torch.empty(n, C * Tp * P * P)
        patch_block(frames[0], out.view(gh // m, gw // m, m * m, -1), cfg, norm)
        return out, (gt, gh, gw)
    x = frames.view(gt, Tp, gh // m, m, P, gw // m, m, P, C).permute(0, 2, 5, 3, 6, 8, 1, 4, 7)
    out = norm(x.contiguous().view(n, C, Tp * P * P))
    return out.reshape(n, C * Tp * P * P), (gt, gh, gw)


# patch rows normalised per step of patch_block: its temporaries then stay in a core's cache
CHUNK_ROWS = 512


def patch_block(frame: torch.Tensor, dst: torch.Tensor, cfg: VisionConfig, norm: Normaliser) -> None:
    """One still frame (or a band of whole merge blocks of it), uint8 [Hs, Ws, 3 or 4] with any row stride, into
    dst float32 [Hs/(P*m), Ws/(P*m), m*m, C*Tp*P*P] (a view into the output rows, any outer strides).

    RGBX frames move 4-byte pixels as int32 (contiguous runs of P on both sides), then `Normaliser.packed_`
    splits channels with integer masks and writes both temporal slots; RGB frames reorder bytes and normalise.
    Works through bands of merge-block rows of about CHUNK_ROWS patch rows.
    """
    Hs, Ws, Cs = frame.shape
    P, m = cfg.patch_size, cfg.merge_size
    f = P * m
    A, B = Hs // f, Ws // f
    C = norm.lut.shape[0]
    d = dst.unflatten(-1, (C, -1, P * P))  # [A, B, m*m, C, Tp, P*P]
    packed = Cs == 4 and frame.stride(2) == 1 and frame.stride(1) == 4 and frame.stride(0) % 4 == 0 and \
        frame.storage_offset() % 4 == 0 and sys.byteorder == "little"
    px = frame.view(torch.int32)[..., 0] if packed else frame[..., :C]  # [Hs, Ws] int32 or [Hs, Ws, C] uint8
    step = max(1, CHUNK_ROWS // (B * m * m))
    for a0 in range(0, A, step):
        k = min(step, A - a0)
        band = px[a0 * f:(a0 + k) * f].unflatten(1, (B, m, P)).unflatten(0, (k, m, P))
        if packed:
            x = torch.empty(k, B, m, m, P, P, dtype=torch.int32)
            x.copy_(band.permute(0, 3, 1, 4, 2, 5))
            norm.packed_(x.view(k, B, m * m, 1, P * P), d[a0:a0 + k])
        else:
            y = norm(band.permute(0, 3, 1, 4, 6, 2, 5).contiguous().view(-1, C, P * P))
            d[a0:a0 + k].copy_(y.view(k, B, m * m, C, 1, P * P).expand(d[a0:a0 + k].shape))


# ---------------------------------------------------------------- Pillow internals, read in place


class _ArrowArray(ctypes.Structure):
    """The Arrow C data interface's ArrowArray (a stable ABI)."""


_ArrowArray._fields_ = [("length", ctypes.c_int64), ("null_count", ctypes.c_int64), ("offset", ctypes.c_int64),
                        ("n_buffers", ctypes.c_int64), ("n_children", ctypes.c_int64),
                        ("buffers", ctypes.POINTER(ctypes.c_void_p)),
                        ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))),
                        ("dictionary", ctypes.c_void_p), ("release", ctypes.c_void_p),
                        ("private_data", ctypes.c_void_p)]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _rgbx_view(img: Image.Image) -> Optional[torch.Tensor]:
    """uint8 [H, W, 4] sharing an RGB image's memory (Pillow keeps RGB as RGBX), through Pillow's Arrow export
    (Pillow >= 11.2); None where it is not exported (older Pillow, images stored in several blocks)."""
    if img.mode != "RGB" or not hasattr(img.im, "__arrow_c_array__"):
        return None
    try:
        capsule = img.im.__arrow_c_array__()
    except Exception:  # ValueError: rows not contiguous in memory (multi-block storage)
        return None
    top = _ArrowArray.from_address(_capsule_pointer(capsule, b"arrow_array"))
    w, h = img.size
    if top.n_children != 1 or top.length != w * h or top.offset != 0:
        return None
    child = top.children[0].contents
    if child.n_buffers != 2 or child.length != w * h * 4 or child.offset != 0 or not child.buffers[1]:
        return None
    buf = (ctypes.c_uint8 * (w * h * 4)).from_address(child.buffers[1])
    buf._capsule = capsule  # the capsule holds a reference on the image memory until it is released
    return torch.frombuffer(buf, dtype=torch.uint8).view(h, w, 4)


def _arrow_works() -> bool:
    try:
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8))
        v = _rgbx_view(img)
        return v is not None and np.array_equal(v[..., :3].numpy(), np.asarray(img))
    except Exception:
        return False


ARROW_VIEW = _arrow_works()


def pil_pixels(img: Image.Image) -> torch.Tensor:
    """An RGB image's pixels: uint8 [H, W, 4] RGBX read in place where Pillow exports them, else [H, W, 3]."""
    img.load()
    v = _rgbx_view(img) if ARROW_VIEW else None
    return v if v is not None else torch.from_numpy(np.asarray(img))


BICUBIC = Image.Resampling.BICUBIC

# Which pass Pillow runs first for a (w, h) -> (rw, rh) resize, as rules over the sizes: recent Pillow (13.0's
# Resample.c) runs the vertical pass first when the height shrinks by more than twice what the width does; older
# ones always go horizontal first. Which one this Pillow follows is probed once (`probe_pass_order`), not read off
# a version number.
PASS_ORDER_RULES: dict[str, Callable[[int, int, int, int], bool]] = {
    "vertical_first_if_height_shrinks_most": lambda w, h, rw, rh: not ((h - rh) > 0 and (h - rh) > (w - rw) * 2),
    "always_horizontal_first": lambda w, h, rw, rh: True,
}
# (w, h, rw, rh): cases where the two rules disagree, and cases where they agree
PASS_ORDER_PROBES = [(64, 64, 60, 16), (64, 48, 68, 44), (40, 90, 44, 30), (33, 70, 30, 20),
                     (64, 64, 16, 60), (48, 40, 56, 50), (70, 30, 20, 33), (50, 50, 40, 41)]


def two_pass(img: Image.Image, rw: int, rh: int, horizontal_first: bool) -> Image.Image:
    """The bicubic resize as two single-axis Pillow resizes in the given order."""
    w, h = img.size
    if horizontal_first:
        return img.resize((rw, h), BICUBIC).resize((rw, rh), BICUBIC)
    return img.resize((w, rh), BICUBIC).resize((rw, rh), BICUBIC)


def probe_pass_order() -> Optional[str]:
    """The one rule of PASS_ORDER_RULES that reproduces this Pillow's one-shot resize on every probe (random
    images, on which the two orders give different pixels), or None (no rule, or no probe told them apart): then
    resizes are not split."""
    rng = np.random.default_rng(0)
    alive = dict(PASS_ORDER_RULES)
    for w, h, rw, rh in PASS_ORDER_PROBES:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        want = np.asarray(img.resize((rw, rh), BICUBIC))
        orders = {hf: np.asarray(two_pass(img, rw, rh, hf)) for hf in (True, False)}
        for name, rule in list(alive.items()):
            if not np.array_equal(want, orders[rule(w, h, rw, rh)]):
                del alive[name]
    return next(iter(alive)) if len(alive) == 1 else None


PASS_ORDER = probe_pass_order()
# below this many pixels (input or output) a resize is not split: hand-off overhead exceeds the gain
MIN_SPLIT_PIXELS = 160 * 160
# strips per thread in each split pass: more than one lets a thread that is ahead take over a late one's work
STRIPS_PER_THREAD = 2


def _spans(n: int, k: int, align: int = 1) -> list[tuple[int, int]]:
    """[0, n) cut into at most k non-empty spans whose ends are multiples of `align` (n is one)."""
    units = n // align
    k = max(1, min(k, units))
    return [(align * (units * i // k), align * (units * (i + 1) // k)) for i in range(k)]


class ImageProcessor:
    """HF's Qwen2-VL image processor in torch: bitwise `Qwen2VLImageProcessorPil` (resize=pil) or its torchvision
    backend (resize=torch), several times faster."""

    def __init__(self, cfg: VisionConfig):
        self.cfg = cfg
        self.norm = Normaliser(cfg)
        self._pool, self._pid = None, None

    def __getstate__(self):
        return {**self.__dict__, "_pool": None, "_pid": None}  # threads belong to one process

    def _run(self, jobs: list) -> None:
        """Run the jobs on cfg.threads threads, this one included, each taking the next job not yet taken (so a
        thread the OS holds back delays only its own job); re-raise the first error after all ended."""
        helpers = min(self.cfg.threads, len(jobs)) - 1
        if helpers == 0:
            for j in jobs:
                j()
            return
        if self._pool is None or self._pid != os.getpid():  # after a fork the parent's threads are gone
            self._pool, self._pid = ThreadPoolExecutor(self.cfg.threads - 1, thread_name_prefix="vision"), os.getpid()
        taken = itertools.count()  # next() on it is atomic in CPython
        errors = []

        def work():
            for i in iter(taken.__next__, None):
                if i >= len(jobs) or errors:
                    return
                try:
                    jobs[i]()
                except BaseException as e:
                    errors.append(e)

        futures = [self._pool.submit(work) for _ in range(helpers)]
        work()
        for f in futures:
            f.result()
        if errors:
            raise errors[0]

    def size(self, img: Image.Image) -> tuple[int, int]:
        """(height, width) after smart_resize."""
        c = self.cfg
        w, h = img.size
        return smart_resize(h, w, c.factor, c.min_pixels, c.max_pixels)

    def _into(self, img: Image.Image, rh: int, rw: int, out: torch.Tensor) -> None:
        """Resize one RGB image to (rh, rw) and write its patch rows into out [n, D]."""
        c, f, k = self.cfg, self.cfg.factor, self.cfg.threads
        strips = k * STRIPS_PER_THREAD
        dst = out.view(rh // f, rw // f, c.merge_size ** 2, -1)
        w, h = img.size

        def bands(frame: torch.Tensor) -> None:  # a whole frame, in bands of block rows (one per thread if big)
            jobs = min(k, max(1, out.shape[0] // CHUNK_ROWS))
            self._run([lambda a=a, b=b: patch_block(frame[a * f:b * f], dst[a:b], c, self.norm)
                       for a, b in _spans(rh // f, jobs)])

        if (rw, rh) == (w, h):
            return bands(pil_pixels(img))
        if c.resize == "torch":
            return self._into_torch(pil_pixels(img), rh, rw, dst, bands)
        if k == 1 or PASS_ORDER is None or max(w * h, rw * rh) < MIN_SPLIT_PIXELS:
            return bands(pil_pixels(img.resize((rw, rh), BICUBIC)))

        passes = [p for p in (("h", "v") if PASS_ORDER_RULES[PASS_ORDER](w, h, rw, rh) else ("v", "h"))
                  if (p == "h" and rw != w) or (p == "v" and rh != h)]
        src = img
        if len(passes) == 2:  # first pass: strips along the axis it keeps, pasted into one intermediate image
            if passes[0] == "h":
                mid = Image.new("RGB", (rw, h))
                crop = [(0, a, w, b) for a, b in _spans(h, strips)]
            else:
                mid = Image.new("RGB", (w, rh))
                crop = [(a, 0, b, h) for a, b in _spans(w, strips)]

            def first(box):
                strip = img.crop(box)
                size = (rw, strip.height) if passes[0] == "h" else (strip.width, rh)
                mid.paste(strip.resize(size, BICUBIC), box[:2])

            self._run([lambda box=box: first(box) for box in crop])
            src = mid
        sw, sh = src.size

        def last(a: int, b: int) -> None:  # final pass on one strip of whole blocks, patchified by this thread
            if passes[-1] == "v":
                piece = src.crop((a, 0, b, sh)).resize((b - a, rh), BICUBIC)
                patch_block(pil_pixels(piece), dst[:, a // f:b // f], c, self.norm)
            else:
                piece = src.crop((0, a, sw, b)).resize((rw, b - a), BICUBIC)
                patch_block(pil_pixels(piece), dst[a // f:b // f], c, self.norm)

        self._run([lambda a=a, b=b: last(a, b) for a, b in _spans(rw if passes[-1] == "v" else rh, strips, f)])

    def _into_torch(self, px: torch.Tensor, rh: int, rw: int, dst: torch.Tensor, bands: Callable) -> None:
        """torch's uint8 antialiased bicubic (torchvision's resize), RGBX or RGB [H, W, C] in. Its one-shot result
        equals a horizontal pass then a vertical one (tests/test_vision.py), each of whose coefficients depend only
        on the sizes along its axis: so with threads the first pass runs on row strips, the second on column
        strips that the thread making them patchifies, exactly as one call would."""
        c, f = self.cfg, self.cfg.factor
        h, w, C = px.shape
        x = px.permute(2, 0, 1).unsqueeze(0)  # channels-last [1, C, H, W] view

        def resize(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
            return torch.nn.functional.interpolate(t, size=size, mode="bicubic", antialias=True, align_corners=False)

        def hwc(t: torch.Tensor) -> torch.Tensor:
            return t[0].permute(1, 2, 0)

        if c.threads == 1 or max(w * h, rw * rh) < MIN_SPLIT_PIXELS:
            return bands(hwc(resize(x, (rh, rw))))
        strips = c.threads * STRIPS_PER_THREAD
        if rw != w and rh != h:  # horizontal pass on row strips into one intermediate
            mid = torch.empty((1, C, h, rw), dtype=torch.uint8, memory_format=torch.channels_last)

            def first(a: int, b: int) -> None:
                mid[:, :, a:b].copy_(resize(x[:, :, a:b], (b - a, rw)))

            self._run([lambda a=a, b=b: first(a, b) for a, b in _spans(h, strips)])
            x = mid
        if rh != h:  # vertical pass on column strips of whole blocks
            def last(a: int, b: int) -> None:
                patch_block(hwc(resize(x[..., a:b], (rh, b - a))), dst[:, a // f:b // f], c, self.norm)

            return self._run([lambda a=a, b=b: last(a, b) for a, b in _spans(rw, strips, f)])

        def rows(a: int, b: int) -> None:  # only the width changes: row strips of whole blocks
            patch_block(hwc(resize(x[:, :, a:b], (b - a, rw))), dst[a // f:b // f], c, self.norm)

        self._run([lambda a=a, b=b: rows(a, b) for a, b in _spans(rh, strips, f)])

    def _rows(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        c = self.cfg
        images = [to_rgb(im) for im in images]
        sizes = [self.size(im) for im in images]
        grids = [(1, rh // c.patch_size, rw // c.patch_size) for rh, rw in sizes]
        counts = [gh * gw for _, gh, gw in grids]
        out = torch.empty(sum(counts), self.norm.lut.shape[0] * c.temporal_patch_size * c.patch_size ** 2)
        start = 0
        for im, (rh, rw), n in zip(images, sizes, counts):
            self._into(im, rh, rw, out[start:start + n])
            start += n
        return out, grids

    def one(self, img: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """One image -> (pixel rows, grid). A still image is one frame repeated over the temporal patch."""
        rows, grids = self._rows([img])
        return rows, grids[0]

    def __call__(self, images: Sequence[Image.Image]) -> dict:
        """Same keys and values as `Qwen2VLImageProcessorPil(images, return_tensors="pt")`; all images' rows are
        written straight into one output tensor."""
        rows, grids = self._rows(images)
        return {"pixel_values": rows, "image_grid_thw": torch.tensor(grids, dtype=torch.long)}


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [T, H, W, C] -> uint8 [T, height, width, C], antialiased bicubic: what torchvision's tensor resize
    (used by qwen-vl-utils for video) computes."""
    x = frames.permute(0, 3, 1, 2)
    y = torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return y.permute(0, 2, 3, 1).contiguous()
