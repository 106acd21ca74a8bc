"""Triton kernels of the chunked Mamba2 SSD scan (MM-DiM mixer, paper Sec. 3.3); entry point m4v.ops.ssd_triton."""
