"""Record -> model inputs for one sample: tokens, labels, pixel values, grid sizes.

Chat records go through the family's chat template and supervise assistant turns only; role-less
pretraining documents supervise every text token. Image pad tokens are expanded to the merged-patch
count here (as the HF processor would), so the model sees exactly one embedding slot per merged patch.
"""
from __future__ import annotations

import torch

IGNORE = -100


class Encoder:
    def __init__(self, tokenizer, image_processor, merge_size: int = 2):
        self.tok = tokenizer
        self.ip = image_processor
        self.merge = merge_size
        ids = tokenizer.convert_tokens_to_ids
        self.image_pad, self.video_pad = ids("<|image_pad|>"), ids("<|video_pad|>")
        self.im_start, self.im_end = ids("<|im_start|>"), ids("<|im_end|>")
        self.eos = ids("<|endoftext|>")
        self.newline = tokenizer.encode("\n", add_special_tokens=False)
        self.assistant = tokenizer.encode("assistant", add_special_tokens=False)

    def _images(self, record: dict, media: dict, parts: list[dict]) -> list:
        images = []
        for part in parts:
            if part.get("type") == "image":
                name = part["image"]
                if name not in media:
                    raise ValueError(f"record {record.get('__key__', '?')} names image {name!r} but the sample "
                                     f"has only {sorted(media)}")
                images.append(media[name].convert("RGB"))
        return images

    def encode(self, record: dict, media: dict) -> dict:
        if "messages" in record:
            text = self.tok.apply_chat_template(record["messages"], tokenize=False)
            parts = [p for m in record["messages"] if not isinstance(m["content"], str) for p in m["content"]]
        elif "content" in record:
            parts = record["content"]
            text = "".join("<|vision_start|><|image_pad|><|vision_end|>" if p["type"] == "image" else p["text"]
                           for p in parts) + "<|endoftext|>"
        else:
            raise ValueError(f"record {record.get('__key__', '?')} has neither 'messages' nor 'content'")
        images = self._images(record, media, parts)
        out = {}
        if images:
            vis = self.ip(images=images, return_tensors="pt")
            out["pixel_values"], out["image_grid_thw"] = vis["pixel_values"], vis["image_grid_thw"]
            counts = (vis["image_grid_thw"].prod(-1) // self.merge**2).tolist()
            pieces = text.split("<|image_pad|>")
            if len(pieces) - 1 != len(counts):
                raise ValueError(f"record {record.get('__key__', '?')}: {len(pieces) - 1} image slots in the text "
                                 f"but {len(counts)} images")
            text = pieces[0] + "".join("<|image_pad|>" * n + p for n, p in zip(counts, pieces[1:]))
        ids = torch.tensor(self.tok.encode(text, add_special_tokens=False), dtype=torch.long)
        labels = self._assistant_labels(ids) if "messages" in record else self._document_labels(ids)
        out.update(input_ids=ids, labels=labels,
                   mm_token_type_ids=(ids == self.image_pad).long() + 2 * (ids == self.video_pad).long(),
                   source=record.get("source", "default"))
        return out

    def _document_labels(self, ids: torch.Tensor) -> torch.Tensor:
        labels = ids.clone()
        labels[(ids == self.image_pad) | (ids == self.video_pad)] = IGNORE
        return labels

    def _assistant_labels(self, ids: torch.Tensor) -> torch.Tensor:
        """Supervise each assistant turn's content and its <|im_end|>, not the role header."""
        labels = torch.full_like(ids, IGNORE)
        seq = ids.tolist()
        header = [self.im_start] + self.assistant + self.newline
        i = 0
        while i < len(seq):
            if seq[i:i + len(header)] == header:
                start = i + len(header)
                end = start
                while end < len(seq) and seq[end] != self.im_end:
                    end += 1
                end = min(end + 1, len(seq))  # include <|im_end|>
                labels[start:end] = ids[start:end]
                i = end
            else:
                i += 1
        return labels
