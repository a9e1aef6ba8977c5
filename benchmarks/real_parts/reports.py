"""Collects the preparation reports of the prepared real parts into one results file.

Each ``commit-mllm prepare NAME`` writes ``<cache>/<folder>/report.json`` (source, conversion
check, timings, files). This copies them, without the file lists, to a JSON file that the
docs quote:

    python benchmarks/real_parts/reports.py --out benchmarks/results/real_parts_prepare.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from commit_mllm.parts import REAL_PARTS, is_prepared, part_folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default="benchmarks/results/real_parts_prepare.json")
    args = ap.parse_args()
    out = {}
    for name in REAL_PARTS:
        if is_prepared(name, args.cache_dir):
            report = json.loads((part_folder(name, args.cache_dir) / "report.json").read_text())
            report.pop("files", None)
            out[name] = report
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{len(out)} reports -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
