"""``seqtp train | compare``: the command line. The only place that resolves ``device="auto"``."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from . import bench
from .compare import compare, format_table
from .config import METHOD_NAMES, Config, ConfigError, load_config
from .train import RunError, train


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; a CUDA device without CUDA is a :class:`ConfigError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available")
    return torch.device(name)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML experiment file (see configs/)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. --set train.steps=200 tp.reg=1.0")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the config's, auto)")
    p.add_argument("--out", help="run folder (default: runs/<config>-<method>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqtp", description="Target propagation through time vs BPTT for RNNs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one method")
    _common(p)
    p.add_argument("--method", choices=METHOD_NAMES, help="override the config's method")
    p = sub.add_parser("compare", help="train several methods on the same data and plot them")
    _common(p)
    p.add_argument("--methods", default="tp,bptt", help="comma-separated methods (default: tp,bptt)")
    p = sub.add_parser("bench", help="time full training iterations of BPTT and TP variants")
    bench.add_arguments(p)
    return parser


def _default_out(config: str, label: str) -> Path:
    return Path("runs") / f"{Path(config).stem}-{label}-{time.strftime('%Y%m%d-%H%M%S')}"


def _load(args, **extra) -> tuple[Config, torch.device]:
    cfg = load_config(args.config, args.overrides, device=args.device, **extra)
    if args.resume and not args.out:
        raise ConfigError("--resume needs --out (the run folder to continue)")
    return cfg, resolve_device(cfg.device)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        try:
            device = resolve_device(args.device)
        except (ConfigError, RuntimeError) as e:
            print(f"seqtp bench: error: {e}", file=sys.stderr)
            return 2
        return bench.run_from_args(args, device)
    try:
        if args.command == "train":
            cfg, device = _load(args, method=args.method)
            out = Path(args.out) if args.out else _default_out(args.config, cfg.method)
            result = train(cfg, out, device=device, resume=args.resume, progress=not args.no_progress)
            results = {cfg.method: result}
        else:
            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            bad = [m for m in methods if m not in METHOD_NAMES]
            if len(set(methods)) != len(methods):
                raise ConfigError(f"--methods: each method once, got {args.methods!r}")
            if bad or not methods:
                raise ConfigError(f"--methods: unknown {', '.join(bad) or '(empty)'}; choose from "
                                  f"{', '.join(METHOD_NAMES)}")
            cfg, device = _load(args)
            cfg = replace(cfg, method=methods[0])
            out = Path(args.out) if args.out else _default_out(args.config, "compare")
            results = compare(cfg, out, methods=methods, device=device, resume=args.resume,
                              progress=not args.no_progress)
    except (ConfigError, RunError) as e:
        print(f"seqtp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("seqtp: interrupted; state checkpointed, continue with --resume", file=sys.stderr)
        return 130
    print(format_table(results))
    note = next(iter(results.values())).note
    if note:
        print(f"note: {note}")
    print(f"run folder: {out}")
    diverged = [f"{name}: {r.message}" for name, r in results.items() if r.status == "diverged"]
    for line in diverged:
        print(f"seqtp: {line}", file=sys.stderr)
    return 3 if diverged else 0


if __name__ == "__main__":
    sys.exit(main())
