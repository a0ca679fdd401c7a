"""Grid search over config keys: trains every combination and prints a table sorted by final validation loss.

    python scripts/sweep.py configs/temporal_order.yaml --method tp \
        --grid tp.reg=0.1,1,10 tp.target_lr=0.01,0.1 --set train.steps=2000 --out runs/sweep-to

Each run goes to OUT/<key=value,...>/ (a normal run folder); results.jsonl in OUT collects the final rows.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from seqtp.cli import resolve_device
from seqtp.config import load_config
from seqtp.train import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--method", default=None)
    p.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2", help="values to cross")
    p.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    axes = [(k, v.split(",")) for k, v in (g.split("=", 1) for g in args.grid)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for combo in itertools.product(*[vals for _, vals in axes]):
        pairs = [f"{k}={v}" for (k, _), v in zip(axes, combo, strict=True)]
        cfg = load_config(args.config, args.overrides + pairs, method=args.method)
        name = ",".join(pairs) or "default"
        result = train(cfg, out / name, device=resolve_device(cfg.device), progress=False)
        row = {"run": name, "status": result.status, **result.metrics}
        rows.append(row)
        with (out / "results.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        acc = row.get("val_accuracy")
        print(f"{name:60s} {result.status:10s} val_loss={row.get('val_loss', float('nan')):.4g}"
              + (f" val_acc={acc:.3f}" if acc is not None else ""), flush=True)
    rows.sort(key=lambda r: r.get("val_loss") if r.get("val_loss") is not None else float("inf"))
    print("\nbest:", rows[0]["run"] if rows else "-")


if __name__ == "__main__":
    main()
