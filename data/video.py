"""Video -> `pixel_values_videos`, `video_grid_thw`, Qwen2.5-VL `second_per_grid_t`, Qwen3-VL timestamps.

Frame sampling and the per-frame pixel budget follow qwen-vl-utils 0.0.14 (`smart_nframes`, `fetch_video`):
the frame count comes from the source fps, the target fps and min/max frames (rounded to FRAME_FACTOR); each
frame may use at most `min(VIDEO_MAX_TOKEN_NUM tokens, total_pixels / nframes * FRAME_FACTOR)` pixels but at
least 1.05 x min_pixels. Frames are resized with antialiased bicubic on uint8 (what torchvision's tensor
resize does there), padded to the temporal patch by repeating the last frame and patchified as HF does.

Memory: an mp4 is read twice, never whole into frames. The container's frame count (or, where it stores none,
a count of its packets, demuxed but not decoded) gives the sampled indices; then the stream is decoded and only
the sampled frames are kept (as rgb24), so peak memory is the sampled frames, not the clip (a 520 KB mp4 can
hold 1,200 frames). A source longer than `max_source_frames` (data.max_video_frames) is a "video_too_long"
BadSample before any decoding.
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
MAX_VIDEO_FRAMES = 100_000  # default data.max_video_frames: ~55 min at 30 fps


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
    max_source_frames: int = MAX_VIDEO_FRAMES  # longer sources are BadSample "video_too_long", never decoded


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


def mp4_info(data: bytes, name: str, key: str) -> tuple[int, float]:
    """(frame count, average fps) of the first video stream, without decoding: the container's count, or the
    number of its packets where it stores none (Matroska/WebM)."""
    import av

    try:
        with av.open(io.BytesIO(bytes(data))) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    except Exception as e:  # PyAV raises InvalidDataError, IndexError (no stream), ...
        raise BadSample("undecodable_video", key, f"{name!r}: {type(e).__name__}: {e}") from None
    if total <= 0 or not 0 < fps < math.inf:
        raise BadSample("undecodable_video", key, f"{name!r}: {total} frames at fps {fps}")
    return total, fps


def decode_mp4(data: bytes, name: str, key: str, indices: Sequence[int], limit: int) -> tuple[dict, int]:
    """({index: uint8 HxWx3} of the frames at `indices`, frames decoded). Every frame is decoded in stream order
    and dropped at once unless sampled; decoding stops after `limit` + 1 frames (a source over the limit)."""
    import av

    want, kept, n = set(indices), {}, 0
    try:
        with av.open(io.BytesIO(bytes(data))) as container:
            for frame in container.decode(container.streams.video[0]):
                if n in want:
                    kept[n] = frame.to_ndarray(format="rgb24")
                n += 1
                if n > limit:
                    break
    except Exception as e:  # PyAV raises InvalidDataError, IndexError (no stream), ...
        raise BadSample("undecodable_video", key, f"{name!r}: {type(e).__name__}: {e}") from None
    return kept, n


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
        if not cfg.max_source_frames >= 1:
            raise ValueError(f"data.max_video_frames={cfg.max_source_frames} must be >= 1 (source frames of the "
                             f"longest video decoded)")
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
            self._check_length(len(media), None, name, key)
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
        total, video_fps = mp4_info(media, name, key)
        for _ in range(2):  # a second pass only where the container's count is not what decodes
            self._check_length(total, video_fps, name, key)
            try:
                n = smart_nframes(self.cfg, total, video_fps)
            except ValueError as e:
                raise BadSample("undecodable_video", key, f"{name!r}: {e}") from None
            idx = torch.linspace(0, total - 1, n).round().long().tolist()
            kept, decoded = decode_mp4(media, name, key, idx, self.cfg.max_source_frames)
            if decoded == total:
                break
            total = decoded
        else:
            raise BadSample("undecodable_video", key, f"{name!r}: its frame count differs between two decodes")
        if len({a.shape for a in kept.values()}) != 1:
            raise BadSample("undecodable_video", key, f"{name!r}: frames differ in size "
                            f"{sorted({a.shape for a in kept.values()})}")
        arr = np.stack([kept[i] for i in idx])
        return torch.from_numpy(arr), idx, video_fps, n / total * video_fps

    def _check_length(self, total: int, fps: Optional[float], name: str, key: str) -> None:
        limit = self.cfg.max_source_frames
        if total > limit:
            at = f" ({total / fps:.0f} s at {fps:.4g} fps)" if fps else ""
            raise BadSample("video_too_long", key, f"{name!r}: {total} source frames{at}, over "
                            f"data.max_video_frames={limit}; cut the video or raise data.max_video_frames")

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
