"""One place for transformers' renames: the KV cache is `past_key_values` up to 5.23 and `cache` from 5.24.

transformers 5.24 renamed the KV-cache keyword of every model's forward, of
`prepare_inputs_for_generation` and of `generate` from `past_key_values` to `cache`, and the field
of the model outputs likewise (`out.cache`). The old keyword still works there but warns
(FutureWarning from `deprecate_kwarg`: removal in 5.40 for forward, 6.0 for `generate`), and the old
attribute `out.past_key_values` is a property that logs a deprecation message. 5.17 (the GPU box)
to 5.23 only know `past_key_values`; there a `cache=` keyword would land in the model's `**kwargs`
and be silently ignored, so the name must be right, not just warning-free.

Detected once, at import, from the library's own signature rather than from a version number:
`GenerationMixin.prepare_inputs_for_generation` takes the cache under its current name and hands it
to the model's forward under that name, so every model `generate` can drive accepts it, and its
outputs carry the cache under the same name. tests/test_hf_compat.py checks this on the installed
transformers; pyproject.toml turns transformers' FutureWarnings into test errors, so the next
rename fails a test.
"""
from __future__ import annotations

import inspect

from transformers.generation.utils import GenerationMixin

#: the keyword (and model-output attribute) that holds the KV cache in the installed transformers
CACHE_KWARG = ("cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
               else "past_key_values")


def cache_kwargs(cache) -> dict:
    """`{CACHE_KWARG: cache}`, to pass a KV cache to a model's forward or to `generate` (`**`)."""
    return {CACHE_KWARG: cache}


def output_cache(out):
    """The KV cache a forward with `use_cache=True` returned (`out.cache` / `out.past_key_values`)."""
    return getattr(out, CACHE_KWARG)
