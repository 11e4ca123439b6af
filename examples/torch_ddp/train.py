"""Data-parallel training of a small MLP with PyTorch DDP, one process per GPU Rigshift gives.

Start it with ``run.sh``, which runs ``torchrun --standalone --nproc-per-node=N`` with N the
number of GPUs in ``CUDA_VISIBLE_DEVICES``::

    rigshift job submit --gpus 2 --working-dir examples/torch_ddp \\
        --input data=data.pt -- sh run.sh --epochs 3

Every rank reads the whole data set (``torch.load`` of the one ``.pt`` file under
``$RIGSHIFT_INPUT_DIR/data``, or ``--data PATH``; with neither it builds the data itself with
``make_data.make_dataset``) and trains on its shard of it (``DistributedSampler``). The
backend is ``nccl`` when CUDA is available, else ``gloo`` on the CPU.

Rank 0 writes ``$RIGSHIFT_CHECKPOINT_DIR/ckpt.pt`` after every epoch (a temporary file,
then ``os.replace``); every rank resumes from it when it is there. At the end rank 0 writes
``$RIGSHIFT_OUTPUT_DIR/model.pt`` (the model's ``state_dict``; load it into ``Regressor``)
and ``$RIGSHIFT_OUTPUT_DIR/metrics.json``. Outside Rigshift the directories default to
``./inputs``, ``./outputs`` and ``./checkpoints``, and ``python train.py`` alone runs a
world of one process.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import sys
import time
import warnings
from pathlib import Path

# torch warns at import when NumPy is missing; this example does not use NumPy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
# N processes share the rig's cores: one intra-op thread each unless the caller chose.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset  # noqa: E402

VALIDATION_SHARE = 0.1


class Regressor(nn.Module):
    """Two hidden layers of ``hidden`` units with ReLU, one output."""

    def __init__(self, features: int = 8, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions, shape ``[batch, 1]``."""
        return self.net(x)


def env_dir(name: str, default: str) -> Path:
    """The directory ``$name`` names, or ``./default`` when it is unset or empty."""
    return Path(os.environ.get(name) or Path.cwd() / default)


def find_data(data_arg: str | None) -> Path | None:
    """The ``.pt`` file to train on: ``--data`` (a file, or a directory holding one), else the
    input named ``data`` under ``$RIGSHIFT_INPUT_DIR``; None when there is neither."""
    where = Path(data_arg) if data_arg else env_dir("RIGSHIFT_INPUT_DIR", "inputs") / "data"
    if where.is_file():
        return where
    if where.is_dir():
        found = sorted(where.rglob("*.pt"))
        if not found:
            raise SystemExit(f"no .pt file under {where}")
        if len(found) > 1:
            names = ", ".join(str(p.relative_to(where)) for p in found)
            raise SystemExit(f"more than one .pt file under {where} ({names}); pass --data")
        return found[0]
    if data_arg:
        raise SystemExit(f"--data {data_arg}: no such file or directory")
    return None


def load_data(path: Path | None, samples: int) -> tuple[dict, str]:
    """``({"x", "y"}, where it came from)``: the file, or generated data when there is none."""
    if path is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from make_data import make_dataset

        return make_dataset(samples), f"generated ({samples} samples)"
    data = torch.load(path, map_location="cpu")
    if not isinstance(data, dict) or "x" not in data or "y" not in data:
        raise SystemExit(f"{path}: expected a dict with tensors 'x' and 'y' (see make_data.py)")
    return data, str(path)


def free_port() -> int:
    """A TCP port on the loopback that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_launcher() -> None:
    """Under torchrun on Linux, have the kernel SIGKILL this process when the launcher dies.

    torchrun starts each worker in a session of its own, so a launcher killed outright (the
    OOM killer, a SIGKILL to its process group) would leave the workers training on and
    writing the checkpoint that the next attempt resumes from.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != launcher:  # it died before the prctl
        os._exit(1)


def init_distributed() -> tuple[int, int, torch.device, str]:
    """Join the process group torchrun set up (or make a world of one without torchrun).

    Returns ``(rank, world_size, device, backend)``.
    """
    if "RANK" not in os.environ:  # `python train.py`, no launcher
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device, dist.get_backend()


def save_atomically(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``:
    a reader (or the next attempt after a kill) sees the old file or the new one, whole."""
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Train, checkpoint every epoch, resume from a checkpoint; rank 0 writes the outputs."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--data", help="a .pt file from make_data.py (default: the input 'data')")
    ap.add_argument("--samples", type=int, default=16_384, help="when generating the data")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64, help="per process")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    die_with_launcher()
    rank, world, device, backend = init_distributed()
    ckpt_dir = env_dir("RIGSHIFT_CHECKPOINT_DIR", "checkpoints")
    out_dir = env_dir("RIGSHIFT_OUTPUT_DIR", "outputs")
    ckpt_path = ckpt_dir / "ckpt.pt"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)

    data, source = load_data(find_data(args.data), args.samples)
    x, y = data["x"].float(), data["y"].float().reshape(-1, 1)
    n_val = int(len(x) * VALIDATION_SHARE)
    train_set = TensorDataset(x[n_val:], y[n_val:])
    x_val, y_val = x[:n_val].to(device), y[:n_val].to(device)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, seed=args.seed)
    loader = DataLoader(train_set, batch_size=args.batch, sampler=sampler)
    if rank == 0:
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES") or "none"
        print(
            f"job {os.environ.get('RIGSHIFT_JOB_ID', 'local')} attempt "
            f"{os.environ.get('RIGSHIFT_ATTEMPT', '-')}: {world} process(es), backend {backend}, "
            f"device {device.type}, GPUs {gpus}; data {source}: {len(train_set)} train, "
            f"{n_val} validation",
            flush=True,
        )

    torch.manual_seed(args.seed)
    model = Regressor(x.shape[1], args.hidden).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    done, last_loss = 0, float("nan")
    if ckpt_path.exists():  # every rank loads it; rank 0 rewrites it only after an epoch
        state = torch.load(ckpt_path, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        done, last_loss = state["epoch"], state["loss"]
        if rank == 0:
            print(f"resumed from epoch {done}", flush=True)
    ddp = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )

    def validation_loss() -> float:
        with torch.no_grad():
            return nn.functional.mse_loss(model(x_val), y_val).item()

    samples_seen, train_s = 0, 0.0
    for epoch in range(done + 1, args.epochs + 1):
        t0 = time.monotonic()
        sampler.set_epoch(epoch)
        ddp.train()
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # sum of losses, samples
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            loss = nn.functional.mse_loss(ddp(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            totals += torch.stack([loss.detach().double() * len(xb), totals.new_tensor(len(xb))])
        dist.all_reduce(totals)  # the mean over every rank's samples
        last_loss = (totals[0] / totals[1]).item()
        samples_seen += int(totals[1].item())
        train_s += time.monotonic() - t0
        if rank == 0:
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch}
            save_atomically({**state, "loss": last_loss, "world_size": world}, ckpt_path)
            print(
                f"epoch {epoch}/{args.epochs} loss {last_loss:.4f} val {validation_loss():.4f} "
                f"({time.monotonic() - t0:.2f} s)",
                flush=True,
            )

    if rank == 0:
        save_atomically(model.state_dict(), out_dir / "model.pt")
        metrics = {
            "final_loss": last_loss,
            "val_loss": validation_loss(),
            "epochs": args.epochs,
            "epochs_this_attempt": args.epochs - min(done, args.epochs),
            "resumed_from_epoch": done or None,
            "world_size": world,
            "backend": backend,
            "device": device.type,
            "samples_per_s": round(samples_seen / train_s, 1) if train_s else None,
            "train_s": round(train_s, 3),
            "data": source,
            "job_id": os.environ.get("RIGSHIFT_JOB_ID"),
            "attempt": os.environ.get("RIGSHIFT_ATTEMPT"),
        }
        tmp = out_dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
        os.replace(tmp, out_dir / "metrics.json")
        print(f"final loss {last_loss:.4f}; wrote {out_dir / 'model.pt'} and metrics.json")
    dist.barrier()  # nobody leaves while rank 0 still needs the group
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
