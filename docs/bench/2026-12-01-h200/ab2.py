"""A/B on the GPU: HEAD's MXFP4 MoE kernel (old) against the working tree's (new), real shapes, graph replays."""
import sys, os, torch, triton.testing
sys.path.insert(0, os.path.dirname(__file__))
import old_moe_mxfp4 as old  # next to this file: git show fa4d775:runtime/kernels/moe_mxfp4.py > old_moe_mxfp4.py
from runtime.kernels import moe_mxfp4 as new
from runtime.kernels.microbench import _graphed

def problem(t, e, i, seed, h=2880, k=4, xscale=1.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(t, h, device="cuda", generator=g) * xscale).bfloat16()
    idx = torch.stack([torch.randperm(e, device="cuda", generator=g)[:k] for _ in range(t)])
    w = torch.softmax(torch.randn(t, k, device="cuda", generator=g), -1).bfloat16()
    ex = (torch.randint(0, 256, (e, 2 * i, h // 32, 16), dtype=torch.uint8, device="cuda", generator=g),
          torch.randint(118, 126, (e, 2 * i, h // 32), dtype=torch.uint8, device="cuda", generator=g),
          (torch.randn(e, 2 * i, device="cuda", generator=g) * 0.02).bfloat16(),
          torch.randint(0, 256, (e, h, i // 32, 16), dtype=torch.uint8, device="cuda", generator=g),
          torch.randint(118, 126, (e, h, i // 32), dtype=torch.uint8, device="cuda", generator=g),
          (torch.randn(e, h, device="cuda", generator=g) * 0.02).bfloat16())
    return x, idx, w, ex

def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()

src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda"); dst = torch.empty_like(src)
bw = 2 * src.numel() / triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") / 1e6
print(f"copy {bw:.0f} GB/s", flush=True)
for xs in (1e-3, 1.0, 300.0):
    x, idx, w, ex = problem(4, 32, 2880, 5, xscale=xs)
    print(f"x scale {xs}: new err {rel(new.fused_mxfp4_experts(x, idx, w, *ex), new.reference_mxfp4_experts(x, idx, w, *ex)):.2e}", flush=True)
maxp = int(os.environ.get("MAXP", "64"))
for e, i in ((128, 2880), (32, 2880), (128, 1440)):
    for t in [int(a) for a in sys.argv[1:]] or (1, 2, 4, 8, 16, 32):
        x, idx, w, ex = problem(t, e, i, t + e)
        ref = new.reference_mxfp4_experts(x, idx, w, *ex)
        active = idx.unique().numel()
        nbytes = active * (3 * 2880 * i * 4.25 / 8 + (2 * i + 2880) * 2)
        row = [f"E={e:3d} I={i} T={t:4d}"]
        for name, fn in (("old", lambda: old.fused_mxfp4_experts(x, idx, w, *ex)),
                         ("new", lambda: new.fused_mxfp4_experts(x, idx, w, *ex)),
                         ("gemv", lambda: new.fused_mxfp4_experts(x, idx, w, *ex, block_m=1))):
            if name == "gemv" and t * 4 <= new.DECODE_MAX_PAIRS or (name == "gemv" and t * 4 > maxp):
                continue
            try:
                err = rel(fn(), ref)
                ms = triton.testing.do_bench(_graphed(fn), return_mode="median")
                row.append(f"{name} {ms*1e3:7.1f} us {nbytes/ms/1e6/bw:6.1%} err {err:.1e}")
            except Exception as exc:
                row.append(f"{name} FAILED {type(exc).__name__}: {str(exc)[:300]}")
        print(" | ".join(row), flush=True)
for k in (new._gate_up_decode, new._down_decode):
    print({str(key): str(cfg) for key, cfg in k.cache.items()})
