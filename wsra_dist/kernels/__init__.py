"""Device kernels: pure tensor functions with an eager reference beside them (tests/test_kernels.py)."""

from .pair_mlp import pair_mlp_logits, pair_mlp_reference, triton_pair_mlp_available

__all__ = ["pair_mlp_logits", "pair_mlp_reference", "triton_pair_mlp_available"]
