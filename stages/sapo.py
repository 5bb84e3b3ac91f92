"""RL from verifiable rewards: SAPO (Qwen3-VL), with GRPO and GSPO as `stage.objective.loss` variants.

Per optimizer step the loop hands over the step's prompt samples (`prepare`). When the rollout buffer is
empty, the policy samples G completions per prompt (its own weights, KV cache), the completions are scored
by stages/rewards.py, advantages are group-relative, groups whose rewards are all equal are dropped (no
signal), and the log-probs of the rollout policy (and of the reference, for the k3 KL) are taken once. The
rollout batch is then split into `mini_batches` optimizer steps, so from the second mini-batch on the policy
is off the rollout policy and the gate/clip acts. Prompts that arrive while the buffer still holds mini-batches
are kept for the next rollout, so every prompt is used once; the steady state is one rollout of
`mini_batches` steps' prompts every `mini_batches` steps. That buffer (queued mini-batches, kept prompts) is part
of the checkpoint, so a run resumed mid-rollout trains on exactly what an uninterrupted one would. The rollout's
reward metrics reach the loop through `step_sums`, so they are logged even when every group is dropped and the
step trains on nothing.

Loss aggregation is the seq-mean of token-means (SAPO paper, trl's grpo/sapo): `weights` gives 1 per sequence
and the loop divides by the global sequence count of the mini-batch. The loss formulas are `policy_loss`, a
pure function checked against trl's GRPOTrainer in tests/test_sapo.py.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Optional

import torch

from data.encode import IGNORE
from data.errors import BadSample
from stages import rollout
from stages.objective import Context, Objective, frozen_forward
from stages.rewards import RewardError, Rewards

LOSSES = ("sapo", "grpo", "gspo")
SAMPLE_KINDS = ("prompt",)  # encoded sample kinds it trains on (stages.needed_kinds)


@dataclass
class Config:
    loss: str = "sapo"  # sapo | grpo | gspo
    num_generations: int = 8  # G rollouts per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    mini_batches: int = 2  # optimizer steps per rollout batch (>= 2: the off-policy gate then acts)
    tau_pos: float = 1.0  # SAPO gate temperature for positive advantages
    tau_neg: float = 1.05  # ... and for the others (tau_neg > tau_pos damps negative-advantage updates)
    eps_low: float = 0.2  # GRPO/GSPO clip range [1 - eps_low, 1 + eps_high]
    eps_high: float = 0.28
    kl_beta: float = 0.0  # > 0: add kl_beta * k3 KL to a frozen reference (the starting weights)
    kl_ratio_correction: bool = False  # weigh k3 by the ratio (DeepSeek-V3.2's unbiased KL gradient; trl's default)
    scale_rewards: bool = True  # divide by the group's std (false: Dr.GRPO)
    adv_eps: float = 1.0e-6
    drop_equal_groups: bool = True  # groups with all-equal rewards carry no signal
    default_reward: Optional[str] = None  # a registered reward for prompts whose record names none
    # user rewards {name: "pkg.mod:fn"}, imported once at start-up; records may name only these and the built-ins
    rewards: dict = field(default_factory=dict)
    pass_threshold: float = 1.0  # a rollout with reward >= this counts as passed

    def check(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"stage.objective.loss={self.loss!r} is not an RL loss; choose one of {list(LOSSES)}")
        if self.num_generations < 2:
            raise ValueError(f"stage.objective.num_generations={self.num_generations}: group-relative advantages "
                             f"need at least 2 rollouts per prompt")
        if self.mini_batches < 1:
            raise ValueError(f"stage.objective.mini_batches={self.mini_batches} must be >= 1 (2+ so the gate acts)")
        for key in ("temperature", "top_p", "max_new_tokens", "tau_pos", "tau_neg"):
            if getattr(self, key) <= 0:
                raise ValueError(f"stage.objective.{key}={getattr(self, key)} must be > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"stage.objective.top_p={self.top_p} must be in (0, 1]")
        if self.eps_low < 0 or self.eps_high < 0 or self.eps_low >= 1:
            raise ValueError(f"stage.objective.eps_low/eps_high ({self.eps_low}, {self.eps_high}) must be >= 0 "
                             f"with eps_low < 1")
        if self.kl_beta < 0:
            raise ValueError(f"stage.objective.kl_beta={self.kl_beta} must be >= 0")


# -- pure math ---------------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, scale: bool = True,
                     eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantage, group std, all-equal flag) per rollout: (R - mean_g)/(std_g + eps), std unbiased (verl)."""
    adv = torch.zeros_like(rewards)
    std = torch.zeros_like(rewards)
    equal = torch.zeros_like(rewards, dtype=torch.bool)
    for g in groups.unique():
        m = groups == g
        r = rewards[m]
        s = r.std() if r.numel() > 1 else torch.ones((), dtype=r.dtype)
        adv[m] = (r - r.mean()) / (s + eps) if scale else r - r.mean()
        std[m] = s
        equal[m] = bool((r == r[0]).all())
    return adv, std, equal


def policy_loss(cfg: Config, logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, ref_logps: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Per-sequence loss [B] (token-mean of the per-token loss) and detached token statistics.

    sapo: -sigma(tau (r - 1)) 4/tau A, tau = tau_pos if A > 0 else tau_neg, no clipping.
    grpo: -min(r A, clip(r, 1-eps_low, 1+eps_high) A), r per token. gspo: the same with the sequence ratio
    s = exp(mean_t log r). Optional + kl_beta * k3, k3 = exp(ref - logp) - (ref - logp) - 1 (times r with
    kl_ratio_correction)."""
    mask = mask.to(logps.dtype)
    adv = advantages.to(logps.dtype).unsqueeze(1)
    n = mask.sum(-1).clamp(min=1.0)
    log_ratio = (logps - old_logps).clamp(-20.0, 20.0)  # verl's guard; inactive for any sane ratio
    if cfg.loss == "gspo":
        log_ratio = ((log_ratio * mask).sum(-1) / n).clamp(max=10.0).unsqueeze(1)  # verl clamps log s <= 10
    ratio = torch.exp(log_ratio)
    stats = {}
    if cfg.loss == "sapo":
        tau = torch.where(adv > 0, cfg.tau_pos, cfg.tau_neg)
        gate = torch.sigmoid(tau * (ratio - 1))
        per_token = -gate * 4 / tau * adv
        stats["gate"] = (4 * gate * (1 - gate)).detach()  # the gradient weight: 1 on-policy, < 1 off it
    else:
        clipped = torch.clamp(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high)
        per_token = -torch.min(ratio * adv, clipped * adv)
        stats["clip_frac"] = (((ratio < 1 - cfg.eps_low) & (adv < 0)) |
                              ((ratio > 1 + cfg.eps_high) & (adv > 0))).to(logps.dtype).detach()
    stats["ratio"] = ratio.detach()
    if cfg.kl_beta and ref_logps is not None:
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1
        if cfg.kl_ratio_correction:
            kl = kl * ratio
        per_token = per_token + cfg.kl_beta * kl
        stats["kl"] = kl.detach()
    per_seq = (per_token * mask).sum(-1) / n
    return per_seq, {k: v.expand_as(mask) * mask for k, v in stats.items()}


# -- objective ---------------------------------------------------------------------------------------------------
def _add(sums: dict, key: str, total: float, count: float) -> None:
    acc = sums.setdefault(key, [0.0, 0.0])
    acc[0] += total
    acc[1] += count


class RLObjective(Objective):
    no_eval = ("its loss needs rollouts of the policy and their rewards, not held-out samples; the reward of held-out "
               "prompts is `python -m training.evaluate HF_DIR`'s rl_reward (and the pipeline report's)")
    no_sequence_parallel = ("its rollouts are generated and scored as padded rows with a KV cache, which Ulysses "
                            "does not shard")

    def __init__(self, cfg: Config):
        cfg.check()
        self.cfg = cfg
        self.rewards = Rewards(cfg.default_reward, cfg.rewards)
        self.ref = None
        self.tokenizer = None
        self.synced = False
        self._queue: list[list[dict]] = []  # mini-batches of the current rollout, each = one step's micro-batches
        self._stash: list[dict] = []  # prompts that arrived while the queue was full
        self.counters = {"rollouts": 0, "groups": 0, "dropped_groups": 0}
        self._sums: dict = {}  # reward/rollout metrics of rollouts since the last step_sums()

    def setup(self, ctx: Context) -> None:
        """Tokenizer (stop/pad ids, decoding), ZeRO-3 generation sync, and the reference if kl_beta > 0."""
        self.tokenizer = ctx.bundle.tokenizer
        self.synced = ctx.engine.partitioned and ctx.engine.world > 1
        if self.cfg.kl_beta > 0:
            self.ref = ctx.reference()

    def _ids(self) -> tuple[int, list[int], list[int]]:
        """pad id, stop ids, and the vision placeholder ids a completion must never contain."""
        if self.tokenizer is None:
            raise ValueError("the RL objective has no tokenizer: the loop must call objective.setup(ctx) first")
        tok = self.tokenizer
        stops = [t for t in (tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id) if t is not None]
        banned = [tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                         "<|vision_end|>")]
        return tok.pad_token_id, sorted(set(stops)), [t for t in banned if t is not None]

    def check_sample(self, sample: dict) -> None:
        """The data loader's check of one encoded sample: an RL prompt's reward must name a registered reward
        with declared JSON options (BadSample unknown_reward / bad_reward_options); nothing is imported. Samples
        of other kinds are not this objective's to judge."""
        if sample.get("kind") != "prompt":
            return
        try:
            self.rewards.spec(sample)
        except RewardError as e:
            raise BadSample(e.reason, str(sample.get("key", "?")), str(e)) from None

    def step_sums(self) -> dict:
        """{metric: [sum, count]} of the rollouts made since the last call, then cleared. The loop adds these every
        step, trained on or not, so all-equal groups (every weight 0, no micro-batch runs) still log rewards."""
        out, self._sums = self._sums, {}
        return out

    # -- rollouts ---------------------------------------------------------------------------------------------
    def _prompts(self, micro: list[dict]) -> list[dict]:
        out = []
        for mb in micro:
            if mb.get("meta") is None:
                raise ValueError("the RL objective needs micro-batches with per-sample `meta` (kind 'prompt', answer, "
                                 "reward; data/README.md): use an RL data source")
            for piece in rollout.split_samples(mb):
                if piece["meta"].get("kind") != "prompt":
                    raise ValueError(f"RL stage got sample {piece['meta'].get('key')} of kind "
                                     f"{piece['meta'].get('kind')!r}; its records must be RL prompts (answer+reward)")
                self.rewards.check(piece["meta"])  # a bad reward name fails before any generation
                out.append(piece)
        return out

    def prepare(self, engine, micro: list[dict]) -> list[dict]:
        """The micro-batches to train on this step: the next mini-batch of the current rollout."""
        prompts = self._prompts(micro)
        if self._queue:
            self._stash.extend(prompts)
            return self._queue.pop(0)
        prompts, self._stash = self._stash + prompts, []
        if not prompts:
            raise ValueError("an RL step received no prompt samples on this rank")
        self._queue = self.rollout(engine, prompts, len(micro))
        return self._queue.pop(0)

    @torch.no_grad()
    def rollout(self, engine, prompts: list[dict], n_micro: int) -> list[list[dict]]:
        """G completions per prompt, rewards, advantages, rollout-policy (and reference) log-probs, split into
        `mini_batches` lists of `n_micro` micro-batches (every rank the same count; empty slots get a
        zero-weight copy of a rollout so every rank runs the same forwards)."""
        cfg = self.cfg
        pad, stops, banned = self._ids()
        G = cfg.num_generations
        comps = rollout.generate(engine, prompts, G, pad, stops, cfg.temperature,
                                 cfg.top_p, cfg.max_new_tokens, self.synced, banned)
        owners = [prompts[i // G] for i in range(len(comps))]
        texts = self.tokenizer.batch_decode(comps, skip_special_tokens=False)
        rewards = torch.tensor([self.rewards(t, p["meta"]) for t, p in zip(texts, owners)], dtype=torch.float64)
        groups = torch.arange(len(prompts)).repeat_interleave(G)
        adv, std, equal = group_advantages(rewards, groups, cfg.scale_rewards, cfg.adv_eps)
        keep = ~equal if cfg.drop_equal_groups else torch.ones_like(equal)
        n_groups, n_dropped = len(prompts), int(equal[::G].sum()) if cfg.drop_equal_groups else 0
        self.counters["rollouts"] += 1
        self.counters["groups"] += n_groups
        self.counters["dropped_groups"] += n_dropped
        sums = self._sums
        N = float(len(comps))
        _add(sums, "reward/mean", float(rewards.sum()), N)
        _add(sums, "reward/group_std", float(std[::G].sum()), n_groups)
        _add(sums, "reward/pass_rate", float((rewards >= cfg.pass_threshold).sum()), N)
        _add(sums, "rollout/response_length", float(sum(len(c) for c in comps)), N)
        _add(sums, "rollout/truncated", float(sum(1 for c in comps if c[-1] not in stops)), N)
        _add(sums, "rollout/dropped_groups", float(n_dropped), n_groups)
        kept = keep.nonzero().flatten().tolist()
        slots: list[list[int]] = [[] for _ in range(cfg.mini_batches * n_micro)]
        for j, i in enumerate(kept):
            slots[j % len(slots)].append(i)
        micro = []
        for s, idx in enumerate(slots):
            weight = 1.0 if idx else 0.0
            idx = idx or [0]  # a zero-weight stand-in keeps this rank's forwards in step with the others
            mb = rollout.collate_sequences([owners[i] for i in idx], [comps[i] for i in idx], pad)
            mb["advantages"] = adv[idx].float() * weight
            mb["rl_weight"] = torch.full((len(idx),), weight)
            micro.append(mb)
        # the rollout policy's (and the reference's) per-token log-probs: forward-only passes over all the rollout's
        # micro-batches (on a pipeline, schedules of their own: stages/objective.py frozen_forward)
        for key, model in (("old_logps", engine), ("ref_logps", self.ref)):
            if model is None:
                continue

            def logps(batch, model=model):
                return {"logps": rollout.token_logps(model, batch)[0].cpu()}

            for mb, stats in zip(micro, frozen_forward(engine, micro, logps, None if model is engine else model),
                                 strict=True):
                mb[key] = stats["logps"]
        return [micro[m * n_micro:(m + 1) * n_micro] for m in range(cfg.mini_batches)]

    # -- protocol ---------------------------------------------------------------------------------------------
    def weights(self, batch: dict) -> torch.Tensor:
        return batch["rl_weight"]

    def loss_sum(self, engine, batch: dict) -> tuple[torch.Tensor, dict]:
        logps, ent = rollout.token_logps(engine, batch, entropy=True)
        mask = batch["labels"][:, 1:] != IGNORE
        per_seq, st = policy_loss(self.cfg, logps, batch["old_logps"], batch["advantages"], mask,
                                  batch.get("ref_logps"))
        w = batch["weights"] if "weights" in batch else self.weights(batch)
        w = w.to(per_seq.device, per_seq.dtype)
        sums: dict = {}
        live = mask & (w > 0).unsqueeze(1)
        n_tok = float(live.sum())
        for k, v in st.items():
            _add(sums, f"policy/{k}", float((v * live).sum()), n_tok)
        _add(sums, "entropy", float((ent * live).sum()), n_tok)
        for i, src in enumerate(batch["sources"]):
            if w[i] > 0:
                _add(sums, f"loss/{src}", float(per_seq[i].detach()), 1.0)
        return (per_seq * w).sum(), {"sums": sums}

    @torch.no_grad()
    def evaluate(self, engine, micro: list[dict], greedy: bool = True) -> dict:
        """Held-out reward of one completion per prompt (greedy by default), no training: {metric: [sum, n]}."""
        pad, stops, banned = self._ids()
        prompts = self._prompts(micro)
        temp = 0.0 if greedy else self.cfg.temperature
        comps = rollout.generate(engine, prompts, 1, pad, stops, temp, self.cfg.top_p,
                                 self.cfg.max_new_tokens, self.synced, banned)
        texts = self.tokenizer.batch_decode(comps, skip_special_tokens=False)
        r = [self.rewards(t, p["meta"]) for t, p in zip(texts, prompts)]
        return {"eval/reward": [float(sum(r)), float(len(r))],
                "eval/pass_rate": [float(sum(x >= self.cfg.pass_threshold for x in r)), float(len(r))]}

    def state_dict(self) -> dict:
        """Counters, the rollout buffer (mini-batches still to train on, prompts kept for the next rollout) and the
        accelerator's sampling RNG, so a resumed run trains on exactly what an uninterrupted one would: no prompt is
        replayed or lost. The CPU RNG (CPU sampling) is saved by training/checkpoint.py. JSON-safe (tensors as
        dtype/shape/base64 bytes), never pickle; the buffer is at most `mini_batches - 1` steps of rollouts."""
        state = dict(self.counters)
        state["queue"] = [[_to_json(mb) for mb in step] for step in self._queue]
        state["stash"] = [_to_json(p) for p in self._stash]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda_rng"] = _to_json(torch.cuda.get_rng_state())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.counters.update({k: int(v) for k, v in state.items() if k in self.counters})
        # a checkpoint from before the buffer was saved: the next step rolls out afresh
        self._queue = [[_from_json(mb) for mb in step] for step in state.get("queue", [])]
        self._stash = [_from_json(p) for p in state.get("stash", [])]
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(_from_json(state["cuda_rng"]))


_TENSOR = "__tensor__"


def _to_json(x):
    """Tensors (any dtype, as raw bytes), dicts, lists and JSON scalars -> a JSON-serialisable value."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {_TENSOR: str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                "data": base64.b64encode(raw).decode("ascii")}
    if isinstance(x, dict):
        if _TENSOR in x:
            raise ValueError(f"cannot save a mapping with the reserved key {_TENSOR!r} in the RL buffer")
        return {str(k): _to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_json(v) for v in x]
    return x


def _from_json(x):
    if isinstance(x, dict):
        if _TENSOR in x:
            dtype = getattr(torch, x[_TENSOR])
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"RL buffer in the checkpoint names an unknown dtype {x[_TENSOR]!r}")
            raw = base64.b64decode(x["data"])
            if not raw:
                return torch.empty(x["shape"], dtype=dtype)
            return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(x["shape"]).clone()
        return {k: _from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_json(v) for v in x]
    return x


def build(cfg: Config) -> RLObjective:
    return RLObjective(cfg)
