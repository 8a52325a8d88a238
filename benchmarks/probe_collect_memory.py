"""Peak extra RSS of headprune.collect against the same forward without statistics, with
glibc's dynamic mmap threshold on (the default) and fixed (MALLOC_MMAP_THRESHOLD_=131072).

    python benchmarks/probe_collect_memory.py [--lengths 2048 8192]

bench_collect.py measures peak RSS as users run (malloc at its defaults). There, collection
reads about 2.5x the peak of the ``body`` forward (``logits_to_keep=1``); this probe shows how
much of that is allocations and how much is glibc keeping freed chunks: with a fixed mmap
threshold, freed large blocks go back to the system at once. Each measurement runs in a
fresh process (SmolLM2-135M config, random weights, batch 1, 1 thread, two calls, the peak
over both). Writes benchmarks/results/collect_memory_probe.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write_results  # noqa: E402

THRESHOLD = "131072"


def worker(mode: str, seq: int, config_dir: str) -> float:
    import torch

    import bench_collect as BC
    import headprune

    torch.set_num_threads(1)
    model = BC.build("smollm2", "headprune", config_dir, "random")
    batch = BC.batch_of(model, 1, seq)
    fn = {
        "body": lambda: model(**batch, use_cache=False, logits_to_keep=1),
        "collect": lambda: headprune.collect(model, [batch], progress=False),
    }[mode]
    with torch.no_grad():
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = BC._proc_status_kb("VmRSS")
        fn()
        fn()
        return (BC._proc_status_kb("VmHWM") - base) / 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        mode, seq, config_dir = args.worker
        print("RESULT", worker(mode, int(seq), config_dir), flush=True)
        return
    import bench_collect as BC

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        BC.smollm2_config_dir(Path(tmp))
        for seq in args.lengths:
            row = {"seq": seq}
            for malloc in ("default", "fixed"):
                env = dict(os.environ)
                if malloc == "fixed":
                    env["MALLOC_MMAP_THRESHOLD_"] = THRESHOLD
                for mode in ("body", "collect"):
                    p = subprocess.run([sys.executable, __file__, "--worker", mode, str(seq), tmp], env=env,
                                       capture_output=True, text=True, check=True)
                    mb = float([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1].split()[1])
                    row[f"{mode}_MB_{malloc}"] = round(mb, 1)
                    print(f"  S={seq} malloc={malloc} {mode}: +{mb:.0f} MB", flush=True)
                row[f"collect_vs_body_{malloc}"] = round(row[f"collect_MB_{malloc}"] / row[f"body_MB_{malloc}"], 2)
            rows.append(row)
    cols = ["seq", "body_MB_default", "collect_MB_default", "collect_vs_body_default", "body_MB_fixed",
            "collect_MB_fixed", "collect_vs_body_fixed"]
    print(table(rows, cols))
    path = write_results("collect_memory_probe.json", {"mmap_threshold_fixed": int(THRESHOLD), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
