#!/usr/bin/env python3
"""Times PyTorch's dense causal attention (torch.nn.functional.scaled_dot_product_attention,
whatever backend PyTorch dispatches to) at the shapes of gpu_check's S2 prefill benchmark,
so gpu/check.sh can set the two side by side in the same run. Prints one line per length:
  SDPA seq=<n> ms=<per call> tflops=<causal FLOPs / time> torch=<version>
Exit: 0 ok, 3 no PyTorch or no CUDA device.
"""
import argparse
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="32768,131072")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=["bf16", "f16"], default="bf16")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        print(f"FAIL  sdpa peer: PyTorch not importable ({e})")
        return 3
    if not torch.cuda.is_available():
        print("FAIL  sdpa peer: torch.cuda.is_available() is False")
        return 3
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    h, d = args.heads, args.head_dim
    print(f"# torch {torch.__version__}, device {torch.cuda.get_device_name(0)}, "
          f"flash={torch.backends.cuda.flash_sdp_enabled()} "
          f"mem_efficient={torch.backends.cuda.mem_efficient_sdp_enabled()}", flush=True)
    for seq in [int(s) for s in args.seqs.split(",") if s]:
        gen = torch.Generator(device="cuda").manual_seed(seq)
        q, k, v = (torch.rand(1, h, seq, d, device="cuda", dtype=dt, generator=gen) * 2 - 1
                   for _ in range(3))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # warm-up
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.reps):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / args.reps
        flops = 4.0 * d * h * seq * (seq + 1) / 2
        print(f"SDPA seq={seq} ms={ms:.3f} tflops={flops / ms / 1e9:.1f} torch={torch.__version__}",
              flush=True)
        del q, k, v, out
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
