"""simple_grpo: GRPO / Dr.GRPO / DAPO training with a reference-model HTTP server."""

__version__ = "0.1.0"
