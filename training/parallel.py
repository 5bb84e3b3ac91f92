"""`parallel=` keys: how the processes of a run are laid out beyond data parallelism.

Sequence parallelism (Ulysses, training/sp.py): `sp_size` consecutive ranks form one SP group that trains one
packed row together, each rank holding 1/sp_size of its tokens through the decoder; the data-parallel size (data
shards, loss normalisation, resume) is world / sp_size. `sp_vision`: how an SP group runs the ViT on the row's
images and videos: "split" (each rank encodes a share of whole images, the features are all-gathered) or
"replicate" (every rank encodes all of them).
"""
from __future__ import annotations

from dataclasses import dataclass

SP_VISION = ("split", "replicate")


@dataclass
class ParallelConfig:
    sp_size: int = 1
    sp_vision: str = "split"


def valid_sp_sizes(heads: int, kv_heads: int, limit: int = 64) -> list[int]:
    """SP sizes Ulysses can run for a decoder with `heads` query and `kv_heads` KV heads: the query heads divide
    evenly, and the KV heads divide evenly or are replicated (sp a multiple of kv_heads)."""
    return [n for n in range(1, limit + 1) if heads % n == 0 and (kv_heads % n == 0 or n % kv_heads == 0)]


def check(cfg: ParallelConfig, world: int, heads: tuple[int, int] | None) -> None:
    """Layouts that can never run, before any compute (ValueError naming the key and the sizes that work).
    `heads`: the decoder's (query, key/value) head counts, None where the model is not known yet."""
    sp = cfg.sp_size
    if not isinstance(sp, int) or sp < 1:
        raise ValueError(f"parallel.sp_size={sp} must be an integer >= 1 (1: no sequence parallelism)")
    if cfg.sp_vision not in SP_VISION:
        raise ValueError(f"parallel.sp_vision={cfg.sp_vision!r}; choose one of {list(SP_VISION)}")
    if world % sp:
        raise ValueError(f"parallel.sp_size={sp} does not divide the {world} processes of this run: SP groups are "
                         f"{sp} consecutive ranks; launch a multiple of {sp} processes or pick a divisor of {world}")
    if heads is None:
        return
    heads, kv_heads = heads
    ok = valid_sp_sizes(heads, kv_heads)
    if sp not in ok:
        raise ValueError(f"parallel.sp_size={sp} cannot split this model's attention heads ({heads} query, "
                         f"{kv_heads} key/value): Ulysses needs the query heads divisible by sp_size and the "
                         f"key/value heads divisible by it or it a multiple of them; sizes that work: {ok}")
