"""LoRA (--lora_r > 0) end to end on the tiny model with the real DeepSpeed engine: only the
adapter trains (base weights bit-identical), the reference is the model with its adapter disabled
(KL 0 at step 1, no server process), resume is bit-exact with adapter-only checkpoints, final/ is
the merged model, and a generation worker process trains on an adapter-only publish."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from simple_grpo.cli import parse_config
from simple_grpo.errors import UserError
from simple_grpo.models import build_tiny_model, load_model
from simple_grpo.common import lora
from simple_grpo.common.config import TrainConfig, resolve
from simple_grpo.train.engine import standalone_env
from simple_grpo.gen.reward_registry import register
from simple_grpo.gen.worker import Worker
from simple_grpo.wire.client import RefClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import grpo_ref_split  # noqa: E402

SMALL = dict(prompts_per_step=2, num_generations=4, micro_batch_size=4, max_new_tokens=8)
LORA = dict(lora_r=4, lora_alpha=8)


@register("test_lora_distinct_chars")
def distinct_chars(completion: str, example: dict) -> float:
    """Varies across random completions, so advantages are non-zero even for a random model."""
    return len(set(completion)) / 10.0


def args(**kw) -> list[str]:
    a = dict(**SMALL, **LORA, eval_every=0, lr=1e-2, warmup_steps=1, rewards="test_lora_distinct_chars",
             save_every=0, plot_every=0, samples_every=0)
    a.update(kw)
    return [f"--{k}={v}" for k, v in a.items()]


def metrics(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def base_weights(peft_model) -> dict[str, torch.Tensor]:
    """The frozen base weights of a PeftModel under the plain model's names."""
    sd = peft_model.get_base_model().state_dict()
    return {k.replace(".base_layer.", "."): v for k, v in sd.items() if "lora_" not in k}


def fresh_adapter(model_dir, seed: int = 0) -> dict[str, torch.Tensor]:
    cfg = resolve(parse_config(TrainConfig, args(model=model_dir)))
    return lora.adapter_state_dict(lora.wrap(load_model(str(model_dir), "float32"), cfg, seed))


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One LoRA run with beta > 0 and no --ref_url -> (run dir, the trained PeftModel). Starting a
    reference server process would fail the run."""
    run = tmp_path_factory.mktemp("lora") / "run"
    captured = {}
    real_export = lora.export_options

    def spy(model):
        captured["model"] = getattr(model, "module", model)
        return real_export(model)

    def no_server(*a, **k):
        raise AssertionError("a LoRA run without --ref_url must not start a reference server")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lora, "export_options", spy)
        mp.setattr("simple_grpo.train.ref_process.RefProcess", no_server)
        grpo_ref_split.main(args(model=tiny_model_dir, run_dir=run, steps=3, beta=0.04))
    return run, captured["model"]


def test_only_the_adapter_trains(trained, tiny_model_dir):
    run, model = trained
    before = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    after = base_weights(model)
    assert set(before) <= set(after)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"frozen base weights changed: {changed}"
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    init, now = fresh_adapter(tiny_model_dir), lora.adapter_state_dict(model)
    assert init.keys() == now.keys() and len(now) == 2 * 7 * 2  # A, B x 7 linears x 2 layers
    unchanged = [k for k in init if torch.equal(init[k], now[k])]
    assert not unchanged, f"adapter weights not updated: {unchanged}"


def test_reference_is_the_disabled_adapter(trained):
    rows = metrics(trained[0])
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["kl"] < 1e-6, f"adapter B = 0 at step 1: policy == reference, got KL {rows[0]['kl']}"
    assert rows[-1]["kl"] > 0.0, "after updates the adapter moves the policy away from the base"
    assert all(r["ref_seconds"] > 0 for r in rows)  # computed in-process each step


def test_final_is_the_merged_model_and_the_adapter(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, model = trained
    merged = AutoModelForCausalLM.from_pretrained(str(run / "final"), dtype=torch.float32).eval()
    assert not any("lora_" in k for k in merged.state_dict())
    reloaded = PeftModel.from_pretrained(load_model(str(tiny_model_dir), "float32"),
                                         str(run / "final" / "adapter")).eval()
    ids = torch.randint(3, 300, (3, 12), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want, atol=0, rtol=0)


def test_resume_is_bit_exact_with_adapter_only_checkpoints(tiny_model_dir, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = dict(model=tiny_model_dir, beta=0.04, save_every=2)
    grpo_ref_split.main(args(run_dir=straight, steps=4, **common))
    grpo_ref_split.main(args(run_dir=split, steps=2, **common))
    ckpt = split / "checkpoints" / "step-000002" / "mp_rank_00_model_states.pt"
    module = torch.load(ckpt, map_location="cpu", weights_only=False)["module"]
    assert module and all("lora_" in k for k in module), [k for k in module if "lora_" not in k]
    grpo_ref_split.main(args(run_dir=split, steps=4, resume="true", **common))
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(straight / "final" / name)), load_file(str(split / "final" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs after resume"
    assert [r["step"] for r in metrics(split)] == [1, 2, 3, 4]
    assert [r["kl"] for r in metrics(split)] == [r["kl"] for r in metrics(straight)]
    with pytest.raises(UserError, match="resume with the run's --model and --lora_"):
        grpo_ref_split.main(args(run_dir=split, steps=5, resume="true", **{**common, "lora_r": 8}))
    # same shapes, another model: the saved settings catch what the state dict cannot
    with pytest.raises(UserError, match=r"--lora_alpha=8 \(this run: 16\)"):
        grpo_ref_split.main(args(run_dir=split, steps=5, resume="true", **{**common, "lora_alpha": 16}))


def test_bad_lora_options_are_one_line_errors(tiny_model_dir):
    with pytest.raises(UserError, match="--lora_r must be >= 0"):
        resolve(parse_config(TrainConfig, ["--lora_r=-1"]))
    with pytest.raises(UserError, match="--lora_dropout"):
        resolve(parse_config(TrainConfig, ["--lora_r=4", "--lora_dropout=1.5"]))
    cfg = resolve(parse_config(TrainConfig, ["--lora_r=4", "--lora_target_modules=qkv_proj"]))
    with pytest.raises(UserError, match="--lora_target_modules=qkv_proj") as e:
        lora.wrap(build_tiny_model(), cfg, seed=0)
    assert "\n" not in str(e.value)


def test_worker_trains_on_an_adapter_only_publish(tiny_model_dir, ref_server, tmp_path):
    """Trainer (in-process, --generate_locally=false) + a worker process, both with LoRA: the
    published file is the adapter only (marked as one), the worker loads it into its own base
    model and the trainer trains its batches; a worker without LoRA refuses the file in one line."""
    srv = ref_server(queue_size=1, weights_dir=str(tmp_path / "weights"))
    common = [f"--model={tiny_model_dir}", f"--ref_url={srv.url}", "--rewards=overlong"] + \
        [f"--{k}={v}" for k, v in {**SMALL, **LORA}.items()]
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([sys.executable, str(ROOT / "grpo_ref_split.py"), *common, "--mode=generate",
                               "--worker_index=4"], cwd=ROOT, env=standalone_env(OMP_NUM_THREADS="1"),
                              stdout=open(log, "w"), stderr=subprocess.STDOUT)
    run = tmp_path / "run"
    try:
        grpo_ref_split.main(common + [f"--run_dir={run}", "--steps=5", "--generate_locally=false",
                                      "--eval_every=0", "--save_every=0", "--plot_every=0", "--lr=1e-2",
                                      "--warmup_steps=1", "--ref_timeout=120", "--max_staleness=-1"])
    finally:
        worker.kill()
        worker.wait()
    trained = [json.loads(x) for x in (run / "batches.jsonl").read_text().splitlines()]
    assert all(t["producer"].startswith("gen-") for t in trained) and len(trained) == 5
    assert max(t["weight_version"] for t in trained) >= 1, "no batch from a published adapter"
    assert "loaded weight version" in log.read_text()

    published = tmp_path / "weights" / "weights.safetensors"
    full = (Path(tiny_model_dir) / "model.safetensors").stat().st_size
    assert published.stat().st_size < full / 5, (published.stat().st_size, full)
    with safe_open(str(published), framework="pt") as f:
        assert f.metadata()["format"] == "lora-adapter" and all("lora_" in k for k in f.keys())
    assert RefClient(srv.url).weights_version()["version"] == 5

    # the last publish is the final adapter: a worker applying it to its base model == final/
    def cfg(**kw):
        a = {"model": tiny_model_dir, "ref_url": srv.url, "rewards": "overlong", **SMALL, **kw}
        return resolve(parse_config(TrainConfig, [f"--{k}={v}" for k, v in a.items()]))

    w = Worker(cfg(**LORA), RefClient(srv.url))
    assert w.sync_weights() and w.version == 5
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(run / "final"), dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(w.model(input_ids=ids).logits, merged(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)
    plain = Worker(cfg(), RefClient(srv.url))
    with pytest.raises(UserError, match="publishes a LoRA adapter .* this worker has no LoRA"):
        plain.sync_weights()
