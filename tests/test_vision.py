"""Images: smart_resize equals both references; our processor's pixel_values/image_grid_thw are bitwise equal
to HF's PIL backend `Qwen2VLImageProcessorPil` (resize=pil; the processor training/models.py builds) and to HF's
torchvision backend `Qwen2VLImageProcessor` (resize=torch, in a subprocess with real torchvision) for every family
on real photographs, random sizes and odd modes; media decoding refuses pickles and reports bad bytes."""
import ast
import importlib.util
import io
import math
import random
import typing
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from data.errors import BadSample
from data.vision import ImageProcessor, VisionConfig, decode_image, smart_resize
from training.models import FAMILIES

QWEN_VL_UTILS = Path(importlib.util.find_spec("qwen_vl_utils").submodule_search_locations[0]) / "vision_process.py"


def load_functions(path: Path, names: set, extra: dict) -> dict:
    """Top-level functions of a source file, without running its imports (qwen-vl-utils imports torchvision)."""
    tree = ast.parse(path.read_text())
    ns = {**{k: getattr(typing, k) for k in ("Any", "Dict", "List", "Optional", "Tuple", "Union")}, **extra}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            exec(compile(ast.Module([node], []), str(path), "exec"), ns)
        if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets):
            try:
                exec(compile(ast.Module([node], []), str(path), "exec"), ns)
            except NameError:  # constants that read the environment
                pass
    return ns


QVU = load_functions(QWEN_VL_UTILS, {"smart_resize", "round_by_factor", "ceil_by_factor", "floor_by_factor"},
                     {"math": math})


def _sizes(n=3000, seed=0):
    rng = random.Random(seed)
    out = [(1, 1), (27, 28), (28, 28), (5, 999), (3, 599), (2, 399), (4000, 20), (10000, 10000), (1, 200)]
    for _ in range(n):
        h = int(math.exp(rng.uniform(0, math.log(8000))))
        ratio = math.exp(rng.uniform(-math.log(200), math.log(200)))
        out.append((max(1, h), max(1, min(20000, int(h * ratio)))))
    return out


@pytest.mark.parametrize("factor", [28, 32])
def test_smart_resize_equals_transformers_and_qwen_vl_utils(factor):
    budgets = [(56 * 56, 28 * 28 * 1280), (4 * factor**2, 16384 * factor**2), (3136, 128 * 128), (100, 100 * 100)]
    checked = 0
    for h, w in _sizes():
        for lo, hi in budgets:
            if max(h, w) / min(h, w) > 200:
                with pytest.raises(ValueError, match="aspect ratio"):
                    smart_resize(h, w, factor, lo, hi)
                with pytest.raises(ValueError, match="aspect ratio"):
                    hf_smart_resize(h, w, factor, lo, hi)
                continue
            assert smart_resize(h, w, factor, lo, hi) == hf_smart_resize(h, w, factor, lo, hi), (h, w, lo, hi)
            assert smart_resize(h, w, factor, lo, hi, rule="qwen_vl_utils") == \
                QVU["smart_resize"](h, w, factor, lo, hi), (h, w, lo, hi)
            checked += 1
    assert checked > 10000
    # the two references really differ at the edges: both rules are needed
    assert hf_smart_resize(10, 1000, 28, 3136, 1003520) != QVU["smart_resize"](10, 1000, 28, 3136, 1003520)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 201, 28, 3136, 1003520, rule="qwen_vl_utils")


def _hf(family: str, **kw) -> Qwen2VLImageProcessorPil:
    f = FAMILIES[family]
    return Qwen2VLImageProcessorPil(patch_size=f.patch_size, temporal_patch_size=2, merge_size=2,
                                    image_mean=f.image_mean, image_std=f.image_std, **kw)


def _assert_same(hf, ours, images):
    want = hf(images=images, return_tensors="pt")
    got = ours(images)
    assert torch.equal(got["image_grid_thw"], want["image_grid_thw"])
    assert got["pixel_values"].dtype == want["pixel_values"].dtype == torch.float32
    assert torch.equal(got["pixel_values"], want["pixel_values"]), \
        (got["pixel_values"] - want["pixel_values"]).abs().max()


PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "hubble_deep_field", "immunohistochemistry"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("budget", [(56 * 56, 28 * 28 * 1280), (56 * 56, 128 * 128), (256 * 256, 512 * 512)])
def test_photographs_are_bitwise_equal_to_hf(family, budget):
    lo, hi = budget
    hf = _hf(family, min_pixels=lo, max_pixels=hi)
    ours = ImageProcessor(VisionConfig.from_hf(hf))
    photos = [Image.fromarray(getattr(skimage.data, n)()) for n in PHOTOS]
    assert any(p.mode == "L" for p in photos)  # camera is greyscale
    for p in photos:
        _assert_same(hf, ours, [p])
    _assert_same(hf, ours, photos[:3])  # several images in one call: rows concatenated in order


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_random_sizes_aspects_and_modes_are_bitwise_equal(family):
    hf = _hf(family, min_pixels=56 * 56, max_pixels=200 * 200)
    ours = ImageProcessor(VisionConfig.from_hf(hf))
    rng = np.random.default_rng(1)
    base = skimage.data.astronaut()
    for i in range(25):
        h = int(rng.integers(8, 700))
        w = int(np.clip(h * math.exp(rng.uniform(-4.5, 4.5)), 3, 3000))
        if max(h, w) / min(h, w) > 200:
            continue
        img = Image.fromarray(base).resize((w, h))
        mode = ["RGB", "RGBA", "L", "P", "LA", "CMYK"][i % 6]
        if mode == "RGBA":
            arr = np.dstack([np.asarray(img), rng.integers(0, 256, (h, w), dtype=np.uint8)])
            img = Image.fromarray(arr, "RGBA")
        elif mode == "P":
            img = img.convert("P")
            img.info["transparency"] = 3  # a palette entry made transparent: composited onto white
        else:
            img = img.convert(mode)
        _assert_same(hf, ours, [img])


def test_torch_resize_is_close_to_the_pil_backend_but_not_bitwise():
    """HF's two backends differ: resize=torch (torchvision arithmetic) vs HF's PIL backend stays within 2 grey
    levels on these photos, and is not bitwise equal (else one of the two parity tests would prove nothing)."""
    hf = _hf("qwen2_vl", min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    ours = ImageProcessor(VisionConfig.from_hf(hf, resize="torch"))
    worst = 0.0
    for n in ("astronaut", "coffee", "chelsea"):
        img = Image.fromarray(getattr(skimage.data, n)())
        want, got = hf(images=[img], return_tensors="pt"), ours([img])
        assert torch.equal(got["image_grid_thw"], want["image_grid_thw"])
        worst = max(worst, (got["pixel_values"] - want["pixel_values"]).abs().max().item())
    assert 0 < worst <= 2 / 255 / min(FAMILIES["qwen2_vl"].image_std) + 1e-6


def test_torch_one_shot_resize_is_horizontal_then_vertical():
    """What the threaded resize=torch path relies on: torch's uint8 antialiased bicubic equals a width-only pass
    followed by a height-only pass, and a pass on a strip along the other axis equals that strip of the whole."""
    F = torch.nn.functional

    def rs(t, size):
        return F.interpolate(t, size=size, mode="bicubic", antialias=True, align_corners=False)

    rng = np.random.default_rng(3)
    for _ in range(25):
        H, W, h, w = (int(v) for v in rng.integers(8, 700, 4))
        x = torch.from_numpy(rng.integers(0, 256, (H, W, 4), dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0)
        want = rs(x, (h, w))
        mid = rs(x, (H, w))
        assert torch.equal(want, rs(mid, (h, w)))
        a, b = sorted(int(v) for v in rng.integers(0, w, 2)) if w > 1 else (0, 1)
        b = max(b, a + 1)
        assert torch.equal(want[..., a:b], rs(mid[..., a:b], (h, b - a)))
        assert torch.equal(want[:, :3], rs(x[:, :3].contiguous(), (h, w)))  # RGBX in, the RGB planes as from RGB


def test_torch_resize_is_bitwise_equal_to_hf_torchvision_backend():
    """resize=torch against HF's own `Qwen2VLImageProcessor` on its torchvision backend (HF's default where
    torchvision is installed), run in a subprocess with real torchvision (tests/hf_torchvision.py): every family,
    1-3 threads with strips forced on small images, real photos and random sizes (up- and downscales, both axes
    changing or one), noise and smooth content."""
    from tests.hf_torchvision import INSTALL, location, run_with_torchvision

    if location() is None:
        pytest.skip(f"torchvision not installed for the parity test; `.ci/run` installs it: {INSTALL}")
    code = """
import numpy as np, skimage.data, torch
from PIL import Image
from transformers import Qwen2VLImageProcessor
from transformers.image_processing_backends import TorchvisionBackend
from data import vision as V
from data.vision import ImageProcessor, VisionConfig
from training.models import FAMILIES
assert issubclass(Qwen2VLImageProcessor, TorchvisionBackend)
V.MIN_SPLIT_PIXELS = 0
rng = np.random.default_rng(0)
photos = [getattr(skimage.data, n)() for n in ("astronaut", "coffee", "chelsea", "rocket")]
checked = 0
for name, fam in FAMILIES.items():
    hf = Qwen2VLImageProcessor(patch_size=fam.patch_size, temporal_patch_size=2, merge_size=2,
                               image_mean=fam.image_mean, image_std=fam.image_std, min_pixels=56 * 56,
                               max_pixels=28 * 28 * 640)
    for threads in (1, 2, 3):
        ours = ImageProcessor(VisionConfig.from_hf(hf, resize="torch", threads=threads))
        for i in range(14):
            if i < 4:
                img = Image.fromarray(photos[i])
            else:
                h, w = int(rng.integers(10, 1400)), int(rng.integers(10, 1400))
                if i % 3 == 0:
                    h = fam.patch_size * 2 * int(rng.integers(1, 20))  # only the width changes (if it does)
                a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                img = Image.fromarray(a if i % 2 else np.cumsum(a, axis=1, dtype=np.uint8))
            want, got = hf(images=[img], return_tensors="pt"), ours([img])
            assert torch.equal(want["image_grid_thw"], got["image_grid_thw"]), (name, img.size)
            assert torch.equal(want["pixel_values"], got["pixel_values"]), (name, threads, img.size)
            checked += 1
print("checked", checked)
"""
    r = run_with_torchvision(code)
    # 3 thread counts x 14 images per family
    assert r.returncode == 0 and f"checked {42 * len(FAMILIES)}" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def _bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_decode_image_from_bytes_matches_pil():
    img = Image.fromarray(skimage.data.coffee())
    for fmt, name in (("PNG", "0.png"), ("JPEG", "1.jpg"), ("WEBP", "2.webp")):
        data = _bytes(img, fmt)
        want = Image.open(io.BytesIO(data)).convert("RGB")
        got = decode_image(data, name, "k")
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(want))
    arr = skimage.data.chelsea()
    buf = io.BytesIO()
    np.save(buf, arr)
    assert np.array_equal(np.asarray(decode_image(buf.getvalue(), "3.npy", "k")), arr)


@pytest.mark.parametrize("name", ["0.pyd", "0.pickle", "0.pkl", "0.pth", "0.pt", "x.PKL", "0.npz"])
def test_pickle_members_are_refused_before_decoding(name):
    with pytest.raises(BadSample) as e:
        decode_image(b"\x80\x04anything", name, "s7")
    assert e.value.reason == "pickle_member" and e.value.key == "s7"


def test_npy_with_objects_is_refused_and_garbage_is_undecodable():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BadSample) as e:
        decode_image(buf.getvalue(), "0.npy", "s1")
    assert e.value.reason == "pickle_member"
    png = _bytes(Image.fromarray(skimage.data.coffee()), "PNG")
    for bad in (b"not an image", png[: len(png) // 2], b""):
        with pytest.raises(BadSample) as e:
            decode_image(bad, "0.png", "s2")
        assert e.value.reason == "undecodable_image" and e.value.key == "s2"


# ---------------------------------------------------------------- threads: split resize + per-strip patchify

from data import vision as V  # noqa: E402


def _hf_and_ours(family, threads, **kw):
    hf = _hf(family, **kw)
    return hf, ImageProcessor(VisionConfig.from_hf(hf, threads=threads))


def _order(w, h, rw, rh) -> str:
    """The pass order this Pillow uses for the resize (and so the threaded path)."""
    return "h" if V.PASS_ORDER_RULES[V.PASS_ORDER](w, h, rw, rh) else "v"


def test_pass_order_probe_picks_the_order_pillow_uses():
    """Independently of the probe's own cases: on random noise, Pillow's one-shot bicubic resize equals its two
    single-axis passes in the order the probed rule names, and the other order gives other pixels (so the order
    matters and both kinds occur)."""
    assert V.PASS_ORDER is not None
    rng = np.random.default_rng(7)
    seen = {"h": 0, "v": 0}
    differs = 0
    cases = [(640, 480, 644, 476), (480, 640, 476, 644), (300, 900, 280, 600), (900, 300, 600, 280), (64, 64, 60, 16)]
    for _ in range(60):
        w, h = (int(x) for x in rng.integers(3, 300, 2))
        cases.append((w, h, int(rng.integers(2, 300)), int(rng.integers(2, 300))))
    for w, h, rw, rh in cases:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        want = np.asarray(img.resize((rw, rh), Image.Resampling.BICUBIC))
        order = _order(w, h, rw, rh)
        assert np.array_equal(want, np.asarray(V.two_pass(img, rw, rh, order == "h"))), (w, h, rw, rh, order)
        differs += not np.array_equal(want, np.asarray(V.two_pass(img, rw, rh, order != "h")))
        seen[order] += 1
    assert seen["h"] > 5 and seen["v"] > 5 and differs > 30, (seen, differs)
    # the 640x480 photo of the bench goes to 644x476 for patch 14: Pillow runs the vertical pass first there
    assert _order(640, 480, 644, 476) == "v"


def test_pass_order_probe_follows_the_pillow_it_runs_on(monkeypatch):
    """A Pillow that always resamples horizontally first (as before 13.0's rule) is recognised as such; one that
    follows neither rule (always vertical first) gives None, so resizes are not split."""
    one_shot = Image.Image.resize

    def fake(first_horizontal):
        def resize(self, size, resample=None, *a, **kw):
            w, h = self.size
            if size[0] != w and size[1] != h:
                mid = (size[0], h) if first_horizontal else (w, size[1])
                return one_shot(one_shot(self, mid, resample), size, resample)
            return one_shot(self, size, resample, *a, **kw)
        return resize

    assert V.probe_pass_order() == V.PASS_ORDER
    monkeypatch.setattr(Image.Image, "resize", fake(True))
    assert V.probe_pass_order() == "always_horizontal_first"
    monkeypatch.setattr(Image.Image, "resize", fake(False))
    assert V.probe_pass_order() is None


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("threads", [2, 3])
def test_threaded_photographs_are_bitwise_equal_to_hf(family, threads):
    for lo, hi in [(56 * 56, 28 * 28 * 1280), (56 * 56, 128 * 128), (512 * 512, 1024 * 1024)]:
        hf, ours = _hf_and_ours(family, threads, min_pixels=lo, max_pixels=hi)
        photos = [Image.fromarray(getattr(skimage.data, n)()) for n in PHOTOS]
        for p in photos:
            _assert_same(hf, ours, [p])
        _assert_same(hf, ours, photos[:4])


def _threaded_cases(patch):
    """(image, min_pixels, max_pixels): random sizes of both pass orders, tall and wide, upscales, images that
    need no resize, and sizes whose strips are one row or one column wide."""
    rng = np.random.default_rng(3)
    base = skimage.data.chelsea()
    f = 2 * patch
    sizes = [(640, 480, 56 * 56, 28 * 28 * 1280), (480, 640, 56 * 56, 28 * 28 * 1280),  # 640x480 -> 644x476
             (1280, 720, 56 * 56, 28 * 28 * 1280), (300, 1500, 56 * 56, 150 * 150), (1500, 300, 56 * 56, 150 * 150),
             (37, 29, 300 * 300, 600 * 600), (50, 9, 200 * 200, 400 * 400),  # upscales
             (16 * f, 9 * f, 56 * 56, 28 * 28 * 1280), (3 * f, 7 * f, 56 * 56, 28 * 28 * 1280),  # no resize
             (500, 3, 56 * 56, 28 * 28 * 1280), (3, 500, 56 * 56, 28 * 28 * 1280),  # 1-row / 1-column strips
             (5, 999, 56 * 56, 56 * 56), (999, 5, 56 * 56, 56 * 56), (2, 2, 56 * 56, 28 * 28 * 1280)]
    for _ in range(24):
        h = int(rng.integers(4, 900))
        w = int(np.clip(h * math.exp(rng.uniform(-3.5, 3.5)), 2, 2500))
        sizes.append((w, h, 56 * 56, int(rng.choice([64 * 64, 200 * 200, 400 * 400]))))
    for w, h, lo, hi in sizes:
        src = base if (w * h) % 2 else skimage.data.astronaut()
        yield Image.fromarray(src).resize((w, h), Image.Resampling.BICUBIC), lo, hi


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_threaded_resize_is_bitwise_equal_on_random_sizes_and_both_orders(family, monkeypatch):
    monkeypatch.setattr(V, "MIN_SPLIT_PIXELS", 0)  # split even tiny images: strips of one row happen
    monkeypatch.setattr(V, "CHUNK_ROWS", 8)  # several patchify steps per strip, unresized images split too
    kinds = set()
    for img, lo, hi in _threaded_cases(FAMILIES[family].patch_size):
        w, h = img.size
        if max(w, h) / min(w, h) > 200:
            continue
        for threads in (2, 5):
            hf, ours = _hf_and_ours(family, threads, min_pixels=lo, max_pixels=hi)
            rh, rw = ours.size(img)
            _assert_same(hf, ours, [img])
            if (rw, rh) == (w, h):
                kinds.add("no resize")
            elif rw != w and rh != h:
                kinds.add("two passes, " + _order(w, h, rw, rh) + " first")
            else:
                kinds.add("one pass")
            if rw > w and rh > h:
                kinds.add("upscale")
            if threads == 5 and min(w, h) < 5 and (rw, rh) != (w, h):
                kinds.add("1-pixel strips")
    assert kinds >= {"no resize", "two passes, h first", "two passes, v first", "upscale", "1-pixel strips"}, kinds


def test_threaded_fallbacks_are_bitwise_equal(monkeypatch):
    """Without Pillow's Arrow export (RGB bytes path), with the lookup table instead of the packed arithmetic,
    and with no known pass order (one-shot resize, threads only patchify), outputs stay HF's."""
    photos = [Image.fromarray(getattr(skimage.data, n)()) for n in ("astronaut", "camera", "coffee")]
    for family in ("qwen2_vl", "qwen3_vl"):
        hf, ours = _hf_and_ours(family, 2, min_pixels=56 * 56, max_pixels=300 * 300)
        ours.norm.packed_exact = False
        _assert_same(hf, ours, photos)
        hf, ours = _hf_and_ours(family, 2, min_pixels=56 * 56, max_pixels=300 * 300)
        with monkeypatch.context() as mp:
            mp.setattr(V, "ARROW_VIEW", False)
            _assert_same(hf, ours, photos)
        with monkeypatch.context() as mp:
            mp.setattr(V, "PASS_ORDER", None)
            _assert_same(hf, ours, photos)


def test_packed_arithmetic_is_checked_against_the_table():
    for family in sorted(FAMILIES):
        norm = V.Normaliser(VisionConfig.from_hf(_hf(family)))
        assert norm.exact and norm.packed_exact
    # a rescale factor whose divisor is not exact: both arithmetic paths are refused, the table is used
    odd = V.Normaliser(VisionConfig(rescale_factor=1 / 254.9))
    assert not odd.exact and not odd.packed_exact


def test_threads_setting_and_processes(monkeypatch):
    import pickle

    assert 1 <= V.default_threads() <= 2
    with monkeypatch.context() as mp:  # in one of 64 DataLoader workers: the CPUs are shared, one thread each
        mp.setattr(torch.utils.data, "get_worker_info", lambda: type("Info", (), {"num_workers": 64})())
        assert V.default_threads() == 1
    with pytest.raises(ValueError, match="threads"):
        VisionConfig(threads=0)
    hf, ours = _hf_and_ours("qwen2_vl", 2, min_pixels=56 * 56, max_pixels=300 * 300)
    img = Image.fromarray(skimage.data.astronaut())
    _assert_same(hf, ours, [img])
    assert ours._pool is not None
    clone = pickle.loads(pickle.dumps(ours))  # spawn-style workers get a copy without the parent's threads
    assert clone._pool is None and clone.cfg.threads == 2
    _assert_same(hf, clone, [img])
    ours._pid = -1  # as after a fork: the parent's pool is not used, a new one is made
    old = ours._pool
    _assert_same(hf, ours, [img])
    assert ours._pool is not old
    rows, grid = ours.one(img)
    assert torch.equal(rows, hf(images=[img], return_tensors="pt")["pixel_values"]) and grid[0] == 1
    # an error in any job (this thread's or a helper's) is raised after all jobs ended
    done = []

    def job(i):
        if i == 3:
            raise KeyError(i)
        done.append(i)

    with pytest.raises(KeyError):
        ours._run([lambda i=i: job(i) for i in range(6)])
    assert 3 not in done


def test_pixels_are_read_in_place_and_outlive_the_image():
    """RGB images are read through Pillow's Arrow export as RGBX without a copy; the view keeps the image memory
    alive after the image is gone. Images Pillow cannot export (several memory blocks) fall back to a copy."""
    import gc

    assert V.ARROW_VIEW
    arr = skimage.data.astronaut()
    img = Image.fromarray(arr)
    px = V.pil_pixels(img)
    assert px.shape == (*arr.shape[:2], 4) and px.dtype == torch.uint8
    del img
    gc.collect()
    Image.fromarray(255 - arr)  # reuse freed memory, if it had been freed
    assert np.array_equal(px[..., :3].numpy(), arr)
    big = Image.new("RGB", (4200, 1100), (1, 2, 3))  # 18 MB: over Pillow's 16 MB block
    got = V.pil_pixels(big)
    assert got.shape == (1100, 4200, 3) and int(got[5, 7, 2]) == 3
