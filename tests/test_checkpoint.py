"""Checkpoints through a real DeepSpeed ZeRO-2 engine on CPU (one process, gloo): exact resume,
keep_last, crash and full-disk safety, HF export, RNG helpers.

The first DeepSpeed CPU init on a machine JIT-compiles its shared-memory comm op (~1 min, cached in
~/.cache/torch_extensions); later inits take about a second."""
import errno
import json
import logging
import os
import random
import resource
import signal

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must be set before deepspeed is imported

from simple_grpo.errors import UserError  # noqa: E402
from simple_grpo.models import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from simple_grpo.train import checkpoint as ck  # noqa: E402
from simple_grpo.train.engine import free_port  # noqa: E402

torch.set_num_threads(1)
deepspeed = pytest.importorskip("deepspeed")

DS_CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
             "gradient_clipping": 1.0, "zero_optimization": {"stage": 2},
             "steps_per_print": 10**9, "wall_clock_breakdown": False}


@pytest.fixture
def make_engine(dist_env):
    """make_engine(seed) -> a fresh ZeRO-2 engine around a tiny Llama, AdamW and a LR schedule."""
    def make(seed: int = 0):
        model = build_tiny_model(seed=seed)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.1, total_iters=10)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                               config=DS_CONFIG)
        return engine
    return make


def train(engine, steps: int) -> None:
    """Steps on data drawn from the global torch RNG, so resuming must restore the RNG too."""
    for _ in range(steps):
        x = torch.randint(3, 300, (2, 12))
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()


def params(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def client(step: int) -> dict:
    return {"step": step, "rng": ck.rng_state(), "data_pos": 7 * step, "weight_version": step}


def test_resume_is_bit_exact(make_engine, tmp_path):
    torch.manual_seed(1)
    a = make_engine()
    train(a, 2)
    assert ck.save_checkpoint(a, tmp_path, 2, client(2)) == tmp_path / "step-000002"
    train(a, 2)
    params_a = params(a)

    torch.manual_seed(999)  # different RNG and different initial weights: all must come from disk
    b = make_engine(seed=5)
    state = ck.load_latest(b, tmp_path)
    assert state is not None and state["step"] == 2 and state["data_pos"] == 14
    ck.set_rng_state(state["rng"])
    train(b, 2)
    params_b = params(b)
    assert params_a.keys() == params_b.keys()
    for k in params_a:
        assert torch.equal(params_a[k], params_b[k]), f"{k} differs after resume"
    assert b.global_steps == a.global_steps == 4
    assert b.lr_scheduler.get_last_lr() == a.lr_scheduler.get_last_lr()


def test_keep_last_and_layout(make_engine, tmp_path):
    e = make_engine()
    for step in (1, 2, 3, 4):
        train(e, 1)
        ck.save_checkpoint(e, tmp_path, step, client(step), keep_last=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3, 4]
    assert (tmp_path / "latest").read_text() == "step-000004"
    assert not list(tmp_path.glob(".tmp-*"))
    files = {p.name for p in (tmp_path / "step-000004").iterdir()}
    assert "mp_rank_00_model_states.pt" in files, files
    assert any(f.startswith("zero_pp_rank_0") for f in files), files
    # saving the same step again replaces it in place
    ck.save_checkpoint(e, tmp_path, 4, client(4), keep_last=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3, 4]


def test_no_checkpoint_and_dangling_latest(make_engine, tmp_path):
    e = make_engine()
    assert ck.load_latest(e, tmp_path / "nothing") is None
    (tmp_path / "latest").write_text("step-000009")
    with pytest.raises(UserError, match="does not exist"):
        ck.load_latest(e, tmp_path)


def _crash_mid_save(engine, monkeypatch):
    """Make engine.save_checkpoint write part of the files, then fail like a full disk."""
    real = engine.save_checkpoint

    def partial(save_dir, tag=None, client_state={}, save_latest=True, **kw):
        d = os.path.join(save_dir, tag)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "mp_rank_00_model_states.pt"), "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine, "save_checkpoint", partial)
    return real


def test_crash_mid_save_keeps_previous(make_engine, tmp_path, monkeypatch, caplog):
    e = make_engine()
    train(e, 1)
    ck.save_checkpoint(e, tmp_path, 1, client(1))
    before = params(e)
    train(e, 1)
    _crash_mid_save(e, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="simple_grpo"):
        assert ck.save_checkpoint(e, tmp_path, 2, client(2), on_error="warn") is None
    assert "step 2" in caplog.text and "No space left" in caplog.text and "step-000001" in caplog.text
    assert (tmp_path / "latest").read_text() == "step-000001"
    assert not list(tmp_path.glob(".tmp-*")), "partial temp folder left behind"

    with pytest.raises(UserError, match="disk full"):
        ck.save_checkpoint(e, tmp_path, 2, client(2), on_error="stop")
    assert (tmp_path / "latest").read_text() == "step-000001"

    # a leftover .tmp folder from a hard crash (process killed) is ignored by load and cleaned by save
    (tmp_path / ".tmp-step-000003").mkdir()
    (tmp_path / ".tmp-step-000003" / "mp_rank_00_model_states.pt").write_bytes(b"junk")
    fresh = make_engine(seed=3)
    assert ck.load_latest(fresh, tmp_path)["step"] == 1
    for k, v in params(fresh).items():
        assert torch.equal(v, before[k]), k


def test_real_write_limit(make_engine, tmp_path, caplog):
    """A real failing write (RLIMIT_FSIZE -> EFBIG, like a full disk; needs no mount or root).
    torch.save reports it as a RuntimeError from its zip writer, not as OSError."""
    e = make_engine()
    train(e, 1)
    ck.save_checkpoint(e, tmp_path, 1, client(1))
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # the model file is ~0.5 MB
    try:
        with caplog.at_level(logging.WARNING, logger="simple_grpo"):
            out = ck.save_checkpoint(e, tmp_path, 2, client(2), min_free_gb=1e6)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert out is None
    assert "low disk space" in caplog.text and str(tmp_path) in caplog.text  # the pre-save check
    assert "checkpoint of step 2" in caplog.text
    assert (tmp_path / "latest").read_text() == "step-000001"
    assert not list(tmp_path.glob(".tmp-*"))
    assert ck.load_latest(make_engine(), tmp_path)["step"] == 1


def test_export_pretrained_roundtrip(make_engine, tmp_path):
    from transformers import AutoModelForCausalLM

    e = make_engine()
    train(e, 1)
    out = ck.export_pretrained(e, build_tiny_tokenizer(), tmp_path / "final")
    assert (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists()
    ck.export_pretrained(e, build_tiny_tokenizer(), tmp_path / "final")  # overwrite works
    assert [p.name for p in tmp_path.iterdir()] == ["final"], "temp folders left behind"
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(3, 300, (2, 9))
    e.module.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, e.module(input_ids=x).logits)


def test_rng_state_roundtrip_through_json():
    np = pytest.importorskip("numpy")
    state = json.loads(json.dumps(ck.rng_state()))
    want = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    ck.set_rng_state(state)
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert want[0] == got[0] and want[1] == got[1] and torch.equal(want[2], got[2])


def _two_rank_worker(rank: int, port: int, root: str, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed as ds

    model = build_tiny_model(seed=0)
    engine, *_ = ds.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                               config=DS_CONFIG)
    torch.manual_seed(rank)
    train(engine, 1)
    ok = ck.save_checkpoint(engine, root, 1, {"step": 1})
    if rank == 1:  # this rank alone hits a full disk inside DeepSpeed's real save path
        def full(*a, **k):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 0")
        engine.checkpoint_engine.save = full
    train(engine, 1)
    failed = ck.save_checkpoint(engine, root, 2, {"step": 2})
    state = ck.load_latest(engine, root)
    results[rank] = (ok is not None, failed is None, state["step"])


@pytest.mark.slow
def test_two_ranks_agree_on_a_one_rank_failure(tmp_path):
    """Two gloo ranks: both write their ZeRO-2 shard; when one rank's write fails, neither hangs,
    both report the failure and `latest` stays at the previous step."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_two_rank_worker, args=(free_port(), str(tmp_path), results), nprocs=2, join=True)
        assert dict(results) == {0: (True, True, 1), 1: (True, True, 1)}
    files = {p.name for p in (tmp_path / "step-000001").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files, files
    assert not list(tmp_path.glob(".tmp-*"))


def _stream():
    from simple_grpo.gen.data import PromptStream

    return PromptStream([{"question": f"q{i}", "answer": str(i)} for i in range(20)], seed=3)


@pytest.mark.parametrize("mode, saved, expect", [
    ("auto", False, "fresh"),    # an automatic restart before the first checkpoint: step 0
    ("auto", True, "resumed"),   # an automatic restart after one: the checkpoint's step, data, RNG
    ("true", True, "resumed"),   # --resume: the same
    ("false", True, "fresh"),    # the default ignores an existing checkpoint
    ("true", False, "error"),    # --resume with nothing to resume is one line
])
def test_resume_modes(mode, saved, expect, make_engine, tmp_path, capsys):
    torch.manual_seed(1)
    a, stream_a = make_engine(), _stream()
    train(a, 2)
    stream_a.next_batch(3)  # the data position a resumed run must continue from
    if saved:
        state = dict(step=2, weight_version=5, run_id="run-a", empty_steps=1, stream=[stream_a.state_dict()],
                     rng=[ck.rng_state()])
        ck.save_checkpoint(a, tmp_path, 2, state)
    want_next = [e["question"] for e in stream_a.next_batch(2)]
    want_rand = torch.rand(4)  # the RNG stream right after the save
    saved_params = params(a)

    torch.manual_seed(999)
    b, stream_b = make_engine(seed=5), _stream()
    fresh_params = params(b)
    if expect == "error":
        with pytest.raises(UserError, match="no checkpoint in"):
            ck.resume(b, tmp_path, mode, stream_b, rank=0)
        return
    got = ck.resume(b, tmp_path, mode, stream_b, rank=0)
    out = capsys.readouterr().out
    if expect == "fresh":
        assert {k: got[k] for k in ("step", "weight_version")} == {"step": 0, "weight_version": 0}
        assert len(got["run_id"]) == 32 and "resumed" not in out, got  # a new run
        assert stream_b.state_dict()["position"] == 0
        assert all(torch.equal(v, fresh_params[k]) for k, v in params(b).items()), "weights untouched"
        return
    assert got == {"step": 2, "weight_version": 5, "run_id": "run-a", "empty_steps": 1,
                   "overlap": None}, "the same run, resumed"
    assert f"resumed from {tmp_path / 'step-000002'} at step 2" in out, out
    assert [e["question"] for e in stream_b.next_batch(2)] == want_next, "the data position"
    assert torch.equal(torch.rand(4), want_rand), "the RNG state"
    assert all(torch.equal(v, saved_params[k]) for k, v in params(b).items()), "the weights"
    assert b.global_steps == a.global_steps == 2


def test_each_rank_resumes_its_own_rng_and_data_position(make_engine, tmp_path):
    """The checkpoint holds one RNG state and one data position per rank: rank 1 resumes rank 1's
    (its next random numbers and prompts are those it would have drawn), not rank 0's."""
    np = pytest.importorskip("numpy")
    rngs, positions, want = [], [], []
    for rank, seed in ((0, 10), (1, 11)):
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        stream = _stream()
        stream.next_batch(2 + 3 * rank)
        rngs.append(ck.rng_state())
        positions.append(stream.state_dict())
        want.append((random.random(), float(np.random.rand()), torch.rand(4),
                     [x["question"] for x in stream.next_batch(2)]))
    state = dict(step=3, weight_version=3, run_id="run-r", rng=rngs, stream=positions)
    ck.save_checkpoint(make_engine(), tmp_path, 3, state)
    for rank in (1, 0):
        random.seed(999), np.random.seed(999), torch.manual_seed(999)
        stream = _stream()
        assert ck.resume(make_engine(seed=5), tmp_path, "true", stream, rank=rank)["step"] == 3
        got = (random.random(), float(np.random.rand()), torch.rand(4),
               [x["question"] for x in stream.next_batch(2)])
        assert got[:2] == want[rank][:2] and torch.equal(got[2], want[rank][2]), rank
        assert got[3] == want[rank][3], rank
