"""``seqtp train | compare``: the command line. The only place that resolves ``device="auto"``."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from . import __version__, bench, tune
from .compare import compare, format_table
from .config import METHOD_NAMES, Config, ConfigError, load_config
from .train import RunError, Terminated, train

RUN_CONFIG = "config.yaml"  # the resolved config a run folder keeps; --resume without CONFIG reads it


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; a CUDA device without CUDA is a :class:`ConfigError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available")
    return torch.device(name)


def _common(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("config", nargs="?",
                   help=f"YAML experiment file (see configs/); with --resume, default: the {RUN_CONFIG} in --out")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. --set train.steps=200 tp.reg=1.0")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the config's, auto)")
    p.add_argument("--out", help=f"run folder (default: {default_out})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqtp", description="Target propagation through time vs BPTT for RNNs.")
    parser.add_argument("--version", action="version", version=f"seqtp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one method")
    _common(p, "runs/<config>-<method>-<time>")
    p.add_argument("--method", choices=METHOD_NAMES, help="override the config's method")
    p = sub.add_parser("compare", help="train several methods on the same data and plot them")
    _common(p, "runs/<config>-compare-<time>")
    p.add_argument("--methods", default="tp,bptt", help="comma-separated methods (default: tp,bptt)")
    p.add_argument("--seeds", help="comma-separated seeds, every method on each (default: the config's seed)")
    p = sub.add_parser("bench", help="time full training iterations of BPTT and TP variants")
    bench.add_arguments(p)
    tune.add_arguments(sub.add_parser("tune", help="tune a method's hyperparameters (Optuna)"))
    return parser


def _default_out(config: str, label: str) -> Path:
    return Path("runs") / f"{Path(config).stem}-{label}-{time.strftime('%Y%m%d-%H%M%S')}"


def _stored_config(out: Path, methods: list[str]) -> tuple[Path, list[str]]:
    """The config a resumed run starts from when no CONFIG is given, and the seeds of a comparison's folders.

    ``out/config.yaml`` (a train run folder), else the config of the first method's run folder of a comparison,
    ``out/<method>/`` or, with several seeds, ``out/<method>/seed_<k>/`` (they differ only in ``method`` and
    ``seed``, which the comparison sets); the seeds are the ``k`` of those folders (empty for one seed).
    """
    if (out / RUN_CONFIG).is_file():
        return out / RUN_CONFIG, []
    for m in methods:
        if (out / m / RUN_CONFIG).is_file():
            return out / m / RUN_CONFIG, []
        folders = [p for p in (out / m).glob(f"seed_*/{RUN_CONFIG}") if p.parent.name[5:].isdigit()]
        folders.sort(key=lambda p: int(p.parent.name[5:]))
        if folders:
            return folders[0], [p.parent.name[5:] for p in folders]
    raise ConfigError(f"cannot resume without CONFIG: no {RUN_CONFIG} in {out}")


def _load(args, methods: list[str] = (), **extra) -> tuple[Config, torch.device]:
    if args.resume and not args.out:
        raise ConfigError("--resume needs --out (the run folder to continue)")
    if args.config is None and not args.resume:
        raise ConfigError("CONFIG is required (without it, --out RUN --resume continues RUN from its config.yaml)")
    path = args.config
    if path is None:
        path, seeds = _stored_config(Path(args.out), list(methods))
        if seeds and getattr(args, "seeds", None) is None:
            args.seeds = ",".join(seeds)  # a comparison over several seeds resumes all of them
    cfg = load_config(path, args.overrides, device=args.device, **extra)
    return cfg, resolve_device(cfg.device)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings on the command line: one line each, without the source line."""
    print(f"seqtp: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; the exit code: 0, 2 (bad input), 3 (diverged), 130 (Ctrl-C), 143 (SIGTERM)."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    if args.command in ("bench", "tune"):
        try:
            device = resolve_device(args.device)
        except (ConfigError, RuntimeError) as e:
            print(f"seqtp {args.command}: error: {e}", file=sys.stderr)
            return 2
        return (bench if args.command == "bench" else tune).run_from_args(args, device)
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
            cfg, device = _load(args, methods)
            cfg = replace(cfg, method=methods[0])
            out = Path(args.out) if args.out else _default_out(args.config, "compare")
            results = compare(cfg, out, methods=methods, seeds=args.seeds, device=device, resume=args.resume,
                              progress=not args.no_progress)
    except (ConfigError, RunError) as e:
        print(f"seqtp: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print("seqtp: terminated (SIGTERM); state checkpointed, continue with --resume", file=sys.stderr)
        return 143
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
