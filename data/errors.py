"""The one exception a data step raises for a sample it must skip (never for a config error)."""
from __future__ import annotations


class BadSample(Exception):
    """A sample that cannot be used: skipped, counted per source and reason, logged once with its key.

    `reason` is a short fixed slug (metrics key), e.g. "undecodable_image", "missing_media",
    "truncated_tar", "token_count_mismatch", "empty_assistant", "too_long", "pickle_member",
    "member_too_large", "video_too_long", "unknown_record_shape", "bad_record", "malformed_record",
    "llava_placeholder", "unreferenced_media", "bad_teacher_outputs", "teacher_outputs_mismatch" (data/teacher.py),
    "no_teacher_outputs", "teacher_outputs_top_k" (stages/distill.py).
    `detail` names the key, file or member and the fix.
    """

    def __init__(self, reason: str, key: str, detail: str = ""):
        self.reason, self.key, self.detail = reason, key, detail
        super().__init__(f"sample {key!r}: {reason}" + (f" ({detail})" if detail else ""))


# extensions of formats that can carry pickled objects: such members are refused unread ("pickle_member")
PICKLE_EXTENSIONS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "ckpt", "joblib", "dill", "npz"})


def is_pickle_name(name: str) -> bool:
    """Whether the last extension of a member or media name is pickle-style. A bare name counts as its own
    extension: WebDataset names the member `key.pyd` "pyd" (the part after the key), `key.0.pt` "0.pt"."""
    return str(name).lower().rsplit(".", 1)[-1] in PICKLE_EXTENSIONS
