"""A delta chain download is streamed from the server's files by waitress itself (the route's body
is a file-like `ChainReader`, which goes to wsgi.file_wrapper): clients that are slow to read
hold none of the server's request threads, so /health still answers. Real HTTP on 127.0.0.1."""
from __future__ import annotations

import requests
import torch

from simple_grpo.wire import delta
from simple_grpo.wire.client import RefClient
from simple_grpo.wire.weights import iter_state_dict_safetensors

N = 24 << 20  # bf16 elements: a 48 MB file, and a dense delta of about as much (random changes)


def test_slow_chain_readers_hold_no_request_thread(ref_server, tmp_path):
    srv = ref_server(weights_dir=str(tmp_path / "w"), threads=3, max_inflight=1, weight_deltas=4,
                     max_weights_mb=200)
    client = RefClient(srv.url)
    g = torch.Generator().manual_seed(0)
    v1 = {"w": torch.randn(N, generator=g).to(torch.bfloat16)}
    client.publish_weights(iter_state_dict_safetensors(v1), version=1)
    base_digest = client.weights_version()["digest"]
    v2 = {"w": torch.randn(N, generator=g)}  # every value changes: an incompressible delta
    head = next(iter_state_dict_safetensors(v2, torch.bfloat16))
    enc, digest, _ = delta.encode({k: t.clone() for k, t in v1.items()}, v2, head, from_version=1,
                                  to_version=2, base_digest=base_digest,
                                  file_bytes=len(head) + 2 * N)
    with enc:
        assert enc.size > 40e6, enc.size  # past waitress's 16 MB output watermark
        client.publish_delta(enc.chunks(), 2, 1)
    slow = [requests.get(srv.url + "/weights/delta", params={"from": 1, "digest": base_digest},
                         stream=True, timeout=30) for _ in range(4)]  # more readers than threads
    try:
        assert all(r.status_code == 200 and r.headers["X-Delta-Links"] == "1" for r in slow)
        r = requests.get(srv.url + "/health", timeout=10)  # a held thread each would time out here
        assert r.status_code == 200
        body = b"".join(slow[0].iter_content(1 << 20))  # and a reader that goes on gets it all
        assert len(body) == int(slow[0].headers["Content-Length"])
    finally:
        for r in slow:
            r.close()
