"""How a pattern is computed: the dense oracle, the block-gather kernel and FlexAttention."""

from longswap.kernels.api import BACKENDS, Backend, check_inputs, resolve_backend, sparse_attention

__all__ = ["BACKENDS", "Backend", "check_inputs", "resolve_backend", "sparse_attention"]
