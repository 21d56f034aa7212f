"""simple_grpo: GRPO and its successors (Dr.GRPO, DAPO, GSPO, CISPO, SAPO) with a reference-model server.

One package per role; tests/test_layout.py checks the imports:
    algo/    the algorithm as pure tensor math (advantages, losses, masks, log-probs, decoding)
    wire/    what crosses a process boundary (codec, HTTP client, weights stream)
    server/  ref_server.py's process; never imports train/
    train/   grpo_ref_split.py's processes (trainer ranks, generation workers); never imports server/
    errors, io, cli, hf_compat, models: shared by every process
"""
import os

# Large CPU tensors (gradients, optimizer state, activations) on 2 MB pages: PyTorch reads this
# variable once, at its first allocation, so it must be set before `import torch`. On a 2-vCPU VM
# it took ~1.5 s of page-fault time off a 15 s training pass (BENCHMARKS.md). Set it to 0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
