"""The DeepSpeed config the trainer builds, and what it does in a real ZeRO-2 engine: with bf16,
gradients are accumulated across micro-batches in fp32 (our micro-batch losses are already divided
by the whole step's token count, so many small contributions are summed)."""
import pytest
import torch

from simple_grpo import engine as eng
from simple_grpo.errors import UserError
from simple_grpo.models import build_tiny_model

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


def test_init_distributed_rejects_unknown_or_gpu_only_backends():
    with pytest.raises(UserError, match="--dist_backend must be one of"):
        eng.init_distributed("mpi")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="needs CUDA GPUs"):
            eng.init_distributed("cpu:gloo,cuda:nccl")


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
