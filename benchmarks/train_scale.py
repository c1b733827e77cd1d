"""Epoch time of `edgeexit train` under torchrun with 1, 2, ... processes (CPU, gloo, or GPUs with nccl).

Each process count trains twice, for `--base` and `--base + --extra` epochs; the difference
divided by `--extra` is the time of one epoch without start-up, data loading and export
costs. Writes benchmarks/results/train_scale.json.

    python benchmarks/train_scale.py --backbone resnet20 --procs 1,2 --device cpu
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed_run(procs: int, epochs: int, args: argparse.Namespace, out: Path) -> float:
    """Wall-clock seconds of one torchrun launch of `edgeexit train`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "edgeexit", "train", "--data", "digits", "--backbone", args.backbone,
               "--epochs", str(epochs), "--batch-size", str(args.batch_size), "--device", args.device,
               "--precision", args.precision, "--out", str(out / f"model_{procs}_{epochs}.pt")]
    if args.input_size:
        command += ["--input-size", str(args.input_size)]
    threads = args.threads or max(1, (os.cpu_count() or 1) // procs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet20")
    parser.add_argument("--input-size", type=int, default=None, help="default: digits at 32x32")
    parser.add_argument("--procs", default="1,2", help="process counts, comma separated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32")
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--threads", type=int, default=None, help="OMP threads per process (default: cores / processes)")
    parser.add_argument("--base", type=int, default=1)
    parser.add_argument("--extra", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "train_scale.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for procs in (int(p) for p in args.procs.split(",")):
            short = timed_run(procs, args.base, args, Path(tmp))
            long = timed_run(procs, args.base + args.extra, args, Path(tmp))
            row = {"processes": procs, "epoch_s": (long - short) / args.extra, "wall_s": {str(args.base): short,
                                                                                        str(args.base + args.extra): long}}
            print(f"{procs} process(es): {row['epoch_s']:.1f} s/epoch (runs {short:.1f} s and {long:.1f} s)", flush=True)
            rows.append(row)
    report = {"backbone": args.backbone, "input_size": args.input_size, "device": args.device, "precision": args.precision,
              "batch_size_per_process": args.batch_size, "threads_per_process": args.threads or "cores / processes", "cpu_count": os.cpu_count(),
              "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
