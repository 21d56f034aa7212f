"""The reference server (`python ref_server.py`): reference log-probs, the batch queue, weights.

Runs in its own process. It may import simple_grpo.algo, simple_grpo.wire and the shared leaves;
never simple_grpo.train (tests/test_layout.py checks it).
"""
