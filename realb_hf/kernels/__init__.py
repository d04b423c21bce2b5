"""Fused GPU kernels (Triton); every kernel has a pure-torch reference in realb_hf/formats/."""
