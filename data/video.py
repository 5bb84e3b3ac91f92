"""Video -> `pixel_values_videos`, `video_grid_thw`, Qwen2.5-VL `second_per_grid_t`, Qwen3-VL timestamps.

Frame sampling and the per-frame pixel budget follow qwen-vl-utils 0.0.14 (`smart_nframes`, `fetch_video`):
the frame count comes from the source fps, the target fps and min/max frames (rounded to FRAME_FACTOR); each
frame may use at most `min(VIDEO_MAX_TOKEN_NUM tokens, total_pixels / nframes * FRAME_FACTOR)` pixels but at
least 1.05 x min_pixels. Frames are resized with antialiased bicubic on uint8 (what torchvision's tensor
resize does there), padded to the temporal patch by repeating the last frame and patchified as HF does.
"""
from __future__ import annotations


import io
import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np
import torch

from data.errors import BadSample
from data.vision import Normaliser, VisionConfig, decode_image, patchify, refuse_pickle, resize_frames, smart_resize

# qwen-vl-utils 0.0.14 constants
FRAME_FACTOR = 2
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
VIDEO_MIN_TOKEN_NUM = 128
VIDEO_MAX_TOKEN_NUM = 768
MODEL_SEQ_LEN = 128000


@dataclass
class VideoConfig:
    """Sampling and budget. Pixel settings left None take qwen-vl-utils' value for the family's factor
    (patch * merge): min 128 tokens, max 768 tokens per frame, total 0.9 * 128000 tokens."""

    fps: float = FPS
    min_frames: int = FPS_MIN_FRAMES
    max_frames: int = FPS_MAX_FRAMES
    nframes: Optional[int] = None  # fixed frame count instead of fps sampling
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    total_pixels: Optional[int] = None
    frame_list_fps: float = 2.0  # rate of a record's frame-image list when the part gives no "fps"


def _round(n, f): return round(n / f) * f
def _ceil(n, f): return math.ceil(n / f) * f
def _floor(n, f): return math.floor(n / f) * f


def smart_nframes(cfg: VideoConfig, total_frames: int, video_fps: float) -> int:
    """qwen-vl-utils' frame count: fps sampling clamped to [min_frames, max_frames, total], a multiple of 2."""
    if cfg.nframes is not None:
        n = _round(cfg.nframes, FRAME_FACTOR)
    else:
        lo, hi = _ceil(cfg.min_frames, FRAME_FACTOR), _floor(cfg.max_frames, FRAME_FACTOR)
        n = min(min(max(total_frames / video_fps * cfg.fps, lo), hi), total_frames)
        n = _floor(n, FRAME_FACTOR)
    if not FRAME_FACTOR <= n <= total_frames:
        raise ValueError(f"nframes should in interval [{FRAME_FACTOR}, {total_frames}], but got {n}.")
    return n


def frame_pixels(cfg: VideoConfig, nframes: int, factor: int) -> tuple[int, float]:
    """(min_pixels, max_pixels) of one frame given the whole video's budget, as fetch_video computes them."""
    min_pixels = cfg.min_pixels if cfg.min_pixels is not None else VIDEO_MIN_TOKEN_NUM * factor * factor
    total = cfg.total_pixels if cfg.total_pixels is not None else MODEL_SEQ_LEN * factor * factor * 0.9
    cap = max(min(VIDEO_MAX_TOKEN_NUM * factor * factor, total / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    return min_pixels, min(cfg.max_pixels, cap) if cfg.max_pixels is not None else cap


def timestamps(indices: Sequence[int], video_fps: float, temporal_patch_size: int) -> list[float]:
    """Qwen3-VL: seconds of each temporal patch, the mean of its first and last frame (Qwen3VLProcessor)."""
    idx = list(indices)
    if len(idx) % temporal_patch_size:
        idx += [idx[-1]] * (temporal_patch_size - len(idx) % temporal_patch_size)
    t = [i / video_fps for i in idx]
    return [(t[i] + t[i + temporal_patch_size - 1]) / 2 for i in range(0, len(t), temporal_patch_size)]


def decode_mp4(data: bytes, name: str, key: str) -> tuple[list, float]:
    """All frames of the first video stream (as PyAV frames, converted lazily) and the stream's average fps."""
    import av

    try:
        with av.open(io.BytesIO(bytes(data))) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            frames = [f for f in container.decode(stream)]
    except Exception as e:  # PyAV raises InvalidDataError, IndexError (no stream), ...
        raise BadSample("undecodable_video", key, f"{name!r}: {type(e).__name__}: {e}") from None
    if not frames or fps <= 0:
        raise BadSample("undecodable_video", key, f"{name!r}: {len(frames)} frames at fps {fps}")
    return frames, fps


@dataclass
class VideoOut:
    pixel_values: torch.Tensor  # [t*h*w, C*Tp*P*P]
    grid_thw: tuple  # (t, h, w) in patches
    second_per_grid_t: float  # Qwen2.5-VL: temporal_patch_size / sample_fps
    timestamps: list  # Qwen3-VL: seconds of each temporal patch
    indices: list  # source frame index of each sampled frame
    video_fps: float  # source rate
    sample_fps: float


class VideoProcessor:
    def __init__(self, vision: VisionConfig, cfg: VideoConfig):
        self.vision, self.cfg = vision, cfg
        self.norm = Normaliser(replace(vision, resize="torch"))  # HF video processors: torchvision arithmetic

    def sample(self, media, name: str, key: str, fps: Optional[float] = None):
        """uint8 [T, H, W, 3] sampled frames, their source indices, source fps and sample fps.

        mp4 bytes are sampled with smart_nframes; a list of frame images is taken whole and padded to an even
        count with its last frame (as fetch_video does for frame lists), at `fps` (the part's) frames per second.
        """
        if isinstance(media, (list, tuple)):
            if not media:
                raise BadSample("undecodable_video", key, f"{name!r}: empty frame list")
            try:
                imgs = [np.asarray(decode_image(m, f"{name}[{i}]", key)) for i, m in enumerate(media)]
            except BadSample as e:
                raise BadSample("pickle_member" if e.reason == "pickle_member" else "undecodable_video", key,
                                e.detail) from None
            if len({a.shape for a in imgs}) != 1:
                raise BadSample("undecodable_video", key, f"{name!r}: frames differ in size "
                                f"{sorted({a.shape for a in imgs})}")
            n = _ceil(len(imgs), FRAME_FACTOR)
            imgs += [imgs[-1]] * (n - len(imgs))
            rate = float(fps or self.cfg.frame_list_fps)
            return torch.from_numpy(np.stack(imgs)), list(range(n)), rate, rate
        refuse_pickle(name, key)
        frames, video_fps = decode_mp4(media, name, key)
        try:
            n = smart_nframes(self.cfg, len(frames), video_fps)
        except ValueError as e:
            raise BadSample("undecodable_video", key, f"{name!r}: {e}") from None
        idx = torch.linspace(0, len(frames) - 1, n).round().long().tolist()
        arr = np.stack([frames[i].to_ndarray(format="rgb24") for i in idx])
        return torch.from_numpy(arr), idx, video_fps, n / max(len(frames), 1e-6) * video_fps

    def __call__(self, media, name: str, key: str, fps: Optional[float] = None) -> VideoOut:
        frames, idx, video_fps, sample_fps = self.sample(media, name, key, fps)
        v = self.vision
        T, H, W, _ = frames.shape
        lo, hi = frame_pixels(self.cfg, T, v.factor)
        try:
            rh, rw = smart_resize(H, W, v.factor, lo, hi, rule="qwen_vl_utils")
        except (ValueError, AssertionError) as e:
            raise BadSample("undecodable_video", key, f"{name!r}: {e}") from None
        if (rh, rw) != (H, W):
            frames = resize_frames(frames, rh, rw)
        if pad := -T % v.temporal_patch_size:  # HF pads the last temporal patch with the last frame
            frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
        rows, grid = patchify(frames, v, self.norm)
        return VideoOut(rows, grid, v.temporal_patch_size / sample_fps,
                        timestamps(idx, video_fps, v.temporal_patch_size), idx, video_fps, sample_fps)


def write_mp4(frames: np.ndarray, fps: int, codec: str = "mpeg4") -> bytes:
    """uint8 [T, H, W, 3] -> mp4 bytes (tests, the synthetic source). mpeg4 needs even sizes."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()
