"""Data benchmark (`python -m data.bench`): a script, not a test; prints ratios against named baselines.

Section 1, vision: our image processor (data/vision.py) vs HF's processor paths on the same decoded images with
the same min/max pixels, for each family. Baselines: HF's PIL backend (`Qwen2VLImageProcessorPil`, what HF uses
without torchvision and what training/models.py builds here) and, where torchvision can be imported
(tests/hf_torchvision.py; `.ci/run` installs it), HF's torchvision backend (`Qwen2VLImageProcessor`, HF's default).
Every row of ours is checked before timing against the HF backend it claims to equal: resize=pil against the PIL
backend, resize=torch against the torchvision one; both must be bitwise equal (without torchvision, resize=torch
shows its max difference to the PIL backend instead). The mix has 1280x720 photos, other photo sizes and
multi-image samples. HF's paths are single-threaded; ours is timed with 1 thread (VisionConfig.threads=1) and
with `--threads` N threads (split resize passes and patchify); torch's intra-op threads are 1 throughout. The
"PIL resize alone" row times only PIL's bicubic resize: its ratio bounds any single-threaded PIL-exact path. Best
of `--repeats` timings per sample, the paths taking turns over the whole mix so machine load hits all alike
(`_best_times`); the load average is printed since other jobs on the machine hurt the threaded rows most.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import time

try:  # HF's torchvision backend as a second baseline: torchvision must be importable before transformers is
    from tests.hf_torchvision import import_torchvision

    import_torchvision()
except ImportError:
    pass

import numpy as np
import skimage.data
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from data.vision import ImageProcessor, VisionConfig
from training.models import FAMILIES

# (width, height, images per sample, samples of this kind)
MIX = [(1280, 720, 1, 6), (720, 1280, 1, 2), (1024, 768, 1, 3), (640, 480, 1, 4), (448, 448, 1, 2),
       (333, 500, 1, 2), (800, 600, 2, 2), (1920, 1080, 1, 1)]
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat")


def sample_mix() -> list[list[Image.Image]]:
    """Samples (lists of images): real photographs resized to the mix's sizes."""
    photos = [Image.fromarray(getattr(skimage.data, n)()) for n in PHOTOS]
    out, k = [], 0
    for w, h, per, count in MIX:
        for _ in range(count):
            out.append([photos[(k + j) % len(photos)].resize((w, h), Image.Resampling.BICUBIC) for j in range(per)])
            k += 1
    return out


def resize_only(processor: ImageProcessor):
    """What every bitwise path must do per sample: PIL's bicubic resize of each image to its smart_resize size."""
    def run(sample):
        for im in sample:
            rh, rw = processor.size(im)
            if (rw, rh) != im.size:
                im.resize((rw, rh), Image.Resampling.BICUBIC)
    return run


def _best_times(paths: dict, samples: list, repeats: int) -> dict:
    """Seconds per path for the whole mix: the sum over samples of each sample's best of `repeats` timings.

    Each repeat runs every path over the whole mix in turn (a path runs in its own steady state: interleaving
    paths per sample would make each pay for the other's memory churn in page faults), and a sample's best time
    is one taken in a quiet moment of the machine."""
    best = {p: [float("inf")] * len(samples) for p in paths}
    for _ in range(repeats):
        for p, fn in paths.items():
            for i, s in enumerate(samples):
                t = time.perf_counter()
                fn(s)
                best[p][i] = min(best[p][i], time.perf_counter() - t)
    return {p: sum(v) for p, v in best.items()}


def _hf_torchvision():
    """HF's torchvision-backend image processor class, or None with the reason (see tests/hf_torchvision.py)."""
    try:
        import_torchvision()
        from transformers import Qwen2VLImageProcessor
        from transformers.image_processing_backends import TorchvisionBackend

        if not issubclass(Qwen2VLImageProcessor, TorchvisionBackend):
            return None, "transformers did not pick its torchvision backend"
        return Qwen2VLImageProcessor, ""
    except Exception as e:  # noqa: BLE001 - report and go on with the PIL baseline
        return None, f"{type(e).__name__}: {e}"


def _compare(ref, ours, samples) -> str:
    worst, grids_equal, exact = 0.0, True, True
    for s in samples:
        a, b = ref(images=s, return_tensors="pt"), ours(s)
        grids_equal &= torch.equal(a["image_grid_thw"], b["image_grid_thw"])
        same = a["pixel_values"].shape == b["pixel_values"].shape
        exact &= same and torch.equal(a["pixel_values"], b["pixel_values"])
        worst = max(worst, (a["pixel_values"] - b["pixel_values"]).abs().max().item() if same else math.inf)
    return "bitwise equal" if exact and grids_equal else f"grids {'equal' if grids_equal else 'DIFFER'}, " \
                                                          f"max|diff| {worst:.4f}"


def vision(repeats: int, min_pixels: int, max_pixels: int, threads: int) -> None:
    samples = sample_mix()
    n_img = sum(len(s) for s in samples)
    tv_cls, why = _hf_torchvision()
    print(f"== vision: {len(samples)} samples, {n_img} images, min_pixels={min_pixels} max_pixels={max_pixels}, "
          f"torch intra-op threads={torch.get_num_threads()}; HF's paths are single-threaded, ours runs with "
          f"VisionConfig.threads=1 and ={threads}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("   baselines: HF PIL = Qwen2VLImageProcessorPil (HF without torchvision); " +
          ("HF tv = Qwen2VLImageProcessor on its torchvision backend (HF's default with torchvision)" if tv_cls else
           f"HF's torchvision backend not measured ({why})"))
    print(f"{'family':<11} {'path':<34} {'samples/s':>10} {'vis tok/s':>11} {'vs HF PIL':>10} "
          f"{'vs HF tv' if tv_cls else '':>9}  check")
    for name, fam in FAMILIES.items():
        kw = dict(patch_size=fam.patch_size, temporal_patch_size=2, merge_size=2, image_mean=fam.image_mean,
                  image_std=fam.image_std, min_pixels=min_pixels, max_pixels=max_pixels)
        ref = {"pil": Qwen2VLImageProcessorPil(**kw)}
        paths = {"HF PIL (Qwen2VLImageProcessorPil)": lambda s, hf=ref["pil"]: hf(images=s, return_tensors="pt")}
        checks = {"HF PIL (Qwen2VLImageProcessorPil)": "baseline"}
        if tv_cls:
            ref["torch"] = tv_cls(**kw)
            paths["HF tv (Qwen2VLImageProcessor)"] = lambda s, hf=ref["torch"]: hf(images=s, return_tensors="pt")
            checks["HF tv (Qwen2VLImageProcessor)"] = "baseline"
        # the one PIL bicubic resize per image that HF's PIL path and our resize=pil make: no single-threaded
        # PIL-exact path can beat HF PIL by more than this row's ratio
        paths["PIL resize alone (1 thread)"] = resize_only(ImageProcessor(VisionConfig.from_hf(ref["pil"], threads=1)))
        checks["PIL resize alone (1 thread)"] = "ceiling of 1-thread PIL-exact paths"
        for resize in ("torch", "pil"):
            backend = ref.get(resize, ref["pil"])
            for n in dict.fromkeys((1, threads)):
                ours = ImageProcessor(VisionConfig.from_hf(ref["pil"], resize=resize, threads=n))
                label = f"ours (resize={resize}, {n} thread{'s' if n > 1 else ''})"
                paths[label] = ours
                verdict = _compare(backend, ours, samples)
                checks[label] = f"{verdict} to HF {'tv' if backend is ref.get('torch') else 'PIL'}"
                if resize in ref and verdict != "bitwise equal":
                    raise SystemExit(f"{name} {label}: {verdict}; must be bitwise equal to its HF backend")
        tokens = sum(int(ref["pil"](images=s, return_tensors="pt")["image_grid_thw"].prod(-1).sum()) // 4
                     for s in samples)
        best = _best_times(paths, samples, repeats)
        base = best["HF PIL (Qwen2VLImageProcessorPil)"]
        base_tv = best.get("HF tv (Qwen2VLImageProcessor)")
        for p in paths:
            tv = f"{base_tv / best[p]:>8.2f}x" if base_tv else ""
            print(f"{name:<11} {p:<34} {len(samples) / best[p]:>10.1f} {tokens / best[p]:>11.0f} "
                  f"{base / best[p]:>9.2f}x {tv:>9}  {checks[p]}")
    print(f"   (load average at the end: {os.getloadavg()[0]:.1f})")


def length_mix(n: int = 4000, seed: int = 0) -> dict[str, list[int]]:
    """Token lengths of a realistic mix: text-only, single-image, multi-image and video samples.

    Image token counts are exact (smart_resize of photo-like sizes at HF's default 1280-token budget, merge 2);
    videos use qwen-vl-utils' default per-frame budget at 2 fps over 4-30 s; text lengths are log-normal."""
    from data.vision import smart_resize

    rng = random.Random(seed)

    def text(mu):
        return int(min(6000, rng.lognormvariate(mu, 0.8)))

    def image():
        w = rng.choice([320, 640, 800, 1024, 1280, 1920])
        h = int(w * rng.choice([0.5, 0.5625, 0.75, 1.0, 1.33]))
        rh, rw = smart_resize(h, w, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
        return rh * rw // (28 * 28) + 2

    def video():
        frames = 2 * int(rng.uniform(4, 30))  # 2 fps
        rh, rw = smart_resize(360, 640, factor=28, min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28 // 4)
        return frames // 2 * (rh * rw // (28 * 28)) + 2

    kinds = {"text-only": lambda: text(6.0), "single-image": lambda: image() + text(4.5),
             "multi-image": lambda: sum(image() for _ in range(rng.randint(2, 4))) + text(4.5),
             "video": lambda: video() + text(4.0)}
    weights = {"text-only": 0.4, "single-image": 0.35, "multi-image": 0.15, "video": 0.1}
    out = {k: [] for k in kinds}
    for _ in range(n):
        k = rng.choices(list(weights), weights=list(weights.values()))[0]
        out[k].append(kinds[k]())
    return out


def packing(args) -> None:
    """Packing fill (%) at seq_len 8192 vs pad-to-longest batching on the same length mix."""
    from data.pack import fill_ratio, padded_fill

    mix = length_mix()
    lengths = [x for v in mix.values() for x in v]
    random.Random(1).shuffle(lengths)
    fitting = [x for x in lengths if x <= 8192]
    print(f"== packing: {len(lengths)} samples ({', '.join(f'{k} {len(v)}' for k, v in mix.items())}), "
          f"median {sorted(lengths)[len(lengths) // 2]} tokens, {len(lengths) - len(fitting)} longer than 8192 dropped")
    for buffer in (16, 64):
        print(f"  first-fit packing, seq_len 8192, buffer {buffer:3d}: fill {100 * fill_ratio(fitting, 8192, buffer):.1f}%")
    for b in (2, 4, 8):
        print(f"  baseline pad-to-longest, batch {b}:               fill {100 * padded_fill(fitting, b):.1f}%")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2,
                    help="VisionConfig.threads of our multi-threaded rows (the single-thread rows use 1)")
    ap.add_argument("--min-pixels", type=int, default=56 * 56)
    ap.add_argument("--max-pixels", type=int, default=28 * 28 * 1280, help="HF default (1280 tokens for patch 14)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # ours parallelises with VisionConfig.threads; HF's path is single-threaded
    np.random.seed(0)
    vision(args.repeats, args.min_pixels, args.max_pixels, args.threads)
    packing(args)


if __name__ == "__main__":
    main()
