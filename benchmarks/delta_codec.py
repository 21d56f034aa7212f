"""Weight deltas: how much of a published weights file changes between consecutive optimizer steps,
and which codec compresses the byte-wise XOR of two consecutive files best per second spent.

Trains the bundled model (SmolLM2-135M, fp32 master weights, AdamW) a few steps on random token
batches at each learning rate, snapshots the weights as the trainer publishes them (bf16 and fp32,
the safetensors file of `WeightPublisher`), and for each pair of consecutive files prints the
fraction of elements changed and, per codec, delta size / full size with encode (XOR + compress)
and decode (decompress + XOR) speed in MB of weights file per second. Then the chosen codec
end to end (`simple_grpo.wire.delta`: framing, sha256 of both files) and a worker's sync stall:
a full download + `load_into` vs a delta chain download + apply + `load_into`, through an
in-process reference server.

    python benchmarks/delta_codec.py [--lrs=1e-6,1e-5] [--steps=4] [--tokens=64] [--batch=2]
                                     [--no_sync] (skip the sync stall part)
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def file_bytes(model, dtype, version: int) -> bytes:
    import json

    from simple_grpo.train.publish import cpu_snapshot
    from simple_grpo.wire.weights import iter_state_dict_safetensors

    tensors, aliases = cpu_snapshot(model, dtype)
    return b"".join(iter_state_dict_safetensors(tensors, metadata={"version": str(version),
                                                                    "aliases": json.dumps(aliases)}))


def codecs(threads: int):
    import zstandard

    def zstd(level, th=0):
        c = zstandard.ZstdCompressor(level=level, threads=th)
        return c.compress, lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b)
    out = {"zlib-1": (lambda b: zlib.compress(b, 1), zlib.decompress),
           "zstd-1": zstd(1), "zstd-3": zstd(3)}
    if threads > 1:
        out[f"zstd-1 x{threads} threads"] = zstd(1, threads)
        out[f"zstd-3 x{threads} threads"] = zstd(3, threads)
    return out


def measure_pair(old: bytes, new: bytes, dtype_bytes: int, table: dict, threads: int) -> dict:
    import numpy as np

    a, b = np.frombuffer(old, np.uint8), np.frombuffer(new, np.uint8)
    t0 = time.perf_counter()
    x = np.bitwise_xor(a, b)
    xor_s = time.perf_counter() - t0
    changed = float((x.reshape(-1)[:len(x) // dtype_bytes * dtype_bytes].view(
        {2: np.uint16, 4: np.uint32}[dtype_bytes]) != 0).mean())
    xb = x.tobytes()
    row = {"changed": changed}
    for name, (enc, dec) in table.items():
        t0 = time.perf_counter()
        blob = enc(xb)
        enc_s = time.perf_counter() - t0 + xor_s
        t0 = time.perf_counter()
        back = dec(blob)
        np.bitwise_xor(a, np.frombuffer(back, np.uint8))
        dec_s = time.perf_counter() - t0 + xor_s
        assert back == xb
        row[name] = (len(blob) / len(new), len(new) / enc_s / 1e6, len(new) / dec_s / 1e6)
    return row


def train_pairs(a, lr: float, threads: int) -> dict:
    import torch

    from simple_grpo.models import BUNDLED, load_model

    torch.manual_seed(0)
    model = load_model(BUNDLED, "float32", "cpu").train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    vocab = model.get_output_embeddings().weight.shape[0]
    table, rows = codecs(threads), {"bf16": [], "fp32": []}
    last = {k: file_bytes(model, d, 0) for k, d in (("bf16", torch.bfloat16), ("fp32", None))}
    for step in range(1, a.steps + 1):
        ids = torch.randint(0, vocab, (a.batch, a.tokens))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for key, dtype, size in (("bf16", torch.bfloat16, 2), ("fp32", None, 4)):
            cur = file_bytes(model, dtype, step)
            if len(cur) == len(last[key]):
                rows[key].append(measure_pair(last[key], cur, size, table, threads))
            last[key] = cur
        print(f"lr {lr:g} step {step}: loss {loss.item():.3f}", file=sys.stderr, flush=True)
    return {"rows": rows, "last": last, "model": model, "opt": opt}


def end_to_end(old: bytes, new: bytes) -> tuple[float, float, float]:
    """simple_grpo.wire.delta itself: (ratio, encode MB/s, apply MB/s), sha256 included."""
    from simple_grpo.wire import delta
    from simple_grpo.wire.delta_apply import apply_delta

    t0 = time.perf_counter()
    enc = delta.encode_delta([old], [new], from_version=1, to_version=2)
    enc_s = time.perf_counter() - t0
    blob = b"".join(enc.chunks())
    t0 = time.perf_counter()
    apply_delta(io.BytesIO(old), io.BytesIO(blob), io.BytesIO())
    dec_s = time.perf_counter() - t0
    return len(blob) / len(new), len(new) / enc_s / 1e6, len(new) / dec_s / 1e6


def sync_stall(model, opt, tmp: Path) -> dict:
    """Seconds a worker's sync takes (generation waits): full download + load vs delta chain."""
    import torch

    from simple_grpo.models import build_tiny_model
    from simple_grpo.server.app import ServerConfig, ServerState, start
    from simple_grpo.train.publish import WeightPublisher
    from simple_grpo.gen.worker import load_into
    from simple_grpo.wire.client import RefClient
    from simple_grpo.wire.delta_apply import apply_chain_file

    state = ServerState(ServerConfig(model="tiny", port=0, weights_dir=str(tmp / "w"),
                                     max_weights_mb=8192), build_tiny_model())
    server = start(state)
    out = {}
    try:
        pub = WeightPublisher(RefClient(server.url, timeout=3600), dtype=torch.bfloat16)
        pub.publish(model, version=1, wait=True)
        client = RefClient(server.url, timeout=3600)
        target = type(model)(model.config).to(torch.bfloat16)
        t0 = time.perf_counter()
        base = client.download_weights(tmp / "v1.safetensors")
        out["full_fetch_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        load_into(target, base)
        out["load_s"] = time.perf_counter() - t1
        out["full_s"] = time.perf_counter() - t0
        for version in (2, 3):  # two more optimizer steps: a chain of two links from version 1
            ids = torch.randint(0, 1000, (2, 64))
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            pub.publish(model, version=version, wait=True)
        m = pub.metrics()
        assert m["publish_delta"] == 1.0, m
        t0 = time.perf_counter()
        got = client.download_delta(1, tmp / "chain", sha256=client.last_weights["sha256"])
        out["chain_fetch_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()  # in place, as Worker.sync_weights does
        apply_chain_file(base, tmp / "chain", base_sha256=client.last_weights["sha256"], from_version=1)
        out["apply_s"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        load_into(target, base)
        out["delta_load_s"] = time.perf_counter() - t1
        out["delta_s"] = time.perf_counter() - t0
        out["links"], out["chain_mb"] = got["links"], got["bytes"] / 1e6
        out["full_mb"] = base.stat().st_size / 1e6
        out["new_file_s"] = new_file_apply(base, tmp)
        pub.close()
    finally:
        server.close()
    return out


def new_file_apply(path: Path, tmp: Path) -> float:
    """Seconds to apply a one-link chain into a new file (the alternative to in place)."""
    from simple_grpo.wire import delta
    from simple_grpo.wire.delta_apply import apply_chain_file

    data = path.read_bytes()
    changed = bytearray(data)
    changed[len(data) // 2] ^= 1
    enc = delta.encode_delta([data], [bytes(changed)], from_version=3, to_version=4)
    blob = b"".join(enc.chunks())
    (tmp / "chain1").write_bytes(delta.pack_chain([{"from_version": 3, "to_version": 4,
                                                    "bytes": len(blob)}]) + blob)
    t0 = time.perf_counter()
    apply_chain_file(path, tmp / "chain1", tmp / "new.safetensors")
    return time.perf_counter() - t0


def main() -> None:
    import os

    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lrs", default="1e-6,1e-5")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no_sync", action="store_true", help="skip the worker sync stall part")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"smollm2-135m, AdamW (weight decay 0.01), {a.steps} steps of {a.batch} x {a.tokens} random "
          f"tokens per lr; mean over the consecutive pairs; MB/s of weights file, {os.cpu_count()} CPUs")
    print("| lr | publish dtype | elements changed | codec | delta / full | encode MB/s | decode MB/s |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for lr in (float(x) for x in a.lrs.split(",")):
        res = train_pairs(a, lr, a.threads)
        results[lr] = res
        for key, rows in res["rows"].items():
            mean = lambda f: sum(f(r) for r in rows) / len(rows)  # noqa: E731
            for codec in [k for k in rows[0] if k != "changed"]:
                print(f"| {lr:g} | {key} | {100 * mean(lambda r: r['changed']):.2f}% | {codec} | "
                      f"{100 * mean(lambda r: r[codec][0]):.2f}% | {mean(lambda r: r[codec][1]):.0f} | "
                      f"{mean(lambda r: r[codec][2]):.0f} |", flush=True)
    print("\nsimple_grpo.wire.delta end to end (framing + sha256 of both files), last pair of each run")
    print("| lr | publish dtype | delta / full | encode MB/s | apply MB/s |")
    print("|---|---|---|---|---|")
    for lr, res in results.items():
        model, opt = res["model"], res["opt"]
        ids = torch.randint(0, 1000, (a.batch, a.tokens))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()  # one more step
        opt.zero_grad(set_to_none=True)
        for key, dtype in (("bf16", torch.bfloat16), ("fp32", None)):
            ratio, enc, dec = end_to_end(res["last"][key], file_bytes(model, dtype, a.steps + 1))
            print(f"| {lr:g} | {key} | {100 * ratio:.2f}% | {enc:.0f} | {dec:.0f} |", flush=True)
    if a.no_sync:
        return
    print("\nworker sync stall (generation waits for it), bf16 publish, 1 thread, in-process server")
    print("| lr | full MB | full: fetch + load | chain of 2 links MB | delta: fetch + apply in place + load "
          "| (apply into a new file) |")
    print("|---|---|---|---|---|---|")
    torch.set_num_threads(1)
    for lr, res in results.items():
        with tempfile.TemporaryDirectory() as tmp:
            s = sync_stall(res["model"], res["opt"], Path(tmp))
        print(f"| {lr:g} | {s['full_mb']:.0f} | {s['full_s']:.2f} s ({s['full_fetch_s']:.2f} + "
              f"{s['load_s']:.2f}) | {s['chain_mb']:.1f} | {s['delta_s']:.2f} s ({s['chain_fetch_s']:.2f} + "
              f"{s['apply_s']:.2f} + {s['delta_load_s']:.2f}) | {s['new_file_s']:.2f} s |", flush=True)


if __name__ == "__main__":
    main()
