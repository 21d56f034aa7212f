"""`python ref_server.py` as a real subprocess: --help, refusing a public bind without a token,
exit code 2 on a missing model, and a real server talked to over HTTP."""
from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

import torch

from simple_grpo.algo.logprobs import completion_logprobs
from simple_grpo.wire.client import RefClient
from test_codec import make_batch

ROOT = Path(__file__).resolve().parents[1]


def launch(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "ref_server.py", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def test_cli_help_public_bind_and_missing_model():
    procs = {"help": launch("--help"),
             "public": launch("--model=whatever", "--host=0.0.0.0"),
             "missing": launch("--model=/no/such/model_dir", "--port=0"),
             "no model": launch(env={"REF_SERVER_PORT": "0"})}
    out = {k: (p.communicate(timeout=60), p.returncode) for k, p in procs.items()}
    (stdout, _), rc = out["help"]
    assert rc == 0 and "--queue_order" in stdout and "REF_SERVER_" in stdout and "--token" in stdout
    for key, pattern in [("public", r"refusing to bind 0\.0\.0\.0 .*without a token"),
                         ("missing", r"does not exist"), ("no model", r"--model is required")]:
        (_, stderr), rc = out[key]
        assert rc == 2, (key, rc, stderr)
        assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
        assert re.search(pattern, stderr), stderr


def test_launch_mistakes_are_one_line_before_the_model_loads(tiny_model_dir):
    """A busy port and a CUDA device this torch cannot use: exit 2, one line, and no model load."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = {"busy port": (launch(f"--model={tiny_model_dir}", f"--port={port}"),
                               rf"port {port} on 127\.0\.0\.1 is already in use"),
                 "bad device": (launch(f"--model={tiny_model_dir}", "--port=0", "--device=cuda:7"),
                                r"--device=cuda:7: (this torch .* cannot use CUDA|only \d+ GPU)"),
                 "not a device": (launch(f"--model={tiny_model_dir}", "--port=0", "--device=gpu0"),
                                  r"--device=gpu0: not a device"),
                 "port out of range": (launch(f"--model={tiny_model_dir}", "--port=99999"),
                                       r"--port=99999: a port is 0-65535")}
        for name, (proc, pattern) in cases.items():
            stdout, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 2, (name, proc.returncode, stderr)
            assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, (name, stderr)
            assert re.search(pattern, stderr), (name, stderr)
            assert "loading" not in stdout, f"{name}: refused only after loading the model"


def test_real_server_process(tiny_model_dir, tiny_model):
    proc = launch(f"--model={tiny_model_dir}", "--port=0", "--torch_threads=1",
                  env={"REF_SERVER_QUEUE_ORDER": "lifo"})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        url = None
        while url is None:
            line = lines.get(timeout=60)
            m = re.search(r"serving on (http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
        client = RefClient(url)
        health = client.wait_ready(timeout_s=30)
        assert health["queue_order"] == "lifo" and health["model"] == str(tiny_model_dir)
        b = make_batch(3, 6, 5, gen=False, ref=False, seed=4)
        b.prompt_ids %= 320
        b.completion_ids %= 320
        ids = (b.prompt_ids, b.prompt_lens, b.completion_ids, b.completion_lens)
        with torch.inference_mode():
            want = completion_logprobs(tiny_model, *ids)
        torch.testing.assert_close(client.logprobs(*ids), want, atol=1e-5, rtol=0)
        first, second = client.upload(b), client.upload(b.__class__(**{**b.__dict__, "batch_id": None}))
        assert [client.get().batch_id, client.get().batch_id] == [second, first]  # lifo
        assert client.stats()["batches_out"] == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)
