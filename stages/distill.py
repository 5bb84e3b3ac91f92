"""Strong-to-weak distillation (Qwen3-VL post-training): the student matches a frozen teacher's next-token
distributions on supervised tokens.

Off-policy (`lmbda` 0): on the dataset's responses (SFT records). Per supervised token the loss is a divergence
between the teacher's and the student's distributions (`divergence`: forward_kl KL(teacher‖student),
reverse_kl KL(student‖teacher), or jsd, the generalised Jensen-Shannon divergence with `beta`), both at
`temperature`, optionally restricted to the teacher's `top_k` tokens (both distributions renormalised there),
plus `ce_weight` × the student's cross-entropy on the label. The per-token losses are weighed by the stage's loss
reduction (token / sample / sqrt, as the lm objective) and the loop divides by the global weight sum, so the
gradient does not depend on the split over ranks and micro-batches.

On-policy (`lmbda` > 0: the fraction of optimizer steps, drawn per step from a seeded stream, the same on every
rank): the student samples `num_generations` completions per prompt with its KV cache (stages/rollout.py, the RL
rollout machinery: each prompt's images encoded once), the teacher scores them, and the loss is the divergence on
the student's own tokens (GKD; reverse KL by default). A chat sample's prompt is everything before its last
supervised span (its last reply); an RL prompt sample is a prompt as it is. `lmbda` 0 < λ < 1 mixes on-policy and
dataset-response steps as GKD does.

Logits are never held whole: the teacher runs first (no gradient) and keeps only the hidden states of the
supervised positions; the student's model step (training/vlm.py `chunked_loss`) takes `model.loss_chunk` tokens
at a time, computes the teacher's logits of the same chunk from those hidden states and the divergence there.
The formulas are `divergence`, a pure function checked against trl's GKD `generalized_jsd_loss` in
tests/test_distill.py (forward KL is its beta 0, reverse KL its beta 1).

`teacher: precomputed` (off-policy only): no teacher model runs; each sample carries the teacher's top-k
log-probs as a shard member (data/teacher.py, written by `python -m training.teacher_outputs`), and the
divergence is over those k tokens (`divergence_topk`), which equals the co-hosted teacher's with the same top_k.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from data.encode import IGNORE
from data.errors import BadSample
from stages import rollout
from stages.lm import REDUCTIONS, token_weights
from stages.objective import Context, Objective, frozen_forward, source_sums
from stages.rollout import per_sample

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
PRECOMPUTED = "precomputed"
STATS = ("divergence", "ce", "acc_student", "acc_teacher")  # per-token columns of the loss function's stats


@dataclass
class Config:
    # a local HF directory (or a stage's output dir) of the same family and tokenizer, or "precomputed": the
    # teacher's top-k log-probs stored in the shards (data/teacher.py)
    teacher: Optional[str] = None
    divergence: Optional[str] = None  # forward_kl | reverse_kl | jsd; None: forward_kl, reverse_kl when lmbda > 0
    beta: float = 0.5  # jsd's interpolation: 0 is forward KL, 1 reverse KL (trl's GKD beta)
    temperature: float = 1.0  # both distributions at this temperature (no T^2 factor, as trl)
    top_k: int = 0  # > 0: only the teacher's k most likely tokens, both distributions renormalised over them
    ce_weight: float = 0.0  # + ce_weight x the student's cross-entropy on the label
    loss_reduction: str = "token"  # token | sample | sqrt (the per-token weights, as the lm objective)
    # on-policy (GKD): the fraction of steps whose responses the student samples itself
    lmbda: float = 0.0
    num_generations: int = 1  # completions per prompt on an on-policy step
    max_new_tokens: int = 256
    rollout_temperature: float = 1.0  # the student's sampling temperature (0: greedy)
    top_p: float = 1.0
    seed: int = 0  # the per-step on-policy draw

    def __post_init__(self):
        if self.divergence is None:
            self.divergence = "reverse_kl" if self.lmbda > 0 else "forward_kl"

    def check(self) -> None:
        if not self.teacher:
            raise ValueError("stage.objective.teacher is not set: point it at the teacher's local HF directory (a "
                             "larger model of the same family and tokenizer, e.g. an earlier stage's hf/ export; in a recipe, "
                             "pipeline.teacher=DIR or the step's `teacher`)")
        if self.precomputed and (self.lmbda > 0 or self.top_k < 1):
            raise ValueError(f"stage.objective.teacher=precomputed reads the teacher's stored top-k log-probs: it "
                             f"needs top_k >= 1 (got {self.top_k}; at most the stored k) and off-policy lmbda=0 (got "
                             f"{self.lmbda}: on-policy samples need a live teacher)")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"stage.objective.divergence={self.divergence!r}; choose one of {list(DIVERGENCES)}")
        if self.divergence == "jsd" and not 0.0 < self.beta < 1.0:
            raise ValueError(f"stage.objective.beta={self.beta}: jsd needs 0 < beta < 1 (beta 0 is "
                             f"divergence=forward_kl, beta 1 divergence=reverse_kl)")
        if self.temperature <= 0:
            raise ValueError(f"stage.objective.temperature={self.temperature} must be > 0")
        if self.top_k < 0 or self.ce_weight < 0:
            raise ValueError(f"stage.objective.top_k={self.top_k} and ce_weight={self.ce_weight} must be >= 0")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"stage.objective.lmbda={self.lmbda} must be in [0, 1] (the fraction of on-policy steps)")
        if self.num_generations < 1 or self.max_new_tokens < 1:
            raise ValueError(f"stage.objective.num_generations={self.num_generations} and max_new_tokens="
                             f"{self.max_new_tokens} must be >= 1")
        if self.rollout_temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"stage.objective.rollout_temperature={self.rollout_temperature} must be >= 0 and "
                             f"top_p={self.top_p} in (0, 1]")
        if self.loss_reduction not in REDUCTIONS:
            raise ValueError(f"stage.objective.loss_reduction={self.loss_reduction!r}; choose one of "
                             f"{list(REDUCTIONS)}")

    @property
    def precomputed(self) -> bool:
        return self.teacher == PRECOMPUTED

    @property
    def jsd_beta(self) -> float:
        return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(self.divergence, self.beta)


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float = 1.0,
               top_k: int = 0) -> torch.Tensor:
    """Per-token generalised JSD [N] of logits [N, V] (trl's GKD arithmetic, summed over the vocabulary): beta 0 is
    KL(teacher‖student), beta 1 KL(student‖teacher), else beta·KL(t‖m) + (1-beta)·KL(s‖m), m = beta·t + (1-beta)·s.
    `top_k`: over the teacher's k largest logits only, both distributions renormalised there."""
    s, t = student_logits / temperature, teacher_logits / temperature
    if top_k:
        idx = t.topk(min(top_k, t.shape[-1]), dim=-1).indices
        s, t = s.gather(-1, idx), t.gather(-1, idx)
    return _jsd(F.log_softmax(s, -1), F.log_softmax(t, -1), beta)


def divergence_topk(student_logits: torch.Tensor, ids: torch.Tensor, teacher_logps: torch.Tensor, beta: float,
                    temperature: float = 1.0) -> torch.Tensor:
    """`divergence` with top_k from stored teacher outputs: its k token ids [N, k] and log-probs [N, k] (any
    per-row constant shift of the logits, which the renormalisation over the k tokens removes)."""
    s = student_logits.gather(-1, ids) / temperature
    return _jsd(F.log_softmax(s, -1), F.log_softmax(teacher_logps / temperature, -1), beta)


def _jsd(ls: torch.Tensor, lt: torch.Tensor, beta: float) -> torch.Tensor:
    if beta == 0:
        return F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
    b = torch.tensor(beta, dtype=ls.dtype, device=ls.device)
    lm = torch.logsumexp(torch.stack([ls + torch.log1p(-b), lt + torch.log(b)]), dim=0)
    return (b * F.kl_div(lm, lt, reduction="none", log_target=True).sum(-1)
            + (1 - b) * F.kl_div(lm, ls, reduction="none", log_target=True).sum(-1))


def check_teacher(student, teacher) -> None:
    """Refuses a teacher whose tokens, chat template or visual patching differ from the student's (the same encoded
    sample must mean the same to both), naming the first difference."""
    where = "stage.objective.teacher"
    sc, tc = student.model.config, teacher.model.config
    if tc.model_type != sc.model_type:
        raise ValueError(f"{where} is a {tc.model_type!r} model but the student is {sc.model_type!r}: distillation "
                         f"here needs one family (the same vision patching, M-RoPE ids and special tokens)")
    for key in ("patch_size", "spatial_merge_size", "temporal_patch_size"):
        a, b = getattr(sc.vision_config, key, None), getattr(tc.vision_config, key, None)
        if a != b:
            raise ValueError(f"{where}: vision_config.{key} is {b} but the student's is {a}; the same images must "
                             f"give both models the same tokens")
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        if getattr(sc, key, None) != getattr(tc, key, None):
            raise ValueError(f"{where}: {key} is {getattr(tc, key, None)} but the student's is {getattr(sc, key, None)}")
    sv, tv = student.tokenizer.get_vocab(), teacher.tokenizer.get_vocab()
    if sv != tv:
        tok = next(iter(sorted(set(sv.items()) ^ set(tv.items()), key=lambda kv: kv[1])))
        side = "student" if tok in sv.items() else "teacher"
        raise ValueError(f"{where}: the tokenizers differ (first difference: token {tok[0]!r} = id {tok[1]} in the "
                         f"{side}'s vocabulary only); distillation needs one vocabulary")
    for key in ("eos_token_id", "pad_token_id"):
        if getattr(student.tokenizer, key) != getattr(teacher.tokenizer, key):
            raise ValueError(f"{where}: tokenizer {key} is {getattr(teacher.tokenizer, key)} but the student's is "
                             f"{getattr(student.tokenizer, key)}")
    st, tt = (student.tokenizer.chat_template or "").splitlines(), (teacher.tokenizer.chat_template or "").splitlines()
    if st != tt:
        i = next((i for i, (a, b) in enumerate(zip(st, tt)) if a != b), min(len(st), len(tt)))
        raise ValueError(f"{where}: the chat templates differ at line {i + 1} (student {st[i] if i < len(st) else '<end>'!r}"
                         f", teacher {tt[i] if i < len(tt) else '<end>'!r}); records would be rendered differently")


class DistillObjective(Objective):
    no_sequence_parallel = ("distillation runs the teacher on whole rows; set parallel.sp_size=1 (the memory "
                            "estimator says which lever else fits)")

    def __init__(self, cfg: Config):
        cfg.check()
        self.cfg = cfg
        self.teacher = None
        self.vocab = None
        self.tokenizer = None
        self.synced = False
        self.steps = 0  # optimizer steps prepared: the index of the on-policy draw (saved, so resume draws the same)
        self._sums: dict = {}
        self._hidden: dict = {}  # the teacher's hidden states of the micro-batches in flight, by "teacher_slot"
        self._slots = 0

    def setup(self, ctx: Context) -> None:
        """The teacher: loaded from `teacher`, checked against the student, frozen and placed like the reference
        models (ZeRO-3: partitioned)."""
        self.tokenizer = ctx.bundle.tokenizer
        sv = ctx.bundle.model.config.get_text_config().vocab_size
        if self.cfg.precomputed:  # the shards carry the teacher (data/teacher.py checked them against the data)
            self.vocab = min(sv, len(self.tokenizer))
            return
        path = Path(self.cfg.teacher)
        conf = path / "config.json"
        if conf.is_file():  # the family check before loading (a wrong family would fail obscurely there)
            kind = json.loads(conf.read_text()).get("model_type")
            if kind != ctx.bundle.model.config.model_type:
                raise ValueError(f"stage.objective.teacher={str(path)!r} is a {kind!r} model but the student is "
                                 f"{ctx.bundle.model.config.model_type!r}: distillation here needs one family")
        bundle, self.teacher = ctx.frozen(str(path))
        check_teacher(ctx.bundle, bundle)
        self.synced = ctx.engine.partitioned and ctx.engine.world > 1
        tv = bundle.model.config.get_text_config().vocab_size
        # padded vocabularies (e.g. 151936 vs 152064, the tokenizer 151669): the real tokens' columns only, as the
        # stored teacher outputs (training/teacher_outputs.py) take them
        self.vocab = min(sv, tv, len(self.tokenizer))

    def weights(self, batch: dict) -> torch.Tensor:
        return token_weights(batch["labels"], batch["sample_ids"], self.cfg.loss_reduction)

    # -- on-policy ----------------------------------------------------------------------------------------------
    def check_sample(self, sample: dict) -> None:
        """On-policy steps need a prompt to continue: a sample whose first token is supervised (a document) has
        none, and is skipped and counted (BadSample no_prompt) when lmbda > 0. With a precomputed teacher a sample
        needs its stored outputs with at least top_k tokens (trimmed to top_k here)."""
        if self.cfg.precomputed:
            ids = sample.get("teacher_ids")
            if ids is None:
                raise BadSample("no_teacher_outputs", str(sample.get("key", "?")), "stage.objective.teacher="
                                "precomputed needs each sample's teacher.safetensors member: write the shards with "
                                "`python -m training.teacher_outputs`")
            if ids.shape[1] < self.cfg.top_k:
                raise BadSample("teacher_outputs_top_k", str(sample.get("key", "?")), f"the stored outputs hold "
                                f"the top {ids.shape[1]} tokens, fewer than stage.objective.top_k={self.cfg.top_k}")
            sample["teacher_ids"] = ids[:, :self.cfg.top_k]
            sample["teacher_logps"] = sample["teacher_logps"][:, :self.cfg.top_k]
        if self.cfg.lmbda > 0 and sample.get("kind") != "prompt" and "labels" in sample \
                and bool(sample["labels"][0] != IGNORE):
            raise BadSample("no_prompt", str(sample.get("key", "?")), "on-policy distillation (stage.objective.lmbda "
                            "> 0) continues a prompt; a document has none: use chat or RL prompt records")

    def on_policy(self, step: int) -> bool:
        """Is optimizer step `step` (0-based) on-policy: the same draw on every rank and after a resume."""
        if self.cfg.lmbda in (0.0, 1.0):
            return bool(self.cfg.lmbda)
        return random.Random(f"{self.cfg.seed}:{step}").random() < self.cfg.lmbda

    def prepare(self, engine, micro: list[dict]) -> list[dict]:
        """The step's micro-batches: as they are, or on an on-policy step the student's completions of their
        prompts (as many micro-batches, the completions dealt out round-robin)."""
        step, self.steps = self.steps, self.steps + 1
        on = self.on_policy(step)
        _add(self._sums, "distill/on_policy", float(on), 1.0)
        if not on:
            return micro
        prompts = [prompt_of(p) for mb in micro for p in rollout.split_samples(mb)]
        tok = self.tokenizer
        stops = sorted({t for t in (tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id) if t is not None})
        banned = [t for t in (tok.convert_tokens_to_ids(x) for x in ("<|image_pad|>", "<|video_pad|>",
                                                                    "<|vision_start|>", "<|vision_end|>"))
                  if t is not None]
        G = self.cfg.num_generations
        comps = rollout.generate(engine, prompts, G, tok.pad_token_id, stops, self.cfg.rollout_temperature,
                                 self.cfg.top_p, self.cfg.max_new_tokens, self.synced, banned)
        owners = [prompts[i // G] for i in range(len(comps))]
        _add(self._sums, "rollout/response_length", float(sum(map(len, comps))), float(len(comps)))
        _add(self._sums, "rollout/truncated", float(sum(c[-1] not in stops for c in comps)), float(len(comps)))
        slots = [list(range(len(comps)))[m::len(micro)] for m in range(len(micro))]
        return [rollout.collate_sequences([owners[i] for i in idx], [comps[i] for i in idx], tok.pad_token_id)
                for idx in slots]

    def step_sums(self) -> dict:
        out, self._sums = self._sums, {}
        return out

    def frozen_pass(self, engine, micro: list[dict]) -> list[dict]:
        """The teacher's hidden states of the step's micro-batches, before the student's calls: one forward-only
        pass (on a pipeline the teacher's own schedule, its stages on the student's ranks). They stay where they
        are computed (a pipeline's last stage, where the student's loss runs), kept by a slot number the
        micro-batch carries until its loss takes them."""
        if self.cfg.precomputed or self.teacher is None:
            return micro
        self._hidden = {}  # a skipped step's (no loss ran) are dropped here
        marked = []
        for mb in micro:
            marked.append({**mb, "teacher_slot": self._slots})
            self._slots += 1

        def keep(batch):
            self._hidden[batch["teacher_slot"]] = self.teacher(batch, hidden=True)[0]
            return {}

        frozen_forward(engine, marked, keep, self.teacher)
        return marked

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state.get("steps", 0))

    def loss_fn(self, teacher_hidden: torch.Tensor | None = None, stored: tuple | None = None):
        """The per-token loss of one chunk of the student's logits (training/vlm.py `chunked_loss`): against the
        teacher's logits of the chunk (from its hidden states), or its stored top-k (ids, log-probs)."""
        cfg, V = self.cfg, self.vocab
        head = None if self.teacher is None else self.teacher.lm_head

        def fn(logits, target, s, e):
            if stored is None:
                with torch.no_grad():
                    t = head(teacher_hidden[s:e]).float()
                d = divergence(logits[:, :V], t[:, :V], cfg.jsd_beta, cfg.temperature, cfg.top_k)
                best = t.argmax(-1)
            else:
                ids = stored[0][s:e]
                d = divergence_topk(logits, ids, stored[1][s:e].float(), cfg.jsd_beta, cfg.temperature)
                best = ids[:, 0]
            ce = F.cross_entropy(logits, target, reduction="none")
            loss = d + cfg.ce_weight * ce if cfg.ce_weight else d
            with torch.no_grad():
                stats = torch.stack([d, ce, (logits.argmax(-1) == target).float(), (best == target).float()], 1)
            return loss, stats

        return fn

    def loss_sum(self, engine, batch: dict) -> tuple[torch.Tensor, dict]:
        """Σ w·(divergence + ce_weight·CE) over the micro-batch's supervised tokens, and the distillation metrics."""
        if self.cfg.precomputed:
            if batch.get("teacher_ids") is None:
                raise ValueError("stage.objective.teacher=precomputed: this micro-batch has no stored teacher "
                                 "outputs (rollout batches have none; every sample is checked by check_sample)")
            fn = self.loss_fn(stored=(batch["teacher_ids"], batch["teacher_logps"]))
        else:
            if self.teacher is None:
                raise ValueError("the distill objective has no teacher: the loop must call objective.setup(ctx)")
            hidden = self._hidden.pop(batch.get("teacher_slot"), None)
            if hidden is None:  # a caller without frozen_pass (tools, unit tests): the teacher's pass now
                with torch.no_grad():
                    hidden, _ = self.teacher(batch, hidden=True)
            fn = self.loss_fn(hidden)
        loss, per_token, stats = engine(batch, weights=batch["weights"], loss_fn=fn)
        sums, counts = per_sample(per_token, batch)
        out = source_sums(sums, counts, batch["sources"], "loss")
        n = float(len(stats))
        for name, total in zip(STATS, stats.double().sum(0).tolist() if len(stats) else [0.0] * len(STATS)):
            out[f"distill/{name}"] = [total, n]
        return loss, {"sums": out}


def prompt_of(piece: dict) -> dict:
    """An on-policy prompt from one sample (rollout.split_samples): an RL prompt as it is; a chat sample cut
    before its last supervised span (its last reply: what is left ends with the assistant header). The sample's
    images all lie in the prompt, so its visual tensors go with it unchanged."""
    if piece["meta"].get("kind") == "prompt":
        return piece
    sup = (piece["labels"] != IGNORE).nonzero().flatten().tolist()
    if not sup or sup[0] == 0:
        raise ValueError(f"on-policy distillation: sample {piece['meta'].get('key')} has no prompt before its "
                         f"supervised tokens; use chat or RL prompt records")
    start = sup[-1]
    while start - 1 in sup:
        start -= 1
    cut = {k: v[:start] for k, v in piece.items() if k in ("input_ids", "mm_token_type_ids", "labels")}
    if any(int((piece["mm_token_type_ids"][start:] == kind).sum()) for kind in (1, 2)):
        raise ValueError(f"on-policy distillation: sample {piece['meta'].get('key')} has images or videos in its "
                         f"last reply; a prompt must hold all of a sample's media")
    return {**piece, **cut}


def _add(sums: dict, key: str, value: float, count: float) -> None:
    acc = sums.setdefault(key, [0.0, 0.0])
    acc[0], acc[1] = acc[0] + value, acc[1] + count


def build(cfg: Config) -> DistillObjective:
    return DistillObjective(cfg)
