"""Video: frame count, sampled indices, sample fps and per-frame size equal qwen-vl-utils 0.0.14 (its own
`smart_nframes` and `fetch_video` source, run here with a two-function torchvision stand-in because torchvision
cannot be installed: `io.read_video` decodes with PyAV, `transforms.functional.resize` is torch's antialiased
bicubic, which is what torchvision's tensor resize calls). Patches equal transformers' Qwen2-VL/Qwen3-VL video
`patchify` (its source, run on frames normalised by HF's image arithmetic); Qwen3-VL timestamps and text equal
`Qwen3VLProcessor`'s own methods."""
import importlib.util
import math
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from data.errors import BadSample
from data.video import VideoConfig, VideoProcessor, decode_mp4, smart_nframes, timestamps, write_mp4
from data.vision import Normaliser, VisionConfig, normalise_lut, patchify
from tests.test_vision import QWEN_VL_UTILS, load_functions

HF_QWEN2_VIDEO = Path(importlib.util.find_spec("transformers").submodule_search_locations[0]) / \
    "models/qwen2_vl/video_processing_qwen2_vl.py"


def _frames(n=23, h=90, w=130, seed=0):
    """Moving gradient frames (a codec keeps them close to the input)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([np.dstack([(x * 2 + 7 * t) % 256, (y * 3 + 5 * t) % 256, ((x + y) + 11 * t) % 256])
                     for t in range(n)]).astype(np.uint8)


@pytest.fixture(scope="module")
def qvu():
    """qwen-vl-utils' vision_process module, imported with a minimal torchvision stand-in."""
    import torch.nn.functional as F

    videos: dict = {}

    def read_video(path, start_pts=0.0, end_pts=None, pts_unit="sec", output_format="TCHW"):
        frames, fps = decode_mp4(videos[path], path, path)
        arr = torch.from_numpy(np.stack([f.to_ndarray(format="rgb24") for f in frames])).permute(0, 3, 1, 2)
        return arr, None, {"video_fps": fps}

    def resize(video, size, interpolation=None, antialias=True):
        return F.interpolate(video, size=tuple(size), mode="bicubic", antialias=antialias, align_corners=False)

    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.20.0"
    tv.io = SimpleNamespace(read_video=read_video)
    tv.transforms = SimpleNamespace(functional=SimpleNamespace(resize=resize))
    tvt = types.ModuleType("torchvision.transforms")
    tvt.InterpolationMode = SimpleNamespace(BICUBIC="bicubic")
    saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.transforms")}
    sys.modules.update({"torchvision": tv, "torchvision.transforms": tvt})
    try:
        spec = importlib.util.spec_from_file_location("qvu_vision_process", QWEN_VL_UTILS)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    mod.get_video_reader_backend = lambda: "torchvision"
    mod.VIDEOS = videos
    return mod


def test_smart_nframes_equals_qwen_vl_utils():
    ref = load_functions(QWEN_VL_UTILS, {"smart_nframes", "round_by_factor", "ceil_by_factor", "floor_by_factor"},
                         {"math": math, "logger": SimpleNamespace(warning=lambda *a: None)})
    n = 0
    for total in (2, 3, 4, 7, 30, 31, 120, 1000, 5000):
        for vfps in (1.0, 7.5, 24.0, 29.97, 60.0):
            for fps, lo, hi in ((2.0, 4, 768), (0.5, 4, 16), (4.0, 2, 9), (1.0, 6, 20)):
                cfg = VideoConfig(fps=fps, min_frames=lo, max_frames=hi)
                ele = {"fps": fps, "min_frames": lo, "max_frames": hi}
                try:
                    want = ref["smart_nframes"](ele, total_frames=total, video_fps=vfps)
                except ValueError:
                    with pytest.raises(ValueError):
                        smart_nframes(cfg, total, vfps)
                    continue
                assert smart_nframes(cfg, total, vfps) == want, (total, vfps, fps, lo, hi)
                n += 1
            assert smart_nframes(VideoConfig(nframes=5), max(total, 6), vfps) == \
                ref["smart_nframes"]({"nframes": 5}, total_frames=max(total, 6), video_fps=vfps)
    assert n > 100


CASES = [  # (frames, h, w, source fps, our config)
    (23, 90, 130, 10, VideoConfig(fps=2.0, min_frames=4, max_frames=16, min_pixels=56 * 56, max_pixels=128 * 128,
                                  total_pixels=16 * 128 * 128)),
    (40, 64, 200, 25, VideoConfig(fps=3.0, min_frames=4, max_frames=30, min_pixels=28 * 28, max_pixels=None,
                                  total_pixels=6 * 56 * 56)),
    (12, 120, 96, 6, VideoConfig(fps=2.0, min_frames=4, max_frames=768, min_pixels=None, max_pixels=None,
                                 total_pixels=None)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("patch", [14, 16])
def test_sampling_budget_and_resize_equal_fetch_video(qvu, case, patch):
    n, h, w, fps, cfg = CASES[case]
    data = write_mp4(_frames(n, h, w), fps)
    qvu.VIDEOS["v.mp4"] = data
    ele = {"video": "v.mp4", "fps": cfg.fps, "min_frames": cfg.min_frames, "max_frames": cfg.max_frames}
    ele.update({k: v for k, v in (("min_pixels", cfg.min_pixels), ("max_pixels", cfg.max_pixels),
                                  ("total_pixels", cfg.total_pixels)) if v is not None})
    (video, meta), sample_fps = qvu.fetch_video(ele, image_patch_size=patch, return_video_sample_fps=True,
                                                return_video_metadata=True)
    vp = VideoProcessor(VisionConfig(patch_size=patch), cfg)
    frames, idx, vfps, sfps = vp.sample(data, "v.mp4", "k")
    out = vp(data, "v.mp4", "k")
    assert idx == meta["frames_indices"].tolist() and vfps == meta["fps"] and sfps == sample_fps
    T, _, rh, rw = video.shape
    assert out.grid_thw == (T // 2, rh // patch, rw // patch)
    assert out.second_per_grid_t == 2 / sample_fps


def _hf_patchify():
    """transformers' Qwen2VLVideoProcessor.patchify, from its source (its module needs torchvision)."""
    import ast

    src = ast.parse(HF_QWEN2_VIDEO.read_text())
    cls = next(n for n in src.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "patchify")
    ns = {"torch": torch}
    exec(compile(ast.Module([fn], []), str(HF_QWEN2_VIDEO), "exec"), ns)
    return ns["patchify"]


@pytest.mark.parametrize("nframes", [4, 5])
@pytest.mark.parametrize("patch,mean,std", [(14, (0.48145466, 0.4578275, 0.40821073),
                                             (0.26862954, 0.26130258, 0.27577711)), (16, (0.5,) * 3, (0.5,) * 3)])
def test_patches_equal_hf_video_patchify(nframes, patch, mean, std):
    """Frame lists skip resampling, so the frames going into patchify are exactly ours; HF's video normalisation
    is its torchvision backend's (fused float32; the LUT of resize="torch" holds it per level, checked against
    the real video processor below). An odd frame list is padded to even by qwen-vl-utils' rule; HF's own padding
    to the temporal patch is covered by patchify itself."""
    vc = VisionConfig(patch_size=patch, image_mean=mean, image_std=std, resize="torch")
    raw = _frames(nframes, 2 * patch * 3, 2 * patch * 4)
    imgs = [Image.fromarray(f) for f in raw]
    cfg = VideoConfig(min_pixels=patch * patch * 4, max_pixels=10**6, total_pixels=10**8)
    out = VideoProcessor(vc, cfg)(imgs, "frames", "k", fps=4)
    padded = np.concatenate([raw, raw[-1:]]) if nframes % 2 else raw
    lut = normalise_lut(vc)
    x = torch.from_numpy(padded).long().permute(0, 3, 1, 2)  # T C H W
    norm = torch.stack([lut[c][x[:, c]] for c in range(3)], 1)
    want, t, gh, gw = _hf_patchify()(None, norm[None], patch_size=patch, merge_size=2, temporal_patch_size=2)
    assert out.grid_thw == (t, gh, gw)
    assert torch.equal(out.pixel_values, want[0])
    # three frames: HF pads the temporal patch with the last frame itself; ours pads before patchify (video.py)
    odd, *_ = _hf_patchify()(None, norm[None, :3], patch_size=patch, merge_size=2, temporal_patch_size=2)
    three = torch.from_numpy(raw[:3])
    rows, grid = patchify(torch.cat([three, three[-1:]]), vc, Normaliser(vc))  # vc: the video arithmetic
    assert grid == (2, gh, gw) and torch.equal(rows, odd[0])


def test_video_pixels_equal_hf_video_processor():
    """Frames through our VideoProcessor vs transformers' own `Qwen2VLVideoProcessor` (torchvision backend, real
    torchvision in a subprocess: tests/hf_torchvision.py) on the same frames: resized (up and down) or not, both
    patch sizes and normalisations; pixel_values_videos and grids bitwise equal."""
    from tests.hf_torchvision import INSTALL, location, run_with_torchvision

    if location() is None:
        pytest.skip(f"torchvision not installed for the parity test; `.ci/run` installs it: {INSTALL}")
    code = """
import numpy as np, torch
from PIL import Image
from transformers import Qwen2VLVideoProcessor
from data.video import VideoConfig, VideoProcessor
from data.vision import VisionConfig
from tests.test_video import _frames
checked = 0
for patch, mean, std in [(14, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
                         (16, (0.5,) * 3, (0.5,) * 3)]:
    for h, w in [(2 * patch * 3, 2 * patch * 4), (101, 173), (300, 200)]:
        raw = _frames(4, h, w)
        vc = VisionConfig(patch_size=patch, image_mean=mean, image_std=std)  # the image setting does not matter
        cfg = VideoConfig(min_pixels=4 * patch * patch, max_pixels=10**7, total_pixels=10**9)
        out = VideoProcessor(vc, cfg)([Image.fromarray(f) for f in raw], "frames", "k", fps=4)
        hf = Qwen2VLVideoProcessor(patch_size=patch, image_mean=list(mean), image_std=list(std),
                                   size={"shortest_edge": 4 * patch * patch, "longest_edge": 10**7},
                                   do_sample_frames=False, cap_pixels_per_frame=False)
        got = hf(videos=[torch.from_numpy(raw).permute(0, 3, 1, 2)], return_tensors="pt")
        assert got["video_grid_thw"].tolist() == [list(out.grid_thw)], (patch, h, w)
        assert torch.equal(got["pixel_values_videos"], out.pixel_values), (patch, h, w)
        checked += 1
print("checked", checked)
"""
    r = run_with_torchvision(code)
    assert r.returncode == 0 and "checked 6" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def test_qwen3_timestamps_and_text_equal_qwen3vl_processor():
    proc = SimpleNamespace(video_processor=SimpleNamespace(merge_size=2, temporal_patch_size=2),
                           vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>",
                           video_token="<|video_pad|>")
    proc._calculate_timestamps = lambda *a: Qwen3VLProcessor._calculate_timestamps(proc, *a)
    for idx, fps in (([0, 6, 12, 17, 23, 29], 10.0), ([0, 3, 7], 2.5), (list(range(8)), 2.0)):
        assert timestamps(idx, fps, 2) == Qwen3VLProcessor._calculate_timestamps(proc, list(idx), fps, 2)
        grid = torch.tensor([[math.ceil(len(idx) / 2), 4, 6]])
        meta = SimpleNamespace(frames_indices=np.array(idx), fps=fps)
        want = Qwen3VLProcessor.replace_video_token(proc, {"video_grid_thw": grid, "video_metadata": [meta]}, 0)
        ours = "".join(f"<{t:.1f} seconds><|vision_start|>" + "<|video_pad|>" * 6 + "<|vision_end|>"
                       for t in timestamps(idx, fps, 2))
        assert ours == want


def test_bad_videos_raise_bad_sample():
    vp = VideoProcessor(VisionConfig(), VideoConfig())
    good = write_mp4(_frames(8, 56, 56), 4)
    for data in (b"", b"garbage" * 100, good[: len(good) // 3]):
        with pytest.raises(BadSample) as e:
            vp(data, "0.mp4", "s3")
        assert e.value.reason == "undecodable_video" and e.value.key == "s3"
    with pytest.raises(BadSample) as e:
        vp(good, "0.pt", "s3")
    assert e.value.reason == "pickle_member"
    with pytest.raises(BadSample) as e:
        vp([good], "frames", "s3")  # an mp4 where a frame image belongs
    assert e.value.reason == "undecodable_video"
