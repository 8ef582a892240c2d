"""Where the rank-1 layer's backward spends its time on a GPU (docs/benchmarks/rank1.md).

    PYTHONPATH=. python docs/benchmarks/rank1_backward_probe.py

For three bf16 shapes (the Transformer's MLP input layer at K=8, the paper LSTM's gates at K=4,
a large 1024 -> 4096 layer at K=10) it times each kernel on its own (forward, dx, the dW
kernel with and without a bias gradient), the dW kernel at forced row splits and pinned to
each autotune config, and cuBLAS matmuls of the same shapes as floors.
"""
import torch
import triton.testing as tt
from triton.runtime.errors import OutOfResources

from kernels import rank1


def ms(fn):
    return tt.do_bench(fn, warmup=10, rep=40, return_mode="median")

for (K, M, d, n) in [(8, 4096, 512, 2048), (4, 4096, 500, 2000), (10, 16384, 1024, 4096)]:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(K, M, d, generator=g, device="cuda").to(torch.bfloat16)
    w = (torch.randn(n, d, generator=g, device="cuda") * d ** -0.5).to(torch.bfloat16)
    r = (1 + 0.1 * torch.randn(K, n, generator=g, device="cuda")).to(torch.bfloat16)
    s = (1 + 0.1 * torch.randn(K, d, generator=g, device="cuda")).to(torch.bfloat16)
    b = torch.randn(K, n, generator=g, device="cuda").to(torch.bfloat16)
    dy = torch.randn(K, M, n, generator=g, device="cuda").to(torch.bfloat16)
    flop = 2 * K * M * d * n
    res = {}
    res["fwd"] = ms(lambda: rank1._forward(x, w, r, s, b, False))
    res["dx"] = ms(lambda: rank1.backward_dx(dy, w, r, s, False))
    res["dw+bias"] = ms(lambda: rank1.backward_params(x, dy, w, r, s, 2, False))
    res["dw"] = ms(lambda: rank1.backward_params(x, dy, w, r, s, None, False))
    cfg = rank1._rank1_dw_kernel.best_config
    real = rank1._row_splits
    for splits in (1, 2, 4, 8):
        rank1._row_splits = lambda *a, _s=splits: _s
        rank1._rank1_dw_kernel.cache.clear()
        res[f"dw splits={splits}"] = ms(lambda: rank1.backward_params(x, dy, w, r, s, None, False))
    rank1._row_splits = real
    for i, c in enumerate(rank1.DW_CONFIGS):
        saved = rank1._rank1_dw_kernel.configs
        rank1._rank1_dw_kernel.configs = [c]
        try:
            res[f"dw cfg{i}"] = ms(lambda: rank1.backward_params(x, dy, w, r, s, None, False))
        except OutOfResources:
            res[f"dw cfg{i}"] = float("nan")
        rank1._rank1_dw_kernel.configs = saved
    res["floor mm fwd"] = ms(lambda: torch.matmul(x, w.t()))
    xf, dyf = x.reshape(-1, d), dy.reshape(-1, n)
    res["floor mm dW"] = ms(lambda: dyf.t() @ xf)
    res["floor mm dx"] = ms(lambda: torch.matmul(dy, w))
    print(f"K={K} M={M} d={d} n={n}  splits(auto)={real(M, n, d, K, x.device)} dw best={cfg}")
    for k, v in res.items():
        print(f"  {k:18s} {v*1e3:9.1f} us  {flop / v / 1e9:7.1f} TFLOP/s")
