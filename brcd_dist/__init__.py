"""brcd-dist: distributed BRCD knowledge distillation for deep hashing (He et al., WWW 2024, arXiv 2403.06071)."""

__version__ = "0.1.0"
