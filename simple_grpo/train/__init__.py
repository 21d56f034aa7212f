"""The trainer (`python grpo_ref_split.py`, one process per rank) and, with `--mode=generate`, a
generation worker: config, rollouts, the policy step, checkpoints, metrics, talking to the server.

It may import everything but simple_grpo.server (it reaches the server over HTTP only).
"""
