"""The PyTorch variant of ``examples/mlp_numpy``: same data, same checkpoint-and-resume contract.

Needs the optional extra (``pip install 'rigshift[torch]'``); without torch it
says so and exits 3, so a job submitted to a rig without torch fails clearly::

    rigshift job submit --gpus 1 --working-dir examples/mlp_torch -- python train.py

It trains on ``cuda`` when a GPU is visible (Rigshift sets ``CUDA_VISIBLE_DEVICES``
to the job's GPUs), else on the CPU, and saves ``checkpoint.pt`` to
``$RIGSHIFT_CHECKPOINT_DIR`` after every epoch (model, optimiser, epoch).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def make_spiral(samples: int, classes: int = 5, noise: float = 0.3, seed: int = 7):
    """The numpy example's spiral (same seed, same points)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    per = samples // classes
    xs, ys = [], []
    for c in range(classes):
        r = np.linspace(0.05, 1.0, per)
        t = np.linspace(c * 4.0, (c + 1) * 4.0, per) + rng.normal(0, noise, per)
        xs.append(np.stack([r * np.sin(t), r * np.cos(t)], axis=1))
        ys.append(np.full(per, c))
    x, y = np.concatenate(xs).astype(np.float32), np.concatenate(ys)
    order = rng.permutation(len(y))
    return x[order], y[order]


def main(argv: list[str] | None = None) -> int:
    """Train with torch, checkpointing every epoch; resume when a checkpoint exists."""
    try:
        import torch
        from torch import nn
    except ImportError:
        print("torch is not installed on this rig (pip install 'rigshift[torch]')", flush=True)
        return 3

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--samples", type=int, default=60_000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--min-accuracy", type=float, default=0.80)
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "none")
    print(f"job {os.environ.get('RIGSHIFT_JOB_ID', 'local')}: torch on {name} (GPUs {gpus})")

    ckpt_dir = os.environ.get("RIGSHIFT_CHECKPOINT_DIR") or os.path.join(os.getcwd(), "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    ckpt = os.path.join(ckpt_dir, "checkpoint.pt")

    x, y = make_spiral(args.samples)
    split = int(0.8 * len(y))
    xt = torch.from_numpy(x).to(device)
    yt = torch.from_numpy(y).long().to(device)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(2, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, 5),
    ).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    first_epoch = 1
    if os.path.exists(ckpt):
        state = torch.load(ckpt, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        first_epoch = state["epoch"] + 1
        print(f"resumed from checkpoint of epoch {state['epoch']}")

    def test_accuracy() -> float:
        with torch.no_grad():
            return (model(xt[split:]).argmax(1) == yt[split:]).float().mean().item()

    for epoch in range(first_epoch, args.epochs + 1):
        t0 = time.monotonic()
        order = torch.randperm(split, device=device)
        total = 0.0
        for start in range(0, split, args.batch):
            idx = order[start : start + args.batch]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        tmp = ckpt + ".tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch}, tmp)
        os.replace(tmp, ckpt)
        print(
            f"epoch {epoch}/{args.epochs} loss {total / split:.4f} test-acc {test_accuracy():.3f} "
            f"({time.monotonic() - t0:.2f} s, checkpoint saved)",
            flush=True,
        )
    acc = test_accuracy()
    print(f"final test accuracy {acc:.3f}")
    return 0 if acc >= args.min_accuracy else 1


if __name__ == "__main__":
    sys.exit(main())
