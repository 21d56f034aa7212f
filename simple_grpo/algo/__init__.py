"""The algorithm as pure functions over tensors: advantages, losses, masks, log-probs, decoding, TIS.

No I/O, no processes, no configs: every process may import it, and it imports only the shared
leaves (simple_grpo.errors, simple_grpo.hf_compat). Read this package to read the algorithm.
"""
