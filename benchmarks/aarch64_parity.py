"""Same bundle, x86 vs aarch64: predictions, exit indices and logits must agree.

Sets up (once, as root, on a Debian/Ubuntu x86 host) an arm64 Debian userland run by qemu
user-mode: `debootstrap --foreign --arch arm64` plus qemu-user-static registered with
binfmt_misc, then the second debootstrap stage inside it; onnxruntime/numpy aarch64 wheels
come from `pip download --platform manylinux2014_aarch64 --only-binary=:all:` and the
runtime-only edgeexit wheel is built from this checkout (no torch, no onnx on the arm side).
Each bundle runs on both sides (threads 1, batch 1 and 256; the stage chain, and cascade.onnx
when the bundle has one) on the digits test split plus random inputs; the comparison goes to
benchmarks/results/aarch64_parity.json.

Goals: fp32: every decision (prediction, exit index) equal. int8: every differing decision
explained: at the first exit where the two machines decide differently, the two scores lie
on either side of the threshold and differ by at most ROUNDING (two uint8 steps of a [0, 1]
score). qemu timings mean nothing; only parity is measured.

    sudo python benchmarks/aarch64_parity.py --bundle fp32=demo/bundle --bundle int8=demo/bundle-int8 --bundle fp32-batch1=demo/bundle-b1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROUNDING = 2 / 255
BATCH_SIZES = (1, 256)
RANDOM_INPUTS = 64
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
WHEELS = ("onnxruntime==1.32.0", "numpy==2.4.6", "click", "pillow")
RESULTS = Path(__file__).resolve().parent / "results" / "aarch64_parity.json"
REPO = Path(__file__).resolve().parent.parent


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}


def sh(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run a command (chroot ones with a clean environment: host pip/python settings must not leak in)."""
    log("$ " + " ".join(args))
    env = CLEAN_ENV if args[0] == "chroot" else None
    return subprocess.run(args, check=True, env=env, **kwargs)


# ---- arm64 userland under qemu ---------------------------------------------------------------

def register_binfmt() -> None:
    """Mount binfmt_misc and register qemu-aarch64-static (F flag: usable inside the chroot)."""
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "register").exists():
        sh("mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt))
    if not (binfmt / "qemu-aarch64").exists():
        conf = Path("/usr/lib/binfmt.d/qemu-aarch64.conf").read_text().strip()
        fields = conf.split(":")
        fields[-2], fields[-1] = "/usr/bin/qemu-aarch64-static", "POF"
        (binfmt / "register").write_text(":".join(fields))


def setup_rootfs(rootfs: Path) -> Path:
    """An arm64 Debian with a venv holding the runtime-only edgeexit; returns the venv's python."""
    python = rootfs / "ee" / "bin" / "python"
    if not shutil.which("debootstrap") or not Path("/usr/bin/qemu-aarch64-static").exists():
        sh("apt-get", "install", "-y", "-q", "debootstrap", "qemu-user-static")
    register_binfmt()
    if not (rootfs / "usr" / "bin" / "python3").exists():
        sh("debootstrap", "--arch=arm64", "--foreign", "--variant=minbase", "--include=python3,python3-venv",
           SUITE, str(rootfs), MIRROR)
        sh("chroot", str(rootfs), "/debootstrap/debootstrap", "--second-stage")
    wheels = rootfs / "wheels"
    wheels.mkdir(exist_ok=True)
    sh(sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", "3.11",
       "--platform", "manylinux2014_aarch64", "--platform", "manylinux_2_28_aarch64", "-d", str(wheels), *WHEELS)
    for old in wheels.glob("edgeexit-*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:  # a clean copy: no stale build/ or egg-info in the wheel
        source = Path(tmp) / "edgeexit"
        shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__"))
        sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(source))
    if not python.exists():
        sh("chroot", str(rootfs), "/usr/bin/python3", "-m", "venv", "/ee")
    sh("chroot", str(rootfs), "/ee/bin/pip", "install", "-q", "--no-index", "--force-reinstall", "--no-deps",
       "--find-links", "/wheels", "edgeexit")
    sh("chroot", str(rootfs), "/ee/bin/pip", "install", "-q", "--no-index", "--find-links", "/wheels", "edgeexit")
    return python


# ---- one side: run a bundle, keep everything --------------------------------------------------

def dump(bundle: str, inputs: str, out: str) -> None:
    """Runtime-only: cascade decisions at each batch size, every exit output, final and full.onnx logits."""
    import onnxruntime

    from edgeexit.runtime.cascade import CascadeRunner
    from edgeexit.runtime.graph import GraphRunner

    runner = CascadeRunner(bundle, threads=1)
    engines = {"chain": runner, **({"graph": GraphRunner(bundle, threads=1)} if runner.manifest.cascade else {})}
    x = np.load(inputs)
    arrays: dict[str, np.ndarray] = {}
    for engine, run in engines.items():
        for batch in BATCH_SIZES:
            results = [run.predict(x[i : i + batch]) for i in range(0, len(x), batch)]
            arrays[f"{engine}_pred_b{batch}"] = np.concatenate([r.predictions for r in results])
            arrays[f"{engine}_exit_b{batch}"] = np.concatenate([r.exit_index for r in results])
    exit_outputs, final = runner.stage_outputs(x)
    arrays["final_logits"] = final
    arrays["full_logits"] = runner.predict_full(x)
    for k, (outputs, policy) in enumerate(zip(exit_outputs, runner.policies)):
        for role, value in outputs.items():
            arrays[f"exit{k}_{role}"] = value
        try:
            arrays[f"score{k}"] = policy.scores(outputs)
        except NotImplementedError:  # stateful policies have no single per-input score
            pass
    arrays["thresholds"] = np.asarray(runner.thresholds)
    np.savez(out, **arrays)
    Path(out + ".json").write_text(json.dumps({"machine": platform.machine(), "onnxruntime": onnxruntime.__version__,
                                               "numpy": np.__version__, "python": platform.python_version()}))


# ---- comparison --------------------------------------------------------------------------------

def explain(a: dict, b: dict, run: str, i: int) -> dict:
    """Why input i's decision differs in `run` (ENGINE_bBATCH): the first exit where the sides part, its scores and threshold."""
    engine, batch = run.split("_b")
    exits_a, exits_b = a[f"{engine}_exit_b{batch}"], b[f"{engine}_exit_b{batch}"]
    k = int(min(exits_a[i], exits_b[i]))
    entry = {"input": i, "exit_x86": int(exits_a[i]), "exit_aarch64": int(exits_b[i]),
             "pred_x86": int(a[f"{engine}_pred_b{batch}"][i]), "pred_aarch64": int(b[f"{engine}_pred_b{batch}"][i]), "exit": k}
    if k < len(a["thresholds"]) and f"score{k}" in a:
        sa, sb, t = float(a[f"score{k}"][i]), float(b[f"score{k}"][i]), float(a["thresholds"][k])
        entry.update(score_x86=sa, score_aarch64=sb, threshold=t,
                     explained=bool(min(sa, sb) <= t <= max(sa, sb) and abs(sa - sb) <= ROUNDING))
    else:  # both reached the final stage or an exit without a score: only a logits tie can explain it
        top2 = np.sort(a["final_logits"][i])[-2:]
        entry.update(final_margin_x86=float(top2[1] - top2[0]), explained=bool(top2[1] - top2[0] <= ROUNDING))
    return entry


def compare(a: dict, b: dict) -> dict:
    """Decision agreement per engine (chain; graph: cascade.onnx) and batch size, and the largest output differences."""
    report: dict = {"runs": {}, "max_abs_diff": {}}
    for run in sorted(key.replace("_pred", "") for key in a if "_pred_b" in key):
        engine, batch = run.split("_b")
        pred = a[f"{engine}_pred_b{batch}"] == b[f"{engine}_pred_b{batch}"]
        ex = a[f"{engine}_exit_b{batch}"] == b[f"{engine}_exit_b{batch}"]
        differing = np.flatnonzero(~(pred & ex))
        report["runs"][run] = {
            "inputs": int(len(pred)), "equal_predictions": float(pred.mean()), "equal_exit_index": float(ex.mean()),
            "differing": [explain(a, b, run, int(i)) for i in differing],
        }
    for key in a:
        if key.startswith(("exit", "final", "full", "score")) and a[key].dtype.kind == "f":
            report["max_abs_diff"][key] = float(np.abs(a[key] - b[key]).max())
    differing = [d for s in report["runs"].values() for d in s["differing"]]
    report["all_decisions_equal"] = not differing
    report["all_differences_explained"] = all(d["explained"] for d in differing)
    return report


def parity(rootfs: Path, bundles: dict[str, Path], cpus: list[str]) -> dict:
    """Run every bundle on x86 (here) and on each emulated arm CPU; compare."""
    setup_rootfs(rootfs)
    from edgeexit.runtime.datasets import load_eval_data
    from edgeexit.runtime.manifest import load_manifest

    work = rootfs / "parity"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    shutil.copy(__file__, work / "aarch64_parity.py")
    qemu = subprocess.run(["/usr/bin/qemu-aarch64-static", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    results: dict = {"qemu": qemu, "suite": f"debian {SUITE} arm64", "rounding": ROUNDING, "bundles": {}}
    for name, bundle in bundles.items():
        manifest = load_manifest(bundle)
        x, _ = load_eval_data("digits", "test", manifest.input_spec)
        noise = np.random.default_rng(0).standard_normal((RANDOM_INPUTS, *manifest.input_shape)).astype(np.float32)
        np.save(work / f"{name}.npy", np.concatenate([x, noise]))
        shutil.copytree(bundle, work / name)
        log(f"{name}: x86")
        dump(str(work / name), str(work / f"{name}.npy"), str(work / f"{name}.x86.npz"))
        x86 = dict(np.load(work / f"{name}.x86.npz"))
        entry = {"precision": manifest.precision, "inputs": "digits test + %d random" % RANDOM_INPUTS,
                 "cascade_onnx": (bundle / "cascade.onnx").exists(),
                 "x86": json.loads((work / f"{name}.x86.npz.json").read_text()), "aarch64": {}}
        for cpu in cpus:
            log(f"{name}: aarch64 {cpu} (qemu)")
            # No /proc or /sys in the chroot: with the host's bind-mounted the arm python died with SIGSEGV
            # (measured, qemu 7.2); without them onnxruntime's cpuinfo warns it cannot list the processors.
            sh("chroot", str(rootfs), "/usr/bin/env", f"QEMU_CPU={cpu}", "/ee/bin/python", "/parity/aarch64_parity.py",
               "dump", f"/parity/{name}", f"/parity/{name}.npy", f"/parity/{name}.{cpu}.npz")
            arm = dict(np.load(work / f"{name}.{cpu}.npz"))
            entry["aarch64"][cpu] = {**json.loads((work / f"{name}.{cpu}.npz.json").read_text()), **compare(x86, arm)}
        results["bundles"][name] = entry
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    inner = sub.add_parser("dump", help="(runs inside the arm64 userland) write one side's outputs")
    inner.add_argument("bundle")
    inner.add_argument("inputs")
    inner.add_argument("out")
    parser.add_argument("--bundle", action="append", default=[], metavar="NAME=PATH", help="bundle to compare (repeat)")
    parser.add_argument("--rootfs", default=os.path.expanduser("~/.cache/edgeexit-aarch64"), help="arm64 userland folder")
    parser.add_argument("--cpu", default="cortex-a72,cortex-a76", help="qemu CPU models, comma separated")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.command == "dump":
        dump(args.bundle, args.inputs, args.out)
        return
    if not args.bundle:
        parser.error("give at least one --bundle NAME=PATH")
    bundles = {spec.split("=", 1)[0]: Path(spec.split("=", 1)[1]).resolve() for spec in args.bundle}
    results = parity(Path(args.rootfs).resolve(), bundles, args.cpu.split(","))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for name, entry in results["bundles"].items():
        for cpu, rep in entry["aarch64"].items():
            sizes = ", ".join(f"{run}: {s['equal_predictions']:.4f}/{s['equal_exit_index']:.4f}" for run, s in rep["runs"].items())
            worst = max(rep["max_abs_diff"].values())
            print(f"{name} ({entry['precision']}) on {cpu}: equal predictions/exits {sizes}; max abs diff {worst:.1e}; "
                  f"all equal {rep['all_decisions_equal']}, differences explained {rep['all_differences_explained']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
