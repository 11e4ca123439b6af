"""A small, real training job: a NumPy MLP on synthetic data that checkpoints and resumes.

Run it anywhere (``python train.py``) or on Rigshift::

    rigshift job submit --gpus 1 --working-dir examples/mlp_numpy -- python train.py

It classifies points of a noisy 5-arm spiral with a 2-hidden-layer MLP trained
by mini-batch Adam, written out in NumPy (forward, backward, optimiser). After
every epoch it writes ``checkpoint.npz`` atomically to ``$RIGSHIFT_CHECKPOINT_DIR``
(or ``./checkpoints``): weights, Adam moments, the epoch and the RNG state. When
it finds a checkpoint at start it resumes from the epoch after it, so an attempt
that the broker requeues (lost lease, spot preemption) loses at most one epoch.

The defaults take 10-30 s on one core of a small machine; ``--epochs``,
``--samples`` and ``--hidden`` make it shorter or longer. It prints one line per
epoch and exits 0 when the final accuracy beats ``--min-accuracy``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# One BLAS thread per job: a rig runs several jobs on few CPU cores.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402 - after the thread settings


def make_spiral(samples: int, classes: int = 5, noise: float = 0.3, seed: int = 7):
    """``samples`` 2-D points on ``classes`` interleaved spiral arms, with labels."""
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


def init_params(hidden: int, classes: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """He-initialised weights of a 2 → hidden → hidden → classes network."""
    sizes = [(2, hidden), (hidden, hidden), (hidden, classes)]
    params: dict[str, np.ndarray] = {}
    for i, (n_in, n_out) in enumerate(sizes):
        params[f"w{i}"] = (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(
            np.float32
        )
        params[f"b{i}"] = np.zeros(n_out, dtype=np.float32)
    return params


def forward(params: dict[str, np.ndarray], x: np.ndarray):
    """Logits and the activations the backward pass needs."""
    h0 = np.maximum(0, x @ params["w0"] + params["b0"])
    h1 = np.maximum(0, h0 @ params["w1"] + params["b1"])
    return h1 @ params["w2"] + params["b2"], (x, h0, h1)


def loss_and_grads(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray):
    """Softmax cross-entropy and its gradient for every parameter."""
    logits, (x0, h0, h1) = forward(params, x)
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    n = len(y)
    loss = float(-np.log(p[np.arange(n), y] + 1e-9).mean())
    d = p
    d[np.arange(n), y] -= 1
    d /= n
    grads = {"w2": h1.T @ d, "b2": d.sum(0)}
    d = (d @ params["w2"].T) * (h1 > 0)
    grads |= {"w1": h0.T @ d, "b1": d.sum(0)}
    d = (d @ params["w1"].T) * (h0 > 0)
    grads |= {"w0": x0.T @ d, "b0": d.sum(0)}
    return loss, grads


def accuracy(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    """Share of points classified correctly."""
    return float((forward(params, x)[0].argmax(1) == y).mean())


def save_checkpoint(path: str, epoch: int, params, m, v, step: int, rng) -> None:
    """Write the whole training state atomically (a crash never leaves half a file)."""
    tmp = path + ".tmp.npz"
    state = {f"p_{k}": a for k, a in params.items()}
    state |= {f"m_{k}": a for k, a in m.items()} | {f"v_{k}": a for k, a in v.items()}
    rng_state = np.frombuffer(json.dumps(rng.bit_generator.state).encode(), dtype=np.uint8)
    np.savez(tmp, epoch=epoch, step=step, rng=rng_state, **state)
    os.replace(tmp, path)


def load_checkpoint(path: str, rng):
    """(epoch, params, m, v, step) from a checkpoint; restores the RNG in place."""
    with np.load(path) as ck:
        params = {k[2:]: ck[k] for k in ck.files if k.startswith("p_")}
        m = {k[2:]: ck[k] for k in ck.files if k.startswith("m_")}
        v = {k[2:]: ck[k] for k in ck.files if k.startswith("v_")}
        rng.bit_generator.state = json.loads(bytes(ck["rng"]).decode())
        return int(ck["epoch"]), params, m, v, int(ck["step"])


def main(argv: list[str] | None = None) -> int:
    """Train, checkpointing every epoch; resume when a checkpoint exists."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--samples", type=int, default=60_000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--min-accuracy", type=float, default=0.80)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    job = os.environ.get("RIGSHIFT_JOB_ID", "local")
    attempt = os.environ.get("RIGSHIFT_ATTEMPT", "-")
    ckpt_dir = os.environ.get("RIGSHIFT_CHECKPOINT_DIR") or os.path.join(os.getcwd(), "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    ckpt = os.path.join(ckpt_dir, "checkpoint.npz")
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "none")
    print(f"job {job} attempt {attempt}: numpy MLP, GPUs {gpus} (numpy runs on the CPU)")

    x, y = make_spiral(args.samples)
    split = int(0.8 * len(y))
    x_train, y_train, x_test, y_test = x[:split], y[:split], x[split:], y[split:]
    rng = np.random.default_rng(args.seed)
    params = init_params(args.hidden, 5, rng)
    m = {k: np.zeros_like(a) for k, a in params.items()}
    v = {k: np.zeros_like(a) for k, a in params.items()}
    step, first_epoch = 0, 1
    if os.path.exists(ckpt):
        done, params, m, v, step = load_checkpoint(ckpt, rng)
        first_epoch = done + 1
        print(f"resumed from checkpoint of epoch {done}")

    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for epoch in range(first_epoch, args.epochs + 1):
        t0 = time.monotonic()
        order = rng.permutation(split)
        losses = []
        for start in range(0, split, args.batch):
            idx = order[start : start + args.batch]
            loss, grads = loss_and_grads(params, x_train[idx], y_train[idx])
            losses.append(loss)
            step += 1
            for k, g in grads.items():
                m[k] = beta1 * m[k] + (1 - beta1) * g
                v[k] = beta2 * v[k] + (1 - beta2) * g * g
                m_hat = m[k] / (1 - beta1**step)
                v_hat = v[k] / (1 - beta2**step)
                params[k] -= (args.lr * m_hat / (np.sqrt(v_hat) + eps)).astype(np.float32)
        save_checkpoint(ckpt, epoch, params, m, v, step, rng)
        acc = accuracy(params, x_test, y_test)
        print(
            f"epoch {epoch}/{args.epochs} loss {np.mean(losses):.4f} "
            f"test-acc {acc:.3f} ({time.monotonic() - t0:.2f} s, checkpoint saved)",
            flush=True,
        )

    acc = accuracy(params, x_test, y_test)
    print(f"final test accuracy {acc:.3f}")
    return 0 if acc >= args.min_accuracy else 1


if __name__ == "__main__":
    sys.exit(main())
