"""Reference-model server: serves per-token log-probs of a frozen reference model over HTTP for
the KL term, and holds the queue of scored rollout batches between producers and the trainer.

Launch it on its own GPU, its own machine, or beside the trainer on CPU:

    python ref_server.py --model=smollm2-135m                      # the bundled offline model
    python ref_server.py --model=Qwen/Qwen2.5-0.5B --device=cuda:1 --dtype=bf16
    REF_SERVER_TOKEN=secret python ref_server.py --model=./my_model --host=0.0.0.0

Every option is also read from the environment as REF_SERVER_<OPTION> (e.g. REF_SERVER_PORT);
`python ref_server.py --help` lists them. It binds 127.0.0.1 unless told otherwise and refuses a
non-loopback address without a token. Endpoints, queue semantics and error codes are documented
in simple_grpo/server/app.py and simple_grpo/server/queue.py; clients use
simple_grpo.wire.client.RefClient.
"""
from __future__ import annotations

import sys

import torch

from simple_grpo.cli import parse_config
from simple_grpo.errors import UserError
from simple_grpo.server.app import ServerState, make_app
from simple_grpo.models import pick_device
from simple_grpo.server.config import ServerConfig, check_bind, port_error
from simple_grpo.server.weight_store import disk_warning
from simple_grpo.server.wsgi import make_server, url_host


def main(argv: list[str]) -> None:
    cfg = parse_config(ServerConfig, argv, env_prefix="REF_SERVER_", prog="ref_server.py")
    if not cfg.model:
        raise UserError("--model is required: a HF hub name, a local model folder, or "
                        "smollm2-135m for the bundled offline model")
    check_bind(cfg)  # before the slow model load: token, port, device
    pick_device(cfg.device)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    print(f"[ref_server] loading {cfg.model} ...", flush=True)
    state = ServerState.from_config(cfg)
    if warning := disk_warning(cfg.weights_dir, state.cfg.max_weights_bytes):
        print(f"[ref_server] warning: {warning}", flush=True)
    try:  # the port may have been taken while the model loaded
        server = make_server(make_app(state), cfg.host, cfg.port, cfg.threads, cfg.max_body_bytes,
                             state.cfg.large_body_paths)  # --max_weights_mb=auto resolved there
    except OSError as e:
        raise UserError(port_error(cfg.host, cfg.port, e)) from None
    print(f"[ref_server] {state.model_name} ({state.dtype}, {state.device}, vocab "
          f"{state.vocab_size}) serving on http://{url_host(cfg.host)}:{server.effective_port} "
          f"(queue {cfg.queue_order}, size {cfg.queue_size or 'unbounded'}, when full "
          f"{cfg.when_full}, auth {'on' if cfg.token else 'off'}, weights up to "
          f"{state.cfg.max_weights_mb:,.0f} MiB{' (auto)' if cfg.max_weights_mb == 'auto' else ''})",
          flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        print("[ref_server] stopped", flush=True)


if __name__ == "__main__":
    from simple_grpo.errors import run_entry_point

    run_entry_point(main, sys.argv[1:], "ref_server.py")
