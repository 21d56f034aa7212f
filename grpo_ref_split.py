"""GRPO / Dr.GRPO / DAPO / GSPO training with the reference model in its own process.

Each step: take prompts, sample a group of G completions per prompt with the current policy,
score them with the functions in rewards.py, turn rewards into group-relative advantages, get the
reference model's per-token log-probs from the reference server (the HTTP queue that extra
generation boxes also feed), and take one or more clipped policy-gradient steps with DeepSpeed.

Launch:
    python grpo_ref_split.py                        # CPU, one process, the default run
    deepspeed --num_gpus 2 grpo_ref_split.py        # 2 processes (GPUs, or CPU with gloo)
    CUDA_VISIBLE_DEVICES=1,2,3 deepspeed grpo_ref_split.py --ref_url=http://127.0.0.1:59875
    python grpo_ref_split.py --help                 # every option with its docstring

With beta > 0 and no --ref_url, a reference server is started on a free loopback port and
stopped at exit (with LoRA, --lora_r > 0, the reference is the trainer's own model with its
adapter disabled: no server). With beta = 0 no reference model is needed at all.

Overlap (--overlap=true, or auto: when that server has a device of its own): a sampler process
beside the server generates and scores batch k+1 with the weights of step k-1 while step k trains
(simple_grpo/train/sampler.py); each batch is then one step stale, corrected by TIS.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from simple_grpo.errors import exit_if_terminated


def main(argv: list[str]) -> dict:
    import torch

    from simple_grpo import models
    from simple_grpo.cli import parse_config
    from simple_grpo.gen import batch_contract, data, rollout
    from simple_grpo.train import checkpoint, engine as eng, inputs, loop as train_loop, publish
    from simple_grpo.train import rollout_source, sampler
    from simple_grpo.common import dropout
    from simple_grpo.common.config import TrainConfig, derive, loss_kwargs, resolve
    from simple_grpo.gen.reward_registry import reward_specs
    from simple_grpo.gen.rollout import dynamic_filter_metric, sample_settings

    cfg = resolve(parse_config(TrainConfig, argv, env_prefix="GRPO_", prog="grpo_ref_split.py"))
    if cfg.mode == "generate":  # a generation worker: sample, score, upload; never trains
        from simple_grpo.gen.worker import run_worker

        return run_worker(cfg)
    run_dir = train_loop.run_dir_of(cfg)
    if cfg.check:  # what this launch needs and has, loading nothing; exit 2 on a blocker
        from simple_grpo.train import preflight

        return preflight.run(cfg, run_dir)
    dist = eng.init_distributed(cfg.dist_backend, cfg.dist_timeout)
    cfg = sampler.finalize(cfg, dist)  # --overlap decided (a device to spare?), --tis=auto resolved
    d = derive(cfg, dist.world_size)
    train_loop.claim_run_dir(run_dir, cfg.resume, cfg.overwrite, dist.rank)  # one run per folder
    inputs.check_inputs(cfg, run_dir)  # rewards, task, --resume, packages: before anything loads
    torch.manual_seed(cfg.seed + dist.rank)

    # The reference server first: a named one must answer, an auto-started one loads meanwhile.
    ref_target = rollout_source.start_ref(cfg, dist, overlap=cfg.overlap == "true")
    # Model, data, rewards: everything fails fast with a readable message before training starts.
    specs = reward_specs(cfg)
    fields = dict(question_field=cfg.question_field, answer_field=cfg.answer_field)
    train_examples = data.load_examples(cfg.task, "train", seed=cfg.seed, **fields)
    test_examples = data.load_eval_examples(cfg.task, cfg.eval_task, cfg.eval_split, seed=cfg.seed,
                                            **fields)[:cfg.eval_prompts] if cfg.eval_every > 0 else []
    tokenizer = models.load_tokenizer(cfg.model, **models.hub_options(cfg))
    model = models.load_model(cfg.model, cfg.dtype, str(dist.device), cfg.attn_implementation,
                              **models.hub_options(cfg))
    # what every batch we train must have been made with (workers' too): settings, base model,
    # prompt rendering, task and reward code
    contract = batch_contract.expected_contract(cfg, specs, batch_contract.model_id(model), tokenizer)
    if cfg.disable_dropout:  # the policy trained is the one that sampled (--lora_dropout stays)
        dropout.disable(model)
    if cfg.lora_r > 0:  # only the adapters train; the same adapter on every rank (and worker)
        from simple_grpo.common import lora

        model = lora.wrap(model, cfg, seed=cfg.seed)
    if cfg.gradient_checkpointing:  # decoder layers recomputed in backward; before deepspeed.initialize
        from simple_grpo.train import grad_ckpt

        grad_ckpt.enable(model)
    stream = data.PromptStream(train_examples, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)
    render = data.prompt_renderer(tokenizer, cfg.system_prompt, cfg.chat_template_kwargs)
    eos_ids = rollout.eos_token_ids(tokenizer, model)

    ds = eng.ds_config(cfg.ds_config, micro_batch=cfg.micro_batch_size, grad_accum=d.grad_accum,
                       world_size=dist.world_size, grad_clip=cfg.grad_clip,
                       bf16=models.resolve_dtype(cfg.dtype, dist.device) == torch.bfloat16,
                       offload_optimizer=cfg.offload_optimizer)
    engine = eng.build_engine(model, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                              config=ds, device=dist.device, lr_scheduler=cfg.lr_scheduler,
                              total_steps=cfg.steps * cfg.num_iterations, betas=cfg.adam_betas)
    ref = rollout_source.connect_ref(cfg, dist, d, ref_target, engine.module, contract)  # same model, or one line

    # fresh, or the latest checkpoint (weights, optimizer, data position, RNG) with --resume
    state = checkpoint.resume(engine, run_dir / "checkpoints", cfg.resume, stream, dist.rank)
    rollout_source.begin_run(ref, state["run_id"], dist)  # a new run resets the server's queue/weights
    # a resumed run (or an automatic restart before its first checkpoint) rewrites the logs from there
    out = train_loop.Outputs(run_dir, cfg, dist, resume_step=state["step"],
                             restart=cfg.resume == "auto")
    ctx = train_loop.StepContext(cfg=cfg, d=d, dist=dist, engine=engine, tokenizer=tokenizer,
                                 stream=stream, render=render, eos_ids=eos_ids, specs=specs,
                                 loss_kw=loss_kwargs(cfg), ref=ref, settings=sample_settings(cfg),
                                 filter_metric=dynamic_filter_metric(cfg, specs), contract=contract,
                                 overlap=sampler.start_overlap(cfg, dist, ref_target, engine.module,
                                                               state["weight_version"],
                                                               state["step"], run_dir,  # --overlap
                                                               held=state["overlap"]))
    sampler.resume_held(ctx, state["overlap"])  # a resumed overlapped run: its next step's batch
    publisher = publish.publisher_for(cfg, dist, ref, state["weight_version"],  # rank 0, if workers
                                      engine.module)  # one line: do the weights fit the server?
    if publisher is not None:  # workers already polling start from this run's current weights
        publisher.hook(engine)  # an optimizer step waits for a publish's read of the weights
        publisher.step_end(engine.module, state["weight_version"], state["step"], cfg.publish_every,
                           wait=True)

    if state["step"] == 0 and test_examples:
        out.log_eval(0, train_loop.evaluate(ctx, test_examples))
    bar = out.progress(state["step"], cfg.steps)
    for step in range(state["step"] + 1, cfg.steps + 1):
        exit_if_terminated()  # a SIGTERM whose exit was swallowed (simple_grpo/errors.py)
        t0 = time.perf_counter()
        if ctx.overlap is not None:  # is the sampler still there? (else: generate here again)
            ctx.overlap.begin_step(step)
        metrics, roll, trained = train_loop.step(ctx, state["weight_version"])
        state["step"] = step
        updated = train_loop.advance(state, metrics, cfg, dist.rank)  # an empty step keeps the version
        if ctx.overlap is not None:  # this step's weights, for the sampler's batch after next
            metrics.update(ctx.overlap.publish(engine.module, state["weight_version"], step,
                                               last=step == cfg.steps))
        if publisher is not None and updated:  # a background upload, when a generation worker is there
            publisher.step_end(engine.module, state["weight_version"], step, cfg.publish_every)
        metrics.update(weight_version=state["weight_version"],
                       step_seconds=time.perf_counter() - t0,
                       **(publisher.metrics() if publisher is not None else {}))
        if test_examples and (step % cfg.eval_every == 0 or step == cfg.steps):
            metrics["eval_accuracy"] = train_loop.evaluate(ctx, test_examples)
        out.log_step(step, metrics, roll, bar, trained)
        if cfg.save_every >= 0 and ((cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps):
            client_state = dict(state, stream=train_loop.gather(stream.state_dict(), dist),
                                rng=train_loop.gather(checkpoint.rng_state(), dist),
                                config=dataclasses.asdict(cfg),  # --overlap: the next batch, held
                                overlap=sampler.hold_next_batch(ctx, state["weight_version"])
                                if step < cfg.steps else None)
            checkpoint.save_checkpoint(engine, run_dir / "checkpoints", step, client_state,
                                       keep_last=cfg.keep_last, min_free_gb=cfg.min_free_gb,
                                       on_error=cfg.on_save_error)
    if ctx.overlap is not None:
        ctx.overlap.stop()
    out.finish(engine.module, tokenizer)
    if publisher is not None:
        publisher.close()
    if ref is not None:
        ref.close()
    return {"run_dir": str(run_dir), "steps": state["step"]}


if __name__ == "__main__":
    from simple_grpo.errors import run_entry_point

    print(json.dumps(run_entry_point(main, sys.argv[1:], "grpo_ref_split.py")))
