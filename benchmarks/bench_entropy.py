"""Op-level microbenchmark: native entropy reducers against the pure-PyTorch path.

    python benchmarks/bench_entropy.py [--device cpu|cuda] [--quick]

Part 1, probs op: entropy_from_probs_accumulate_ vs the formula as written
(-(p * log(p + eps)).sum(-1), masked mean) and vs a plain probs.sum(-1) over the same tensor
(the bandwidth yardstick; timed in alternating pairs, the ratio is the median of the pairs'
ratios). Part 2, QK op: entropy_from_qk_accumulate_ vs
scaled_dot_product_attention on the same q, k, v and vs the materialising formula, and the
fused attention_stats_accumulate_ (attention output and statistics together) vs SDPA alone.
Prints tables of medians and ratios measured in this run; writes
benchmarks/results/entropy_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import median_ms, paired_ms, peak_extra_bytes, table, write_results  # noqa: E402

from headprune import NUM_STATS  # noqa: E402
from headprune.core import ops  # noqa: E402
from headprune.core import reference as R  # noqa: E402

PROBS_SHAPES = [(1, 12, 512), (1, 12, 1024), (1, 9, 2048), (4, 12, 512)]
QK_LENGTHS = [512, 1024, 2048, 4096, 8192]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat):
    def run():
        fn()
        sync(device)

    return median_ms(run, repeat=repeat)


def peak(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return peak_extra_bytes(fn)


def mb(nbytes):
    return None if nbytes is None else round(nbytes / 2**20, 2)


def bench_probs(device, dtype, repeat):
    rows = []
    for B, H, S in PROBS_SHAPES:
        g = torch.Generator().manual_seed(0)
        p = torch.softmax(torch.randn(B, H, S, S, generator=g) * 3, -1).to(device=device, dtype=dtype)
        sums = torch.zeros(H, dtype=torch.float64, device=device)
        counts = torch.zeros(H, dtype=torch.int64, device=device)
        native = lambda: ops.entropy_from_probs_accumulate_(sums, counts, p)  # noqa: E731
        pure = lambda: R.formula_entropy(p)  # noqa: E731
        plain = lambda: p.sum(-1)  # noqa: E731
        t_pure = timed(pure, device, repeat)
        # The bandwidth ratio from alternating pairs (native, sum): load bursts hit both.
        t_native, t_sum, bw_ratio = paired_ms(lambda: (native(), sync(device)), lambda: (plain(), sync(device)),
                                              repeat=5 * repeat)
        gb = p.numel() * p.element_size() / 1e9
        rows.append({
            "dtype": str(dtype).replace("torch.", ""), "B": B, "H": H, "S": S,
            "native_ms": round(t_native, 3), "pure_ms": round(t_pure, 3), "sum_ms": round(t_sum, 3),
            "speedup": round(t_pure / t_native, 2),
            "native_GBps": round(gb / t_native * 1e3, 1), "sum_GBps": round(gb / t_sum * 1e3, 1),
            "bw_vs_sum": round(bw_ratio, 2),
            "native_extra_MB": mb(peak(native, device)),
            "pure_extra_MB": mb(peak(pure, device)),
            "probs_MB": round(gb * 1e3 / 1.048576, 1),
        })
    return rows


def bench_qk(device, dtype, lengths, repeat):
    rows = []
    H, Hkv, D = 9, 3, 64
    for S in lengths:
        g = torch.Generator().manual_seed(S)
        q = torch.randn(1, H, S, D, generator=g).to(device=device, dtype=dtype)
        k = torch.randn(1, Hkv, S, D, generator=g).to(device=device, dtype=dtype)
        v = torch.randn(1, Hkv, S, D, generator=g).to(device=device, dtype=dtype)
        sums = torch.zeros(H, dtype=torch.float64, device=device)
        counts = torch.zeros(H, dtype=torch.int64, device=device)
        native = lambda: ops.entropy_from_qk_accumulate_(sums, counts, q, k, D**-0.5, None, True)  # noqa: E731
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
        row = {"dtype": str(dtype).replace("torch.", ""), "S": S, "H": H, "Hkv": Hkv, "D": D}
        row["native_ms"] = round(timed(native, device, repeat), 2)
        row["sdpa_ms"] = round(timed(sdpa, device, repeat), 2)
        row["native_vs_sdpa"] = round(row["sdpa_ms"] / row["native_ms"], 2)
        row["native_extra_MB"] = mb(peak(native, device))
        row["sdpa_extra_MB"] = mb(peak(sdpa, device))
        stats = torch.zeros(H, NUM_STATS, dtype=torch.float64, device=device)
        fused = lambda: ops.attention_stats_accumulate_(stats, q, k, v, D**-0.5, None, True)  # noqa: E731
        row["fused_ms"] = round(timed(fused, device, repeat), 2)
        row["fused_vs_sdpa"] = round(row["fused_ms"] / row["sdpa_ms"], 2)  # time ratio: 1.0 = free statistics
        row["fused_extra_MB"] = mb(peak(fused, device))
        if S <= 2048:  # the materialising path needs several [H, S, S] tensors
            pure = lambda: R.formula_entropy_from_qk(q, k, D**-0.5, None, True)  # noqa: E731
            row["pure_ms"] = round(timed(pure, device, max(3, repeat // 2)), 2)
            row["pure_extra_MB"] = mb(peak(pure, device))
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and lengths (smoke run)")
    ap.add_argument("--probs-only", action="store_true",
                    help="rerun the probs part only; the QK rows of the existing results file are kept")
    ap.add_argument("--qk-only", action="store_true",
                    help="rerun the QK part only; the probs rows of the existing results file are kept")
    args = ap.parse_args(argv)
    repeat = 3 if args.quick else 7
    lengths = QK_LENGTHS[:2] if args.quick else QK_LENGTHS
    probs_rows, qk_rows = [], []
    previous = Path(__file__).parent / "results" / f"entropy_{args.device}.json"
    if args.qk_only:
        probs_rows = json.loads(previous.read_text())["probs"]
    else:
        for dtype in (torch.float32, torch.bfloat16):
            probs_rows += bench_probs(args.device, dtype, repeat)
    print("probs op (entropy_from_probs_accumulate_) vs the formula as written and vs probs.sum(-1)")
    print(table(probs_rows, ["dtype", "B", "H", "S", "native_ms", "pure_ms", "speedup", "native_GBps", "sum_GBps",
                             "bw_vs_sum", "native_extra_MB", "pure_extra_MB", "probs_MB"]))
    if args.probs_only:
        qk_rows = json.loads(previous.read_text())["qk"]
    else:
        for dtype in (torch.float32, torch.bfloat16):
            qk_rows += bench_qk(args.device, dtype, lengths, repeat)
    print("\nQK op (entropy_from_qk_accumulate_, causal, GQA 9/3, D=64) vs SDPA on the same q, k, v")
    print(table(qk_rows, ["dtype", "S", "native_ms", "sdpa_ms", "native_vs_sdpa", "native_extra_MB", "sdpa_extra_MB",
                          "pure_ms", "pure_extra_MB"]))
    print("\nfused attention with statistics (attention_stats_accumulate_) vs SDPA alone: time ratio")
    print(table(qk_rows, ["dtype", "S", "fused_ms", "sdpa_ms", "fused_vs_sdpa", "fused_extra_MB"]))
    path = write_results(f"entropy_{args.device}.json", {"probs": probs_rows, "qk": qk_rows, "quick": args.quick})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
