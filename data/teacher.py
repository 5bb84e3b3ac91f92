"""A teacher's top-k log-probs stored beside a record, for distillation runs whose teacher is too big to co-host.

A sample may carry one member `<key>.teacher.safetensors` (safetensors format: a JSON header and raw buffers, so
reading it runs no code and unpickles nothing) written by `python -m training.teacher_outputs`:

  ids     int32   [N, k]  the teacher's k most likely next tokens, most likely first
  logps   float32 [N, k]  their log-probabilities under the teacher's full distribution (temperature 1)
  targets   int32 [N]     the label each row predicts
  input_ids int32 [T]     the encoded sample: with targets, the check that the rows belong to this encoding

one row per supervised target token of the encoded sample, in order (the tokens j >= 1 whose label is not
IGNORE: token 0 is never a target once packed). The header's metadata says `format` (FORMAT) and `teacher`
(where the outputs came from).

Top-k log-probs at temperature 1 are enough for any temperature: the training loss renormalises over the k
tokens, and log_softmax(logps / T) over them equals log_softmax(logits / T) there, because logps and logits
differ by one constant per row. So a stored run equals the co-hosted teacher with the same `top_k` (<= k).

`attach` validates a member against the sample it came with and raises BadSample (skipped and counted) if it
is unreadable, malformed or made for another encoding (other pixels budget, template or tokenizer).
"""
from __future__ import annotations

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _load, save as _save

from data.errors import BadSample

MEMBER = "teacher.safetensors"
FORMAT = "teacher-topk-v1"
REDO = ("re-run `python -m training.teacher_outputs` with the stage's model and data settings (the same "
        "tokenizer, chat template and model.min_pixels/max_pixels), or drop the member")


def targets_of(labels: torch.Tensor, ignore: int) -> torch.Tensor:
    """The supervised target tokens of one encoded sample in the order the model step scores them."""
    lab = labels[1:]
    return lab[lab != ignore]


def dump(ids: torch.Tensor, logps: torch.Tensor, targets: torch.Tensor, input_ids: torch.Tensor, teacher: str) -> bytes:
    """The member's bytes."""
    return _save({"ids": ids.to(torch.int32).contiguous(), "logps": logps.float().contiguous(),
                  "targets": targets.to(torch.int32).contiguous(), "input_ids": input_ids.to(torch.int32).contiguous()},
                 metadata={"format": FORMAT, "teacher": str(teacher)})


def attach(sample: dict, data: bytes, vocab: int, ignore: int) -> None:
    """Adds `teacher_ids` [N, k] (long) and `teacher_logps` [N, k] to an encoded sample from its member's bytes."""
    key = str(sample.get("key", "?"))
    try:
        tensors = _load(bytes(data))
    except (SafetensorError, ValueError, TypeError, OverflowError) as e:
        raise BadSample("bad_teacher_outputs", key, f"member {MEMBER} is not a readable safetensors file "
                                                    f"({type(e).__name__}: {e})"[:400]) from None
    want = {"ids": torch.int32, "logps": torch.float32, "targets": torch.int32, "input_ids": torch.int32}
    have = {k: t.dtype for k, t in tensors.items()}
    if have != want:
        raise BadSample("bad_teacher_outputs", key, f"member {MEMBER} holds {have}; it must hold exactly {want} "
                                                    f"({FORMAT}, data/teacher.py)")
    ids, logps, targets = tensors["ids"], tensors["logps"], tensors["targets"]
    if ids.dim() != 2 or logps.shape != ids.shape or targets.shape != ids.shape[:1] or ids.shape[1] < 1:
        raise BadSample("bad_teacher_outputs", key, f"member {MEMBER}: shapes ids {list(ids.shape)}, logps "
                                                    f"{list(logps.shape)}, targets {list(targets.shape)} do not fit "
                                                    f"[N, k], [N, k], [N] with k >= 1")
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise BadSample("bad_teacher_outputs", key, f"member {MEMBER}: token ids outside the vocabulary [0, {vocab})")
    if not bool(torch.isfinite(logps).all()) or bool((logps > 1e-4).any()):
        raise BadSample("bad_teacher_outputs", key, f"member {MEMBER}: log-probs must be finite and <= 0")
    tokens = sample["input_ids"].to(torch.int32)
    if tensors["input_ids"].shape != tokens.shape or not torch.equal(tensors["input_ids"], tokens):
        raise BadSample("teacher_outputs_mismatch", key,
                        f"member {MEMBER} was made for another encoding: {tensors['input_ids'].numel()} stored input "
                        f"tokens against {len(tokens)} here (or other tokens); {REDO}")
    mine = targets_of(sample["labels"], ignore)
    if len(mine) != len(targets) or not torch.equal(mine.to(torch.int32), targets):
        at = next((i for i, (a, b) in enumerate(zip(mine.tolist(), targets.tolist())) if a != b),
                  min(len(mine), len(targets)))
        raise BadSample("teacher_outputs_mismatch", key,
                        f"member {MEMBER} was made for another encoding: {len(targets)} stored targets against "
                        f"{len(mine)} supervised tokens here, first difference at target {at}; {REDO}")
    sample["teacher_ids"], sample["teacher_logps"] = ids.long(), logps
