"""Golden reference of every existing method configuration: the gradients ``Method.backward`` writes, in float64.

    python scripts/golden_methods.py tests/data/golden_methods.json      # write the reference
    python scripts/golden_methods.py --check tests/data/golden_methods.json

The reference of the methods that existed before the refactor into ``seqtp/methods`` and ``seqtp/inverses`` was
written by the code before it; that of the methods added with it (DTP, DRL, DDTP, L-DRL, GAIT-prop, the normalized
update) by the code that added them, before any later change;
``tests/test_golden.py`` checks the current code against it (float64, small random instances, so the comparison is
independent of the CPU's vector paths to ~1e-12). Uses only the public API, so it ran unchanged before and after.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import seqtp

# (name, cell, nonlinearity, method factory, number of backward calls: the learned inverse trains between them)
CASES = []


def _case(name, cell, method, *, nonlinearity="tanh", calls=1):
    CASES.append((name, cell, nonlinearity, method, calls))


for _mode in ("linearized", "difference", "exact"):
    for _update in ("local", "through_time"):
        _case(f"elman-analytic-{_mode}-{_update}", "elman",
              lambda m=_mode, u=_update: seqtp.TargetProp(reg=0.5, target_lr=0.3, mode=m, update=u, solver="analytic"))
_case("elman-analytic-cap", "elman",
      lambda: seqtp.TargetProp(reg=0.1, target_lr=0.5, shift_cap=0.2, solver="analytic"))
_case("elman-relu-analytic", "elman",
      lambda: seqtp.TargetProp(reg=0.5, target_lr=0.3, mode="difference", solver="analytic"), nonlinearity="relu")
for _solver, _opts in (("gauss_newton", {}), ("gauss_newton", {"space": "preactivation"}), ("iterated", {"steps": 3}),
                       ("dense", {})):
    for _mode in ("linearized", "difference", "exact"):
        _case(f"elman-{_solver}{'-' + _opts['space'] if 'space' in _opts else ''}-{_mode}", "elman",
              lambda s=_solver, o=_opts, m=_mode: seqtp.TargetProp(reg=0.5, target_lr=0.3, mode=m, solver=s,
                                                                    solver_options=dict(o)))
for _cell in ("gru", "lstm"):
    for _solver in ("dense", "gauss_newton"):
        for _mode, _update in (("linearized", "local"), ("difference", "through_time"), ("exact", "local")):
            _case(f"{_cell}-{_solver}-{_mode}-{_update}", _cell,
                  lambda s=_solver, m=_mode, u=_update: seqtp.TargetProp(reg=0.5, target_lr=0.3, mode=m, update=u,
                                                                          solver=s))
    _case(f"{_cell}-auto", _cell, lambda: seqtp.TargetProp(reg=0.5, target_lr=0.3))
for _mode in ("linearized", "difference"):
    _case(f"elman-learned-{_mode}", "elman",
          lambda m=_mode: seqtp.TargetProp(reg=1.0, target_lr=0.3, mode=m, solver="learned",
                                           solver_options={"feedback_lr": 0.05, "noise": 0.1}), calls=3)
# the methods added with the split (references written by the code that introduced them, before later changes)
_case("elman-analytic-normalize", "elman",
      lambda: seqtp.TargetProp(reg=0.5, target_lr=0.3, update="through_time", solver="analytic", normalize=True))
_case("dtp", "elman", lambda: seqtp.DTP(target_lr=0.3, feedback_lr=0.05, noise=0.1), calls=3)
_case("drl", "elman", lambda: seqtp.DRL(target_lr=0.3, feedback_lr=0.05, sample_steps=3), calls=3)
_case("drl-gru-normalize", "gru",
      lambda: seqtp.DRL(target_lr=0.3, feedback_lr=0.05, truncation=2, normalize=True), calls=2)
_case("ddtp", "elman", lambda: seqtp.DDTP(target_lr=0.3, feedback_lr=0.05, damping=0.1), calls=3)
_case("ddtp-lstm", "lstm", lambda: seqtp.DDTP(target_lr=0.3, feedback_lr=0.05, truncation=3), calls=2)
_case("ldrl", "elman", lambda: seqtp.LDRL(target_lr=0.5, feedback_steps=3, feedback_probes=64), calls=3)
_case("ldrl-clip", "elman",
      lambda: seqtp.LDRL(feedback_steps=2, feedback_probes=32, feedback_momentum=0.9, clip=0.05), calls=2)
_case("gait", "elman", lambda: seqtp.GAITProp(target_lr=0.5, gamma=1e-3))
_case("gait-penalty-clip", "elman", lambda: seqtp.GAITProp(gamma=1e-2, ortho_penalty=0.5, clip=0.1))
_case("gait-relu", "elman", lambda: seqtp.GAITProp(gamma=1e-3), nonlinearity="relu")
_case("bptt", "elman", lambda: seqtp.BPTT())
_case("bptt-clip", "elman", lambda: seqtp.BPTT(clip=0.1))
_case("bptt-truncation", "elman", lambda: seqtp.BPTT(truncation=2))
_case("bptt-gru", "gru", lambda: seqtp.BPTT())


def run_case(cell: str, nonlinearity: str, make_method, calls: int) -> dict[str, list[float]]:
    """The ``.grad`` of every parameter after ``calls`` backward calls (each on its own batch, grads zeroed between
    them) on a fixed float64 model and data."""
    model = seqtp.RNNModel(3, 5, 2, cell=cell, nonlinearity=nonlinearity).double()
    init = torch.Generator().manual_seed(0)
    with torch.no_grad():  # float64 uniform draws: the same bits on every CPU (a float32 QR init is not)
        for p in model.parameters():
            bound = 1.0 / p.shape[-1] ** 0.5 if p.ndim == 2 else 0.3
            p.copy_((2 * torch.rand(p.shape, generator=init, dtype=torch.float64) - 1) * bound)
    gen = torch.Generator().manual_seed(1)
    method = make_method()
    out = {}
    for _ in range(calls):
        x = torch.randn(4, 6, 3, generator=gen, dtype=torch.float64)
        y = torch.randn(4, 2, generator=gen, dtype=torch.float64)
        model.zero_grad(set_to_none=True)
        loss, _ = method.backward(model, x, lambda h, y=y: (model.readout(h[:, -1]) - y).square().sum(-1).mean())
        out["loss"] = [float(loss)]
    for name, p in model.named_parameters():
        out[name] = p.grad.flatten().tolist()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    results = {name: run_case(cell, nl, make, calls) for name, cell, nl, make, calls in CASES}
    if not args.check:
        with open(args.path, "w") as f:
            json.dump(results, f, indent=0)
        print(f"wrote {len(results)} cases to {args.path}")
        return 0
    with open(args.path) as f:
        ref = json.load(f)
    worst = 0.0
    for name, grads in results.items():
        for key, values in grads.items():
            a = torch.tensor(values, dtype=torch.float64)  # float64: the default dtype would round both to float32
            b = torch.tensor(ref[name][key], dtype=torch.float64)
            err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
            bits = a.equal(b)
            worst = max(worst, err)
            if not bits:
                print(f"{name} {key}: max rel diff {err:.2e}")
    print(f"{len(results)} cases, worst relative difference {worst:.2e}")
    return 0 if worst == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
