"""simple_grpo: GRPO / Dr.GRPO / DAPO training with a reference-model HTTP server."""
import os

# Large CPU tensors (gradients, optimizer state, activations) on 2 MB pages: PyTorch reads this
# variable once, at its first allocation, so it must be set before `import torch`. On a 2-vCPU VM
# it took ~1.5 s of page-fault time off a 15 s training pass (BENCHMARKS.md). Set it to 0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
