"""Write the synthetic regression data set that ``train.py`` learns, as one ``torch.save`` file.

::

    python make_data.py                       # data.pt, 16,384 samples
    python make_data.py --samples 100000 --out big.pt

The file holds ``{"x": float32 [N, 8], "y": float32 [N, 1]}``: eight features drawn
uniformly from [-1, 1] and a smooth non-linear target with a little noise. ``train.py``
imports ``make_dataset`` to build the same data itself when it is given no input.
"""

from __future__ import annotations

import argparse
import os
import warnings

# torch warns at import when NumPy is missing; the data set does not need it.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

FEATURES = 8


def make_dataset(samples: int = 16_384, seed: int = 7) -> dict:
    """``{"x", "y"}`` tensors: y = sin(3 x0) + x1 * x2 + 0.5 cos(2 x3) - 0.3 x4^2 + noise."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(samples, FEATURES, generator=gen) * 2 - 1
    y = (
        torch.sin(3 * x[:, 0])
        + x[:, 1] * x[:, 2]
        + 0.5 * torch.cos(2 * x[:, 3])
        - 0.3 * x[:, 4] ** 2
        + 0.05 * torch.randn(samples, generator=gen)
    )
    return {"x": x.contiguous(), "y": y.unsqueeze(1).contiguous()}


def main(argv: list[str] | None = None) -> int:
    """Write the data set to ``--out`` (atomically: a temporary file, then a rename)."""
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16_384)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default="data.pt")
    args = ap.parse_args(argv)
    data = make_dataset(args.samples, args.seed)
    tmp = args.out + ".tmp"
    torch.save(data, tmp)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {args.samples} samples, {FEATURES} features")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
