"""Device kernels: pure tensor functions with an eager reference beside them (tests/test_kernels.py,
tests/test_corpus_kernels.py)."""

from .corpus_scan import didemo_scan_logits, didemo_scan_reference
from .pair_mlp import pair_mlp_logits, pair_mlp_reference, triton_pair_mlp_available

__all__ = ["didemo_scan_logits", "didemo_scan_reference", "pair_mlp_logits", "pair_mlp_reference",
           "triton_pair_mlp_available"]
