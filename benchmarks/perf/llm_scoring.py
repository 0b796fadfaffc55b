"""What sharing a batch's prompt prefix saves when the llm suite scores, and what it changes.

    python benchmarks/perf/llm_scoring.py --zoo zoo/llm [--tasks reuters_r8,debate_speaker] [--examples 64]

For each task's first test batches (as the bench encodes them), the pretrained model's last-position
states are computed twice: by one whole left-padded pass (`last_hidden`) and with the batch's common
prefix run once (`shared_prefix_last_hidden`, what scoring uses). Reported per batch: its shape, the
prefix length, both times, the largest state and head-logit differences and whether every predicted
class agrees. Timings are ratios within one run; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from foldin.evaluation.llm.suite import common_prefix_length, last_hidden, shared_prefix_last_hidden, unpadded_rows
from foldin.evaluation.zoo import Zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--zoo", required=True)
    parser.add_argument("--tasks", default="reuters_r8,debate_speaker")
    parser.add_argument("--examples", type=int, default=64)
    args = parser.parse_args()
    zoo = Zoo.open(args.zoo)
    model = zoo.suite.load_backbone().eval()
    print("| task | batch | shared prefix | whole pass s | shared s | time saved | max state diff | same classes |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for name in args.tasks.split(","):
        task = zoo.tasks([name])[0]
        head = zoo.head(name)["weight"]
        for batch in zoo.suite.encode(task.test[0][: args.examples], task.test[1][: args.examples]).batches:
            with torch.no_grad():
                t0 = time.perf_counter()
                whole = last_hidden(model, batch)[:, -1]
                t1 = time.perf_counter()
                shared = shared_prefix_last_hidden(model, batch)
                t2 = time.perf_counter()
            same = bool(((whole @ head.T).argmax(1) == (shared @ head.T).argmax(1)).all())
            print(
                f"| {name} | {tuple(batch['input_ids'].shape)} | {common_prefix_length(unpadded_rows(batch))} "
                f"| {t1 - t0:.2f} | {t2 - t1:.2f} | {1 - (t2 - t1) / (t1 - t0):.0%} "
                f"| {(whole - shared).abs().max():.1e} | {same} |"
            )


if __name__ == "__main__":
    main()
