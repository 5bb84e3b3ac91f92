"""data/rope.py against the real HF get_rope_index of each family's tiny model, on random layouts of text,
images of random grids and videos (Qwen2.5-VL time rule, Qwen3-VL per-frame timestamps)."""
import random

import pytest
import torch

from data.errors import BadSample
from data.rope import RopeSpec, position_ids, token_types
from training.models import FAMILIES, ModelConfig, build


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def bundle(request):
    return build(ModelConfig(name=f"tiny_{request.param}", family=request.param))


def _text_ids(bundle):
    special = set(bundle.tokenizer.all_special_ids) | set(bundle.tokenizer.get_added_vocab().values())
    return [i for i in range(len(bundle.tokenizer)) if i not in special]


def random_sample(bundle, rng: random.Random, n_images: int, n_videos: int) -> dict:
    """A token layout as the processors write it: vision runs always separated by text; grids random."""
    cfg = bundle.model.config
    spec = RopeSpec.from_config(cfg)
    words = _text_ids(bundle)
    m = spec.spatial_merge_size

    def text(k):
        return [rng.choice(words) for _ in range(k)]

    items = ["image"] * n_images + ["video"] * n_videos
    rng.shuffle(items)
    ids, igrids, vgrids, seconds = text(rng.randint(0, 5)), [], [], []
    for i, item in enumerate(items):
        h, w = m * rng.randint(1, 6), m * rng.randint(1, 6)
        if item == "image":
            igrids.append([1, h, w])
            ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * (h * w // m**2) + [cfg.vision_end_token_id]
        else:
            t = rng.randint(1, 4)
            vgrids.append([t, h, w])
            seconds.append(2 / rng.choice([0.5, 1.0, 1.5, 2.0, 3.0, 24.0]))  # temporal_patch_size / fps
            if spec.family == "qwen3_vl":  # processor: per temporal patch "<x.x seconds>" + its own vision block
                for f in range(t):
                    ids += bundle.tokenizer.encode(f"<{f * seconds[-1]:.1f} seconds>", add_special_tokens=False)
                    ids += [cfg.vision_start_token_id] + [cfg.video_token_id] * (h * w // m**2)
                    ids += [cfg.vision_end_token_id]
            else:
                ids += ([cfg.vision_start_token_id] + [cfg.video_token_id] * (t * h * w // m**2)
                        + [cfg.vision_end_token_id])
        ids += text(rng.randint(0 if i == len(items) - 1 else 1, 6))
    ids = torch.tensor(ids, dtype=torch.long)
    sample = {"input_ids": ids, "mm_token_type_ids": token_types(spec, ids), "key": "rand"}
    if igrids:
        sample["image_grid_thw"] = torch.tensor(igrids)
    if vgrids:
        sample["video_grid_thw"] = torch.tensor(vgrids)
        if spec.family == "qwen2_5_vl":
            sample["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
    return sample


def hf_position_ids(model, sample: dict) -> torch.Tensor:
    kw = {k: sample[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in sample}
    pos, _ = model.model.get_rope_index(sample["input_ids"][None], mm_token_type_ids=sample["mm_token_type_ids"][None],
                                        **kw)
    return pos[:, 0]


def test_spec_from_config(bundle):
    spec = RopeSpec.from_config(bundle.model.config)
    assert spec.family == {"qwen3_vl_moe": "qwen3_vl"}.get(bundle.family.name, bundle.family.name)  # MoE: its rule
    assert spec.spatial_merge_size == 2 and spec.image_token_id == bundle.model.config.image_token_id
    assert (spec.tokens_per_second is not None) == (spec.family == "qwen2_5_vl")


def test_unknown_model_type_is_a_clear_error():
    class Cfg:
        model_type = "llava"
    with pytest.raises(ValueError, match="llava"):
        RopeSpec.from_config(Cfg())


@pytest.mark.parametrize("seed", range(12))
def test_equals_hf_get_rope_index_on_random_layouts(bundle, seed):
    rng = random.Random(seed * 7 + len(bundle.family.name))
    sample = random_sample(bundle, rng, n_images=rng.randint(0, 3), n_videos=rng.randint(0 if seed % 3 else 1, 2))
    ours = position_ids(RopeSpec.from_config(bundle.model.config), sample)
    assert ours.shape == (3, len(sample["input_ids"])) and ours.dtype == torch.long
    if "image_grid_thw" in sample or "video_grid_thw" in sample:
        assert torch.equal(ours, hf_position_ids(bundle.model, sample))
    else:  # HF asks text-only inputs to use its default positions: arange on every axis
        assert torch.equal(ours, torch.arange(len(sample["input_ids"])).expand(3, -1))


def test_qwen2_5_time_rule_is_used(bundle):
    """The time scaling must change the t axis (a test that would pass with interval 1 would prove nothing)."""
    if bundle.family.name != "qwen2_5_vl":
        pytest.skip("Qwen2.5-VL only")
    sample = random_sample(bundle, random.Random(0), n_images=0, n_videos=1)
    sample["video_grid_thw"][0, 0] = 4
    n = int(sample["video_grid_thw"][0].prod()) // 4
    sample["input_ids"] = torch.cat([torch.tensor([50]), torch.full((n,), bundle.model.config.video_token_id),
                                     torch.tensor([51])])
    sample["mm_token_type_ids"] = token_types(RopeSpec.from_config(bundle.model.config), sample["input_ids"])
    spec = RopeSpec.from_config(bundle.model.config)
    for sec in (0.25, 1.0, 2 / 3):
        sample["second_per_grid_ts"] = torch.tensor([sec])
        ours = position_ids(spec, sample)
        assert torch.equal(ours, hf_position_ids(bundle.model, sample))
        t_axis = ours[0, 1:-1].view(4, -1)[:, 0] - 1  # first token of each temporal patch, minus the text before
        assert torch.equal(t_axis, (torch.arange(4) * spec.tokens_per_second * torch.tensor(sec)).long())


def test_token_count_mismatch_is_a_bad_sample(bundle):
    sample = random_sample(bundle, random.Random(3), n_images=2, n_videos=0)
    sample["image_grid_thw"] = sample["image_grid_thw"][:1]
    with pytest.raises(BadSample, match="token_count_mismatch"):
        position_ids(RopeSpec.from_config(bundle.model.config), sample)
    sample = random_sample(bundle, random.Random(3), n_images=1, n_videos=0)
    sample["image_grid_thw"] = sample["image_grid_thw"] * torch.tensor([1, 2, 1])
    with pytest.raises(BadSample, match="token_count_mismatch"):
        position_ids(RopeSpec.from_config(bundle.model.config), sample)
