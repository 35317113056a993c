"""wsra-dist: distributed training and evaluation of WSRA for weakly-supervised temporal grounding."""

__version__ = "0.1.0"
