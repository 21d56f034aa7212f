"""Rollouts: sample G completions per prompt, score them, compute group advantages, and apply
DAPO's dynamic sampling (drop zero-variance groups, refill with new prompts, bounded).

The output is a `RolloutBatch` (simple_grpo.wire.codec), the same typed record that generation workers
upload to the reference server, so the trainer consumes local and remote rollouts the same way.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from simple_grpo.algo.advantages import group_advantages, zero_variance_groups
from simple_grpo.gen.decode import decode, prefill
from simple_grpo.gen.decode_static import decode_static
from simple_grpo.algo.masks import lengths_from_eos, mask_from_lengths
from simple_grpo.errors import UserError
from simple_grpo.hf_compat import cache_kwargs
from simple_grpo.gen.reward_registry import RewardSpec, combine, with_completion_info
from simple_grpo.wire.codec import RolloutBatch


@dataclass
class SampleSettings:
    """How completions are sampled; derived from the TrainConfig once."""

    num_generations: int
    max_new_tokens: int
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    overlong_cache: int | None = None
    sampler: str = "loop"  # "loop" (gen/decode.py), "static" (gen/decode_static.py), "generate" (HF
    #                        model.generate) or "auto" (resolve_sampler: loop on CPUs, static on GPUs)


@dataclass
class Rollout:
    """A scored batch plus what the trainer logs about it."""

    batch: RolloutBatch
    examples: list[dict]  # one per prompt
    completions: list[str]  # decoded, one per row
    breakdown: dict[str, list[float]]  # unweighted reward per function, one per row
    stats: dict[str, float] = field(default_factory=dict)


_ANNOUNCED: set[tuple[str, str]] = set()


def resolve_sampler(sampler: str, device: torch.device) -> str:
    """The engine `sampler` names on `device`: `auto` is `loop` on a CPU (bit-identical to
    --sampler=loop) and `static` on a CUDA device (a fixed-shape step run as a CUDA graph); the
    first time a process resolves it on a device type it prints one line saying which and why."""
    if sampler != "auto":
        return sampler
    cuda = device.type == "cuda"
    engine = "static" if cuda else "loop"
    if (engine, device.type) not in _ANNOUNCED:
        _ANNOUNCED.add((engine, device.type))
        why = ("a CUDA device: a static KV cache and one CUDA graph replay per token instead of "
               "hundreds of kernel launches" if cuda else
               f"a {device.type} device: a step is bound by compute there, not by launches; the loop "
               "keeps --sampler=loop's numbers")
        print(f"--sampler=auto: {engine} ({why})", flush=True)
    return engine


def eos_token_ids(tokenizer, model) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(i for i in ids if i is not None)


@contextmanager
def seeded(seed: int, device: torch.device):
    """Sample under the generator state `seed` on `device` (and the CPU), leaving the caller's
    RNG as it was: a batch's draws depend on its seed alone, not on what ran before it."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.default_generators[devices[0]].manual_seed(seed)
        yield


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], s: SampleSettings, eos_ids: list[int], *,
           greedy: bool = False, repeat: int | None = None, share_prefill: bool = True,
           record_logprobs: bool = False):
    """-> prompt_ids [n*G, P], prompt_lens [n*G], completion_ids [n*G, C], completion_lens [n*G],
    and with `record_logprobs` also the sampling log-probs [n*G, C] of the generated tokens: each
    token's log-prob under the distribution it was drawn from (logits / temperature, EOS at -inf
    before min_new_tokens, the top-p nucleus renormalised; 0 past each length). They are the
    behaviour policy of importance weights, so with top_p < 1 they differ from the trainer's
    whole-vocabulary log-probs by -log(nucleus mass) per token; and the same tokens' log-probs
    under the whole tempered softmax [n*G, C] (what the trainer's forward computes).
    `s.sampler` picks our decode loop (simple_grpo.gen.decode), its static-cache fixed-shape twin
    (simple_grpo.gen.decode_static), HF `generate`, or `auto` (resolve_sampler)."""
    G = s.num_generations if repeat is None else repeat
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=False)
    ids_nP, attn_nP = enc.input_ids.to(device), enc.attention_mask.to(device)
    was_training = model.training
    model.eval()
    temperature = 1.0 if greedy else s.temperature
    engine = resolve_sampler(s.sampler, device)
    if engine in ("loop", "static"):
        d = (decode if engine == "loop" else decode_static)(
            model, ids_nP, attn_nP, repeat=G, max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens,
            eos_ids=eos_ids, pad_id=tokenizer.pad_token_id, temperature=temperature, top_p=s.top_p,
            greedy=greedy, record_logprobs=record_logprobs)
        completion_ids_NC, logp_NC, full_NC = d.completion_ids_NC, d.logprobs_NC, d.full_logprobs_NC
    else:
        completion_ids_NC, logp_NC, full_NC = _hf_generate(model, tokenizer, ids_nP, attn_nP, G, s, eos_ids, greedy,
                                                  share_prefill, record_logprobs)
    model.train(was_training)
    completion_lens_N = lengths_from_eos(completion_ids_NC, eos_ids)
    result = (ids_nP.repeat_interleave(G, 0).cpu(), attn_nP.sum(1).repeat_interleave(G, 0).cpu(),
              completion_ids_NC.cpu(), completion_lens_N.cpu())
    if not record_logprobs:
        return result
    mask_NC = mask_from_lengths(completion_lens_N.cpu(), logp_NC.shape[1])
    return (*result, torch.where(mask_NC, logp_NC.float().cpu(), 0.0),
            torch.where(mask_NC, full_NC.float().cpu(), 0.0))


class _RecordLogprobs:
    """A logits processor that keeps one step's log_softmax [N, V] of the scores it sees: at the
    next step (or `finish`) it takes the log-prob of the token sampled from it. Last, it sees the
    distribution generate samples from (after the EOS mask, temperature and top-p); right after
    the temperature, the whole tempered softmax. Memory: one step's scores, not every step's
    (`output_logits`)."""

    def __init__(self):
        self.prev_NV, self.logps = None, []

    def _take(self, tok_N: torch.Tensor) -> None:
        if self.prev_NV is not None:
            self.logps.append(self.prev_NV.gather(1, tok_N[:, None])[:, 0])

    def __call__(self, input_ids, scores):
        if self.prev_NV is not None:
            self._take(input_ids[:, -1])
        self.prev_NV = torch.log_softmax(scores.float(), -1)  # already / T and filtered
        return scores

    def finish(self, completion_ids_NC: torch.Tensor) -> torch.Tensor:
        """-> [N, C] sampling log-probs of the generated tokens."""
        self._take(completion_ids_NC[:, -1])
        self.prev_NV = None
        return torch.stack(self.logps, 1)


def _hf_generate(model, tokenizer, ids_nP, attn_nP, G, s: SampleSettings, eos_ids, greedy, share_prefill,
                 record_logprobs):
    """`model.generate` -> (completion ids [n*G, C], sampling log-probs [n*G, C] or None, whole
    tempered softmax log-probs [n*G, C] or None).

    The processors are ours, in this order: temperature, record the whole tempered softmax, hold
    EOS back for min_new_tokens, top-p (generate's own ones stay off), then record again. So the
    last recorded log-probs are those of the distribution sampled from (the renormalised nucleus),
    the behaviour policy of importance weights: with top_p < 1 they exceed the trainer's
    whole-vocabulary log_softmax(logits / T) by -log Z per token (Z: the nucleus mass), which the
    first recorder holds."""
    from transformers import (LogitsProcessorList, MinNewTokensLengthLogitsProcessor, TemperatureLogitsWarper,
                              TopPLogitsWarper)

    prompt_ids_NP, attn_NP = ids_nP.repeat_interleave(G, 0), attn_nP.repeat_interleave(G, 0)
    recorder = _RecordLogprobs() if record_logprobs else None
    full = _RecordLogprobs() if record_logprobs else None
    procs = LogitsProcessorList()
    kw = dict(do_sample=False)
    if not greedy:
        kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
        procs.append(TemperatureLogitsWarper(s.temperature))
    if full is not None:
        procs.append(full)  # the whole tempered softmax: before the EOS mask and the nucleus
    if s.min_new_tokens:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_ids_NP.shape[1], s.min_new_tokens, eos_ids,
                                                       device=str(ids_nP.device)))
    if not greedy:
        if s.top_p < 1.0:
            procs.append(TopPLogitsWarper(s.top_p))
    if recorder is not None:
        procs.append(recorder)  # last: it sees exactly the scores generate samples from
    if G > 1 and share_prefill and ids_nP.shape[1] > 1:
        # every prompt token but the last, once per prompt; generate() runs the last one per row
        cache, _ = prefill(model, ids_nP[:, :-1], attn_nP[:, :-1], G, in_place=False)
        kw.update(cache_kwargs(cache))
    out_NT = model.generate(input_ids=prompt_ids_NP, attention_mask=attn_NP, logits_processor=procs,
                            max_new_tokens=s.max_new_tokens, eos_token_id=eos_ids,
                            pad_token_id=tokenizer.pad_token_id, use_cache=True, **kw)
    completion_ids_NC = out_NT[:, prompt_ids_NP.shape[1]:]
    if recorder is None:
        return completion_ids_NC, None, None
    return completion_ids_NC, recorder.finish(completion_ids_NC), full.finish(completion_ids_NC)


def decode_completions(tokenizer, completion_ids_NC: torch.Tensor, lens_N: torch.Tensor) -> list[str]:
    return [tokenizer.decode(row[:n].tolist(), skip_special_tokens=True)
            for row, n in zip(completion_ids_NC, lens_N.tolist())]


def score(completions: list[str], examples: list[dict], lens_N: torch.Tensor, specs: list[RewardSpec],
          s: SampleSettings, failure_value: float):
    """Weighted rewards [N] and the unweighted per-function breakdown; failures are counted."""
    rows = [with_completion_info(ex, n, s.max_new_tokens, s.overlong_cache)
            for ex, n in zip(examples, lens_N.tolist())]
    result = combine(completions, rows, specs, failure_value=failure_value)
    return torch.tensor(result.totals, dtype=torch.float32), result.breakdown, result.failures


def pad_cat(parts: list[torch.Tensor], pad_id: int, left: bool) -> torch.Tensor:
    """Concatenate [n_i, W_i] tensors along rows, padding to the widest (left or right)."""
    width = max(p.shape[1] for p in parts)
    padded = []
    for p in parts:
        fill = torch.full((p.shape[0], width - p.shape[1]), pad_id, dtype=p.dtype)
        padded.append(torch.cat([fill, p] if left else [p, fill], 1))
    return torch.cat(padded, 0)


def make_rollout(model, tokenizer, stream, n_prompts: int, s: SampleSettings, specs: list[RewardSpec],
                 *, system_render, eos_ids: list[int], dynamic_sampling: bool = False,
                 max_refill_rounds: int = 0, failure_value: float = 0.0, scale: str = "std",
                 weight_version: int = 0, record_logprobs: bool = False,
                 filter_metric: str = "reward") -> Rollout:
    """Generate and score `n_prompts` groups of G; with dynamic sampling keep only groups whose
    `filter_metric` values differ ('reward': the weighted total; a reward's name: its unweighted
    value, e.g. correctness as in DAPO), refilling with new prompts for at most
    `max_refill_rounds` extra rounds (zero_var_frac counts groups flat in that metric). When the
    rounds run out, flat groups top the batch up (topped_up_groups; topped_up_frac of the rows):
    their rows get advantage 0 and loss_rows False, outside the loss and its counts (flat in the
    metric, what differs is noise: DAPO's length penalty alone, scaled by 1 / std); loss_rows is
    None when nothing was topped up.
    `record_logprobs` stores the sampling log-probs as the batch's gen_logprobs and
    gen_logprobs_full (the whole tempered softmax's). Each round samples under the seed of where
    `stream` stands (`seeded`, `PromptStream.sampling_seed`)."""
    G = s.num_generations
    kept: list[tuple] = []  # (example, prompt_ids, prompt_lens, comp_ids, comp_lens, rewards, texts,
    #                          breakdown, sampling log-probs or None, whole-softmax log-probs or None)
    spare: list[tuple] = []  # zero-variance groups, used to top up when refills run out
    stats = {"refill_rounds": 0.0, "zero_var_frac": 0.0, "reward_failures": 0.0,
             "topped_up_groups": 0.0}
    t0, rounds, generated_groups, n_top = time.perf_counter(), 0, 0, 0  # n_top: last groups of kept
    while len(kept) < n_prompts:
        want = n_prompts - len(kept)
        seed = stream.sampling_seed()  # where the stream stands: the same draws for whoever samples it
        examples = stream.next_batch(want)
        with seeded(seed, next(model.parameters()).device):
            p_ids, p_lens, c_ids, c_lens, *gen = sample(model, tokenizer,
                                                        [system_render(e) for e in examples], s,
                                                        eos_ids, record_logprobs=record_logprobs)
        texts = decode_completions(tokenizer, c_ids, c_lens)
        rep = [ex for ex in examples for _ in range(G)]
        rewards_N, breakdown, failures = score(texts, rep, c_lens, specs, s, failure_value)
        stats["reward_failures"] += sum(failures.values())
        if filter_metric != "reward" and filter_metric not in breakdown:
            raise UserError(f"filter metric {filter_metric!r} is not among the rewards "
                            f"({', '.join(breakdown)}) nor 'reward'")
        metric_N = rewards_N if filter_metric == "reward" else torch.tensor(breakdown[filter_metric])
        flat = zero_variance_groups(metric_N.view(-1, G))
        if rounds == 0:
            stats["zero_var_frac"] = float(flat.float().mean())
        generated_groups += len(examples)
        for g, ex in enumerate(examples):
            sl = slice(g * G, (g + 1) * G)
            group = (ex, p_ids[sl], p_lens[sl], c_ids[sl], c_lens[sl], rewards_N[sl], texts[sl],
                     {k: v[sl] for k, v in breakdown.items()}, gen[0][sl] if gen else None,
                     gen[1][sl] if gen else None)
            (spare if dynamic_sampling and flat[g] else kept).append(group)
        if len(kept) >= n_prompts or not dynamic_sampling:
            break
        if rounds >= max_refill_rounds:
            top_up = spare[: n_prompts - len(kept)]  # flat in the metric: outside the loss, below
            n_top = len(top_up)
            stats["topped_up_groups"] = float(n_top)
            kept += top_up
            break
        rounds += 1
    stats["refill_rounds"] = float(rounds)
    kept = kept[:n_prompts]
    pad = tokenizer.pad_token_id
    rewards_N = torch.cat([g[5] for g in kept])
    adv_N = group_advantages(rewards_N.view(-1, G).double(), scale=scale).float().view(-1)
    loss_rows_N = None  # [N] bool: False for the topped-up rows (the last n_top groups)
    if n_top:
        loss_rows_N = torch.arange(len(kept) * G) < (len(kept) - n_top) * G
        adv_N = adv_N.masked_fill(~loss_rows_N, 0.0)
    stats["topped_up_frac"] = n_top / len(kept)
    c_ids = pad_cat([g[3] for g in kept], pad, left=False)
    c_lens = torch.cat([g[4] for g in kept])
    batch = RolloutBatch(prompt_ids=pad_cat([g[1] for g in kept], pad, left=True),
                         prompt_lens=torch.cat([g[2] for g in kept]), completion_ids=c_ids,
                         completion_lens=c_lens, rewards=rewards_N, advantages=adv_N,
                         weight_version=weight_version, meta={"group_size": G, "gen_calls": rounds + 1},
                         temperature=s.temperature,
                         gen_logprobs=pad_cat([g[8] for g in kept], 0, left=False) if record_logprobs
                         else None,
                         gen_logprobs_full=pad_cat([g[9] for g in kept], 0, left=False) if record_logprobs
                         else None, loss_rows=loss_rows_N)
    breakdown = {k: [x for g in kept for x in g[7][k]] for k in kept[0][7]}
    stats.update(generated_groups=float(generated_groups), gen_seconds=time.perf_counter() - t0,
                 completion_len_mean=float(c_lens.float().mean()),
                 completion_len_max=float(c_lens.max()),
                 reward_mean=float(rewards_N.mean()), reward_std=float(rewards_N.std()))
    for name, values in breakdown.items():
        stats[f"reward/{name}"] = sum(values) / len(values)
    return Rollout(batch, [g[0] for g in kept], [t for g in kept for t in g[6]], breakdown, stats)


def split(roll: Rollout, parts: int) -> list[Rollout]:
    """One rollout of every rank's prompts -> `parts` rollouts of whole groups, group g in part
    g % parts (so dynamic sampling's top-ups, the last groups, spread over the parts). Each part's
    batch is the rows of its groups, its completion width trimmed to its own longest row; stats and
    meta are the whole rollout's (its `gen_calls`: the sampling calls that made every part)."""
    b, G = roll.batch, int(roll.batch.meta.get("group_size", 1))
    n_groups = b.batch_size // G
    assert n_groups % parts == 0, f"{n_groups} groups do not split into {parts} parts"
    out = []
    for r in range(parts):
        rows = torch.tensor([g * G + j for g in range(r, n_groups, parts) for j in range(G)])
        width = max(int(b.completion_lens[rows].max()), 1)
        kw = {k: (v[rows][:, :width] if k in ("completion_ids", "gen_logprobs", "gen_logprobs_full",
                                               "ref_logprobs") else v[rows])
              if isinstance(v, torch.Tensor) else v for k, v in vars(b).items()}
        part = RolloutBatch(**{**kw, "meta": dict(b.meta)})
        out.append(Rollout(part, roll.examples[r::parts], [roll.completions[i] for i in rows.tolist()],
                           {k: [v[i] for i in rows.tolist()] for k, v in roll.breakdown.items()},
                           dict(roll.stats)))
    return out


def json_breakdown(breakdown: dict[str, list[float]]) -> dict[str, list[float]]:
    """The per-function rewards as JSON-safe floats (non-finite -> 0.0), for a batch's meta."""
    return {k: [float(v) if math.isfinite(v) else 0.0 for v in vs] for k, vs in breakdown.items()}


def evaluate(model, tokenizer, examples: list[dict], system_render, eos_ids: list[int],
             max_new_tokens: int, reward: str, batch_size: int = 32) -> int:
    """Held-out correct answers: greedy completions scored by `reward` (1.0 = correct), counted."""
    s = SampleSettings(num_generations=1, max_new_tokens=max_new_tokens)
    correct = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        _, _, c_ids, c_lens = sample(model, tokenizer, [system_render(e) for e in chunk], s,
                                     eos_ids, greedy=True, repeat=1)
        texts = decode_completions(tokenizer, c_ids, c_lens)
        _, breakdown, _ = score(texts, chunk, c_lens, [RewardSpec(reward)], s, 0.0)
        correct += sum(1 for v in breakdown[reward] if v >= 1.0)
    return correct


def dynamic_filter_metric(cfg, specs) -> str:
    """The metric dynamic sampling filters groups on (rollout.make_rollout's filter_metric): a
    reward name from `specs` or 'reward'; 'auto' picks --eval_reward when it is in `specs`."""
    names = [s.name for s in specs]
    if cfg.filter_metric == "auto":
        return cfg.eval_reward if cfg.eval_reward in names else "reward"
    if cfg.filter_metric != "reward" and cfg.filter_metric not in names:
        raise UserError(f"--filter_metric={cfg.filter_metric} is not among the rewards "
                        f"({', '.join(names)}); use one of them, 'reward' or 'auto'")
    return cfg.filter_metric


def sample_settings(cfg):
    """How completions are sampled (rollout.SampleSettings), for the trainer and workers."""
    return SampleSettings(num_generations=cfg.num_generations, max_new_tokens=cfg.max_new_tokens,
                          min_new_tokens=cfg.min_new_tokens, temperature=cfg.temperature,
                          top_p=cfg.top_p, overlong_cache=cfg.overlong_cache, sampler=cfg.sampler)
