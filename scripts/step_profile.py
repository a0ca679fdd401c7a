"""Per-step alignment of a finished run: ``seqtp.alignment`` of its method's targets against the BPTT adjoints, on
the run's own alignment batch (the first ``train.batch_size`` validation samples), from its last checkpoint.

    python scripts/step_profile.py RUN_FOLDER [RUN_FOLDER ...]

``RUN_FOLDER`` holds ``config.yaml`` and ``checkpoint.pt`` (``seqtp train --out``, or a seed folder of ``seqtp
compare``). Prints the global cosine and norm ratio, then the first step from which the per-step cosine stays at or
above 0.5 and the per-step cosines at a few steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from seqtp import alignment
from seqtp.config import build_method, load_config
from seqtp.train import build_model, build_task


def profile(folder: Path) -> str:
    cfg = load_config(folder / "config.yaml", [])
    device = torch.device("cpu")
    task = build_task(cfg, device)
    model = build_model(cfg, task, device)
    ckpt = torch.load(folder / "checkpoint.pt", map_location=device, weights_only=False)
    model.load_state_dict(ckpt["model"])
    method = build_method(cfg)
    method.load_state_dict(ckpt["method"])
    val_x, val_y = task.validation_set()
    x, y = val_x[: cfg.train.batch_size], val_y[: cfg.train.batch_size]
    out = alignment(model, x, lambda s: task.loss(model.read(s), y), method)
    steps = out["step_cosine"]  # [T]
    seq_len = steps.shape[0]
    above = (steps >= 0.5).flip(0).cumprod(0).flip(0)  # 1 from the first step after which every cosine is >= 0.5
    first = int(above.argmax()) + 1 if bool(above.any()) else None
    picks = sorted({1, seq_len // 4, seq_len // 2, 3 * seq_len // 4, seq_len})
    shown = ", ".join(f"t={t}: {float(steps[t - 1]):.2f}" for t in picks)
    return (f"{folder}: step {ckpt['step']}, cosine {float(out['cosine']):.3f}, norm ratio "
            f"{float(out['norm_ratio']):.3g}; per-step cosine >= 0.5 from step {first} of {seq_len}; {shown}")


def main() -> int:
    for arg in sys.argv[1:]:
        print(profile(Path(arg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
