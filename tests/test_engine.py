"""The DeepSpeed config the trainer builds, and what it does in a real ZeRO-2 engine: with bf16,
gradients are accumulated across micro-batches in fp32 (our micro-batch losses are already divided
by the whole step's token count, so many small contributions are summed)."""
import pytest
import torch

from simple_grpo.errors import UserError
from simple_grpo.models import build_tiny_model
from simple_grpo.train import engine as eng

deepspeed = pytest.importorskip("deepspeed")


@pytest.mark.parametrize("bf16, user_cfg, want", [
    (True, {}, "fp32"),                                          # bf16 run: fp32 accumulation
    (False, {}, None),                                           # fp32 run: nothing to add
    (True, {"data_types": {"grad_accum_dtype": "bf16"}}, "bf16"),  # a user's explicit choice wins
])
def test_ds_config_grad_accum_dtype(tmp_path, bf16, user_cfg, want):
    import json

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **user_cfg}))
    cfg = eng.ds_config(path, micro_batch=2, grad_accum=4, world_size=2, grad_clip=1.0, bf16=bf16)
    assert cfg["bf16"]["enabled"] is bf16
    assert cfg.get("data_types", {}).get("grad_accum_dtype") == want
    assert cfg["train_batch_size"] == 2 * 4 * 2


def test_ds_config_errors_are_one_line(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        eng.ds_config(tmp_path / "bad.json", micro_batch=1, grad_accum=1, world_size=1, grad_clip=0,
                      bf16=False)
    with pytest.raises(UserError, match="not found"):
        eng.ds_config(tmp_path / "missing.json", micro_batch=1, grad_accum=1, world_size=1,
                      grad_clip=0, bf16=False)


@pytest.mark.parametrize("stage, refused", [
    (3, True),      # ZeRO-3: ranks' unequal forward counts would hang its parameter gathering
    ("3", True),    # the same written as a string
    (0, False),     # plain data parallel
    (1, False),     # optimizer states sharded
    (2, False),     # + gradients sharded: the default
    (None, False),  # no stage given: the trainer's default 2
])
def test_ds_config_refuses_zero_stage_3(tmp_path, stage, refused):
    import json

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {} if stage is None else {"stage": stage}}))
    build = lambda: eng.ds_config(path, micro_batch=1, grad_accum=1, world_size=1,  # noqa: E731
                                  grad_clip=0, bf16=False)
    if not refused:
        assert build()["zero_optimization"]["stage"] == (2 if stage is None else stage)
        return
    with pytest.raises(UserError) as e:
        build()
    msg = str(e.value)
    assert "\n" not in msg, "one line"
    assert str(path) in msg and "stage 3" in msg, "names the file and the setting"
    assert "different numbers of forward passes" in msg, "says why"
    assert "use stage 2" in msg and "--offload_optimizer" in msg and "LoRA" in msg, "says what instead"


def test_ds_config_default_is_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a run started outside the repo still finds the repo's ds_config.json
    cfg = eng.ds_config("ds_config.json", micro_batch=1, grad_accum=2, world_size=1, grad_clip=1.0,
                        bf16=False)
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["gradient_accumulation_steps"] == 2


def test_init_distributed_rejects_unknown_or_gpu_only_backends(monkeypatch):
    with pytest.raises(UserError, match="--dist_backend must be one of"):
        eng.init_distributed("mpi")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU box, also on a GPU one
    for backend in ("nccl", "cpu:gloo,cuda:nccl"):
        with pytest.raises(UserError, match=f"--dist_backend={backend} needs CUDA GPUs"):
            eng.init_distributed(backend)


def _accumulated_grads(acc_dtype: str | None, xs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients a bf16 ZeRO-2 engine holds after len(xs) micro-batches (before the step)."""
    from deepspeed.utils import safe_get_full_grad

    n = len(xs)
    cfg = eng.ds_config("ds_config.json", micro_batch=1, grad_accum=n, world_size=1, grad_clip=0.0,
                        bf16=True)
    if acc_dtype is not None:
        cfg["data_types"]["grad_accum_dtype"] = acc_dtype
    engine = eng.build_engine(build_tiny_model(seed=1).to(torch.bfloat16), lr=0.0, weight_decay=0.0,
                              warmup_steps=1, config=cfg)
    for i, x in enumerate(xs):
        engine.backward(engine(input_ids=x, labels=x).loss / n, scale_wrt_gas=False)
        if i < n - 1:
            engine.step()  # not a boundary yet: only accumulates
    return {k: safe_get_full_grad(p).double() for k, p in engine.module.named_parameters()}


def test_bf16_gradients_accumulate_in_fp32(dist_env):
    """The built config (no override) sums 32 bf16 micro-batch gradients in fp32: equal to the
    float64 sum of the same bf16 gradients to ~1e-8, where bf16 accumulation is ~1e-2 off."""
    n = 32
    g = torch.Generator().manual_seed(0)
    xs = [torch.randint(3, 300, (1, 12), generator=g) for _ in range(n)]
    plain = build_tiny_model(seed=1).to(torch.bfloat16)  # the same bf16 model, plain torch
    want = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in plain.named_parameters()}
    for x in xs:
        plain.zero_grad()
        (plain(input_ids=x, labels=x).loss / n).backward()
        for k, p in plain.named_parameters():
            want[k] += p.grad.double()

    def worst(got):
        return max(float((got[k] - want[k]).norm() / want[k].norm()) for k in want)

    assert worst(_accumulated_grads(None, xs)) < 1e-6, "bf16 micro-batch gradients summed in fp32"
    assert worst(_accumulated_grads("bf16", xs)) > 1e-4, "the check must see bf16 accumulation"


def _steps(offload: bool, steps: int = 3) -> tuple[object, dict[str, torch.Tensor]]:
    """`steps` optimizer steps (2 micro-batches each, clipping, warm-up, weight decay) of a tiny
    model in a real ZeRO-2 engine -> (engine, parameters)."""
    cfg = eng.ds_config("ds_config.json", micro_batch=1, grad_accum=2, world_size=1, grad_clip=1.0,
                        bf16=False, offload_optimizer=offload)
    engine = eng.build_engine(build_tiny_model(seed=1), lr=1e-2, weight_decay=0.1, warmup_steps=2,
                              config=cfg)
    g = torch.Generator().manual_seed(0)
    for _ in range(2 * steps):
        x = torch.randint(3, 300, (1, 12), generator=g)
        engine.backward(engine(input_ids=x, labels=x).loss / 2, scale_wrt_gas=False)
        engine.step()
    return engine, {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


@pytest.mark.slow  # DeepSpeed's CPU Adam is JIT-compiled on first use: ~1 min on 2 cores, then cached
def test_offload_optimizer_steps_equal_plain_adamw(dist_env):
    """--offload_optimizer: the same parameters after 3 steps as torch's AdamW without offload (the
    same AdamW math: betas, eps, decoupled weight decay, lr warm-up), with the optimizer states
    (moments and fp32 master weights) held by DeepSpeed's CPU Adam in CPU memory."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    plain, want = _steps(offload=False)
    engine, got = _steps(offload=True)
    assert isinstance(engine.optimizer.optimizer, DeepSpeedCPUAdam) and engine.optimizer.cpu_offload
    assert not isinstance(plain.optimizer.optimizer, DeepSpeedCPUAdam)
    states = [t for s in engine.optimizer.optimizer.state.values() for t in s.values()
              if isinstance(t, torch.Tensor) and t.numel() > 1]
    assert states and all(t.device.type == "cpu" for t in states), "Adam moments live on the CPU"
    assert all(p.device.type == "cpu" for p in engine.optimizer.single_partition_of_fp32_groups)
    moved = max(float((got[k] - build_tiny_model(seed=1).state_dict()[k]).abs().max()) for k in got)
    assert moved > 1e-3, "the steps must change the parameters"
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0, msg=k)
    assert float(engine.get_lr()[0]) == float(plain.get_lr()[0]) == pytest.approx(1e-2)


@pytest.mark.slow
def test_offload_without_a_compiler_is_one_line(tiny_model_dir, tmp_path):
    """Where CPU Adam cannot be built (here: CXX names no compiler and the extension cache is
    empty), the trainer stops with one line that says how to get it built, and exit code 2."""
    import subprocess
    import sys
    from pathlib import Path

    from deepspeed.git_version_info import installed_ops

    if installed_ops.get("cpu_adam"):
        pytest.skip("this DeepSpeed was installed with CPU Adam prebuilt: nothing to compile")
    root = Path(__file__).resolve().parents[1]
    env = eng.standalone_env(OMP_NUM_THREADS="1", CXX="/nonexistent/g++",
                             TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    r = subprocess.run([sys.executable, str(root / "grpo_ref_split.py"), f"--model={tiny_model_dir}",
                        f"--run_dir={tmp_path / 'run'}", "--beta=0", "--eval_every=0",
                        "--offload_optimizer"], cwd=root, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("grpo_ref_split.py: error: --offload_optimizer: DeepSpeed's CPU Adam could "
                           "not be built ("), last
    assert "/nonexistent/g++" in last, "the reason names the missing compiler"
    assert "DS_BUILD_CPU_ADAM=1 pip install deepspeed" in last and "Traceback" not in r.stderr
