import sys, torch
from headmix import DCMHA
from headmix.ops import triton_dcmha
torch.manual_seed(0)
case = sys.argv[1]
layer = DCMHA(256, 16, init="paper", backend="triton").cuda()
x = torch.randn(2, 64, 256, device="cuda", requires_grad=True)
if case == "fwd8":
    triton_dcmha.TILES[("fwd", True)] = (16, 16, 8, 1)
if case == "bf16":
    layer = layer.bfloat16(); x = x.detach().bfloat16().requires_grad_()
out = layer(x); torch.cuda.synchronize(); print(case, "fwd ok", flush=True)
torch.autograd.grad(out.sum(), x); torch.cuda.synchronize(); print(case, "bwd ok", flush=True)
