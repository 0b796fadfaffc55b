"""Add the methods of other benchmark runs to a results directory, as `foldin bench --extend` does
when a run writes into it directly (same suite, tasks, seed, test sets and zoo, or refused), and
rewrite its report and plots. For runs made side by side into separate directories.

    python benchmarks/combine_results.py benchmarks/results/text-zeroshot/8 runs/text-otmf runs/text-ada
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from foldin.evaluation.bench_results import extend_results
from foldin.evaluation.report import write_report
from foldin.io.atomic import write_json_atomic


def main() -> None:
    out, *others = (Path(p) for p in sys.argv[1:])
    results = json.loads((out / "results.json").read_text())
    for other in others:
        results = extend_results(results, json.loads((other / "results.json").read_text()))
    write_json_atomic(out / "results.json", results)
    write_report(results, out)


if __name__ == "__main__":
    main()
