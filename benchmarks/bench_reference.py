"""The reference share of the calibration (``--reference``): the default recipe's quality on
held-out text of several kinds, calibrated on one text alone and with a share of its
sequences from the bundled texts it does not name.

    python benchmarks/bench_reference.py [--models smollm2,minilm] [--shares 0,0.25,0.5]
        [--ratios 0.3,0.5] [--calib persuasion] [--eval persuasion,python_tutorial,licences,cpp,perl]

Besides the bundled texts, three kinds of text that no bundled text is, built from files of
this machine into a temporary directory (a text whose files are missing is left out and
listed in the results): ``licences``, the Debian licence texts
(``/usr/share/common-licenses/{GPL-3,LGPL-2.1,MPL-2.0,Apache-2.0,GFDL-1.3,GPL-2}``); ``cpp``,
C++ headers of the installed torch (``torch/include/c10/util/*.h``, sorted, the first 600,000
characters); ``perl``, Perl modules of Debian's dpkg (``/usr/share/perl5/Dpkg/*.pm``, sorted).
Each text is split like every text (its first 70% of paragraphs would calibrate, the last 30%
is evaluated). For each model and share the statistics and second moments are collected once
(``--samples`` of ``bench_quality.py``, by default ``headprune prune``'s, the share taken from
the reference), then the default recipe is evaluated on every
text as ``bench_quality.py`` evaluates it. Writes benchmarks/results/quality_reference.json.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_results  # noqa: E402
from bench_quality import calibration, default_row, point_args  # noqa: E402

import torch  # noqa: E402

from headprune.app import texts  # noqa: E402
from headprune.app.load import load_model  # noqa: E402
from headprune.hf import collect  # noqa: E402

LICENCES = [f"/usr/share/common-licenses/{n}" for n in ("GPL-3", "LGPL-2.1", "MPL-2.0", "Apache-2.0", "GFDL-1.3", "GPL-2")]


def _sources() -> dict:
    """Files of each text built here (in order; an empty list: not on this machine)."""
    include = Path(torch.__file__).parent / "include" / "c10" / "util"
    return {"licences": LICENCES if all(Path(p).exists() for p in LICENCES) else [],
            "cpp": sorted(map(str, include.glob("*.h"))),
            "perl": sorted(map(str, Path("/usr/share/perl5/Dpkg").glob("*.pm")))}


def build_texts(names: list, tmp: Path) -> tuple:
    """``({name: spec for load_paragraphs}, {name: source description}, [names left out])``."""
    sources, specs, described, missing = _sources(), {}, {}, []
    for name in names:
        if name in texts.BUNDLED_TEXTS:
            specs[name] = name
            continue
        files = sources.get(name)
        if files is None:
            raise SystemExit(f"--eval: unknown text {name!r} (bundled texts, {', '.join(sources)})")
        if not files:
            missing.append(name)
            continue
        body = "\n\n".join(Path(f).read_text(encoding="utf-8", errors="replace") for f in files)
        path = tmp / f"{name}.txt"
        # each paragraph's whitespace collapsed, as the figures in docs/ were measured (see texts.flattened)
        path.write_text(texts.flattened(body[:600_000] if name == "cpp" else body), encoding="utf-8")
        specs[name] = str(path)
        described[name] = {"files": len(files), "first": files[0], "last": files[-1], "bytes": path.stat().st_size}
    return specs, described, missing


def run(name: str, args, specs: dict) -> list:
    loaded = load_model(name)
    held = {text: texts.split(texts.load_paragraphs(spec))[1] for text, spec in specs.items()}
    rows = []
    for share in args.shares:
        t0 = time.perf_counter()
        batches, settings = calibration(loaded, args.calib, None, share)
        scores = collect(loaded.model, batches, progress=False, moments=True)
        measured = {}  # an encoder's allocation, measured once per share
        for text, paragraphs in held.items():
            rows.append(default_row(loaded, scores, batches, paragraphs, settings, ratios=args.ratios,
                                    eval_windows=args.eval_windows, measured=measured, model=name, share=share,
                                    calibrated_on=args.calib, evaluated_on=text, reference=settings.get("reference"),
                                    samples=settings["samples"]))
        rows[-1]["seconds"] = time.perf_counter() - t0
    return rows


def main(argv=None):
    ap = point_args(__doc__, evals="persuasion,python_tutorial,licences,cpp,perl", out="quality_reference.json")
    ap.add_argument("--shares", default=f"0,{texts.DEFAULT_REFERENCE:g},0.5")
    args = ap.parse_args(argv)
    args.shares = [float(s) for s in args.shares.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        specs, described, missing = build_texts(args.eval.split(","), Path(tmp))
        rows = [row for name in args.models.split(",") for row in run(name, args, specs)]
    path = write_results(args.out, {"default_share": texts.DEFAULT_REFERENCE, "texts": described,
                                    "missing": missing, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
