"""The one exception a data step raises for a sample it must skip (never for a config error)."""
from __future__ import annotations


class BadSample(Exception):
    """A sample that cannot be used: skipped, counted per source and reason, logged once with its key.

    `reason` is a short fixed slug (metrics key), e.g. "undecodable_image", "missing_media",
    "truncated_tar", "token_count_mismatch", "empty_assistant", "too_long", "pickle_member".
    """

    def __init__(self, reason: str, key: str, detail: str = ""):
        self.reason, self.key, self.detail = reason, key, detail
        super().__init__(f"sample {key!r}: {reason}" + (f" ({detail})" if detail else ""))
