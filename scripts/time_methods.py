"""Time one ``backward`` of every method of ``seqtp.METHODS`` (config defaults), in turns, on one shape.

    OMP_NUM_THREADS=1 python scripts/time_methods.py [--batch 20 --seq-len 60 --hidden 100 --input 8 --classes 4]
                                                     [--rounds 10] [--json FILE]

Each round times every method once, in turn, so that a drift of the machine's speed hits all of them alike; the
table gives the median over rounds and its ratio to BPTT's. What is timed: ``method.backward(model, x, loss_fn)``
(forward pass, targets, feedback training, update into ``.grad``), the optimizer step excluded (the same for all).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import seqtp
from seqtp.config import Config, build_method


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=60)
    ap.add_argument("--hidden", type=int, default=100)
    ap.add_argument("--input", type=int, default=8)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.seq_len, args.input)
    y = torch.randint(args.classes, (args.batch,))
    names = list(seqtp.METHODS)
    models = {n: seqtp.RNNModel(args.input, args.hidden, args.classes) for n in names}
    methods = {n: build_method(Config(method=n)) for n in names}

    def call(n: str) -> float:
        model = models[n]
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        methods[n].backward(model, x, lambda s, m=model: torch.nn.functional.cross_entropy(m.readout(s[:, -1]), y))
        return time.perf_counter() - start

    for n in names:  # warm-up: allocations, factorizations, the feedbacks' creation
        call(n), call(n)
    times = {n: [] for n in names}
    for _ in range(args.rounds):
        for n in names:
            times[n].append(call(n))
    med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    rows = [{"method": n, "median_ms": med[n], "ratio_to_bptt": med[n] / med["bptt"]} for n in names]
    print(f"shape B={args.batch} T={args.seq_len} H={args.hidden} D={args.input}; {args.rounds} rounds in turns; "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    for r in rows:
        print(f"{r['method']:>6}  {r['median_ms']:9.1f} ms  {r['ratio_to_bptt']:6.2f}x BPTT")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
