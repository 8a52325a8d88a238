"""docs/ is generated from docs/templates and benchmarks/results: it must be up to date, so
every figure in it comes from a results file."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_docs_are_generated_from_the_results():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_docs.py"), "--check"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
