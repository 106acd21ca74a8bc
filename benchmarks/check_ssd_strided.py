"""GPU check: the Triton SSD on the strided views the Mamba2 mixer passes (fwd + bwd vs the torch path)."""

import torch

from m4v.ops import ssd

torch.manual_seed(0)
for l, g in ((4225, 30), (12032, 30), (15600, 30)):
    D, H, n = 1920, 30, 64
    proj = torch.randn(1, l, 4 * D + H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x = proj[..., :D].reshape(1, l, H, 64)
    B = proj[..., D : 2 * D].reshape(1, l, g, n)
    C = proj[..., 2 * D : 3 * D].reshape(1, l, g, n)
    dt = proj[..., 4 * D :]
    A = -torch.rand(H, device="cuda") * 4 - 1
    bias = torch.randn(H, device="cuda", dtype=torch.bfloat16) * 0.1 - 3
    Dp = torch.ones(H, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for be in ("triton", "torch"):
        proj.grad = None
        y = ssd(x, dt, A, B, C, D=Dp, dt_bias=bias, dt_softplus=True, backend=be)
        y.float().square().mean().backward()
        torch.cuda.synchronize()
        outs[be] = (y.float(), proj.grad.float().clone())
    ey = (outs["triton"][0] - outs["torch"][0]).norm() / outs["torch"][0].norm()
    eg = (outs["triton"][1] - outs["torch"][1]).norm() / outs["torch"][1].norm()
    print(f"strided l={l}: rel err y {ey:.2e}  grad {eg:.2e}", flush=True)
