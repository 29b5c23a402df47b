"""fastdiff.kernels: the fused sampler-step kernel (Triton) and its plain-torch reference."""
