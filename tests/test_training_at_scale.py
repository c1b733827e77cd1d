"""Training where users train: device and precision choice, checkpoint/resume, torchrun DDP.

CUDA paths run only on a machine with a GPU and skip with a reason elsewhere.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from edgeexit.cli import main
from edgeexit.errors import ConfigError, DeviceError, InputError
from edgeexit.train import trainer
from edgeexit.train.checkpoints import CHECKPOINT_FILE
from edgeexit.train.hardware import TrainEnv, get_precision, resolve_device, training_env
from edgeexit.train.models import read_checkpoint

# eenet8 at 16x16: the smallest real backbone, a few seconds an epoch on 2 cores
SMALL = {"backbone": "eenet8", "input_size": 16, "epochs": 2, "num_exits": 2, "placement": "linear",
         "exit_type": "plain", "device": "cpu"}
SMALL_ARGS = ["--backbone", "eenet8", "--input-size", "16", "--num-exits", "2", "--placement", "linear",
              "--exit-type", "plain", "--device", "cpu"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


def train_small(tmp: Path, name: str = "model.pt", **overrides) -> Path:
    from edgeexit import workflows
    from edgeexit.train.config import TrainSpec

    out = tmp / name
    workflows.train(TrainSpec(**{**SMALL, **overrides}), str(out), progress=False)
    return out


def weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"weights differ: {different[:3]}"


# --- device and precision ------------------------------------------------------------------

def test_device_resolution_and_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA device"):
            resolve_device("cuda:1")
    if not torch.backends.mps.is_available():
        with pytest.raises(DeviceError, match="no Apple MPS"):
            resolve_device("mps")


def test_precision_choices_and_errors():
    assert get_precision("bf16").autocast_dtype == torch.bfloat16
    assert get_precision("16-mixed").scaled and not get_precision("bf16").scaled
    with pytest.raises(ConfigError, match="unknown precision 'fp8'; choose from: 32, bf16, 16-mixed"):
        get_precision("fp8")
    with pytest.raises(ConfigError, match="16-mixed needs a GPU"):
        with training_env("cpu", "16-mixed"):
            pass


@pytest.mark.parametrize("args, code, message", [
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], 5, "--device cuda"),
    (["--precision", "fp8"], 2, "unknown precision 'fp8'"),
    (["--device", "cpu", "--precision", "16-mixed"], 2, "16-mixed needs a GPU"),
    (["--resume"], 2, "--resume needs --checkpoint-dir"),
    (["--workers", "-1"], 2, "--workers must be >= 0"),
])
def test_cli_bad_device_precision_one_line(tmp_path, args, code, message):
    result = CliRunner().invoke(main, ["train", "--epochs", "1", "--out", str(tmp_path / "m.pt"), *args])
    assert result.exit_code == code, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.pt").exists()


def test_bf16_trains_on_cpu_and_exports_float32(tmp_path):
    from edgeexit.export import export_bundle
    from edgeexit.runtime.verify import verify_bundle

    path = train_small(tmp_path, precision="bf16", epochs=4)  # warm-up + v4 epochs: 2 are not enough to learn here
    state = weights(path)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    history = read_checkpoint(path)["extra"]["history"]
    assert history["val_accuracy"][history["best_epoch"]] > 0.5  # the kept epoch learned in bf16
    export_bundle(path, tmp_path / "bundle")
    assert not any(check.failed for check in verify_bundle(tmp_path / "bundle"))


@needs_cuda
@pytest.mark.parametrize("precision", ["32", "16-mixed", "bf16"])
def test_cuda_training_exports_like_cpu(tmp_path, precision):
    from edgeexit.export import export_bundle

    path = train_small(tmp_path, device="cuda", precision=precision, epochs=2)
    assert all(v.device.type == "cpu" for v in weights(path).values())
    export_bundle(path, tmp_path / "bundle")  # verified against PyTorch on the CPU


@needs_cuda
def test_cuda_eager_baseline(tiny_model_path):
    import numpy as np

    from edgeexit.train.eager import eager_predictor

    x = np.random.default_rng(0).standard_normal((4, 1, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(eager_predictor(tiny_model_path, device="cuda")(x), eager_predictor(tiny_model_path)(x),
                               atol=1e-3)


# --- checkpoint and resume -------------------------------------------------------------------

RESUME_EPOCHS = 3


class Stop(Exception):
    """Injected after the epoch-2 checkpoint (past the warm-up, so the best slot is filled): the run dies there."""


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """(uninterrupted model.pt, resumed model.pt, checkpoint dir): one 3-epoch run stopped after epoch 2, then resumed."""
    root = tmp_path_factory.mktemp("resume")
    full = train_small(root, "full.pt", epochs=RESUME_EPOCHS)
    real_save = trainer.save_checkpoint

    def save_then_die(directory, checkpoint):
        real_save(directory, checkpoint)
        if checkpoint.epoch == 2:
            assert checkpoint.best["model"].keys() == checkpoint.model.keys()
            raise Stop

    trainer.save_checkpoint = save_then_die
    try:
        with pytest.raises(Stop):
            train_small(root, "resumed.pt", checkpoint_dir=str(root / "ck"), epochs=RESUME_EPOCHS)
    finally:
        trainer.save_checkpoint = real_save
    assert not (root / "resumed.pt").exists()
    train_small(root, "resumed.pt", checkpoint_dir=str(root / "ck"), resume=True, epochs=RESUME_EPOCHS)
    return full, root / "resumed.pt", root / "ck"


def test_resume_reaches_the_uninterrupted_weights_bitwise(resumed):
    full, again, ck = resumed
    assert_same_weights(full, again)
    assert read_checkpoint(full)["extra"]["history"] == read_checkpoint(again)["extra"]["history"]
    assert torch.load(ck / CHECKPOINT_FILE, weights_only=True)["epoch"] == RESUME_EPOCHS


@pytest.mark.parametrize("change, message", [
    ({"num_exits": 1}, "was written for another model (cuts"),
    ({"lr": 0.01}, ", lr 0.003 vs 0.01); resume with the same ones"),  # head_lr (a third of lr) named first
])
def test_resume_refuses_another_model_or_settings(tmp_path, resumed, change, message):
    import shutil

    ck = Path(shutil.copytree(resumed[2], tmp_path / "ck"))
    before = (ck / CHECKPOINT_FILE).read_bytes()
    with pytest.raises(InputError, match=re.escape(message)):
        train_small(tmp_path, checkpoint_dir=str(ck), resume=True, epochs=RESUME_EPOCHS, **change)
    assert (ck / CHECKPOINT_FILE).read_bytes() == before and not (tmp_path / "model.pt").exists()


@pytest.mark.parametrize("junk", [b"not a checkpoint", None])
def test_cli_corrupted_checkpoint_one_line_nothing_overwritten(tmp_path, resumed, junk):
    ck = tmp_path / "ck"
    ck.mkdir()
    good = (resumed[2] / CHECKPOINT_FILE).read_bytes()
    data = junk if junk is not None else good[: len(good) // 2]  # truncated mid-write by something else
    (ck / CHECKPOINT_FILE).write_bytes(data)
    (tmp_path / "model.pt").write_bytes(b"previous model")
    result = CliRunner().invoke(main, ["train", *SMALL_ARGS, "--epochs", "2", "--checkpoint-dir", str(ck), "--resume",
                                       "--out", str(tmp_path / "model.pt")])
    assert result.exit_code == InputError.exit_code, result.output
    assert "refusing to load" in result.output and len(result.output.strip().splitlines()) == 1
    assert (ck / CHECKPOINT_FILE).read_bytes() == data
    assert (tmp_path / "model.pt").read_bytes() == b"previous model"


def test_checkpoint_with_code_is_refused(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    torch.save({"format": "edgeexit-train-checkpoint", "payload": TrainEnv(torch.device("cpu"), get_precision("32"))},
               ck / CHECKPOINT_FILE)
    with pytest.raises(InputError, match="safe weights-only loader rejected it"):
        train_small(tmp_path, checkpoint_dir=str(ck), resume=True)


def test_checkpoint_keeps_module_versions(tmp_path):
    """A resumed run loads the state_dicts' per-module versions too (torchvision's MNASNet refuses weights without)."""
    from edgeexit.train.checkpoints import Checkpoint, load_checkpoint, save_checkpoint

    state = torch.nn.BatchNorm2d(2).state_dict()  # its `_metadata` holds BatchNorm's version
    save_checkpoint(tmp_path, Checkpoint(model_config={"m": 1}, run={"r": 2}, epoch=1, model=state, optimizer={},
                                         scheduler={}, scaler={}, rng={}, best={"loss": 0.5, "model": state}))
    loaded = load_checkpoint(tmp_path, {"m": 1}, {"r": 2})
    assert loaded.model._metadata == loaded.best["model"]._metadata == {"": {"version": 2}}
    assert all(torch.equal(loaded.model[k], v) for k, v in state.items())


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgeexit", "train", *SMALL_ARGS, *args]


@pytest.mark.slow
def test_sigkill_after_epoch_one_then_resume_matches(tmp_path):
    """A real kill: SIGKILL the process once its first checkpoint appears, resume, compare."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli("--epochs", "4", "--out", str(tmp_path / "full.pt")), check=True, env=env, capture_output=True)
    ck = tmp_path / "ck"
    proc = subprocess.Popen(_cli("--epochs", "4", "--checkpoint-dir", str(ck), "--out", str(tmp_path / "killed.pt")),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (ck / CHECKPOINT_FILE).exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert torch.load(ck / CHECKPOINT_FILE, weights_only=True)["epoch"] < 4
    done = subprocess.run(_cli("--epochs", "4", "--checkpoint-dir", str(ck), "--resume", "--out", str(tmp_path / "killed.pt")),
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stdout + done.stderr  # tqdm.write goes to stdout
    assert_same_weights(tmp_path / "full.pt", tmp_path / "killed.pt")


# --- DistributedDataParallel -----------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_frozen_backbone_stays_out_of_ddp_buckets():
    import torch.distributed as dist

    from edgeexit.train.config import ModelConfig
    from edgeexit.train.models import EarlyExitModel

    config = ModelConfig(backbone="eenet8", exit_type="plain", cuts=["block1"], input_shape=(1, 16, 16),
                         frozen_backbone=True)
    model = EarlyExitModel(config)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        wrapped = TrainEnv(torch.device("cpu"), get_precision("32"), rank=0, world_size=2).wrap(model, frozen=("backbone",))
        reduced = {id(p) for p in wrapped._module_parameters}
    finally:
        dist.destroy_process_group()
    assert reduced == {id(p) for p in model.exits.parameters()}
    assert all(name.startswith("backbone.") for name in wrapped.parameters_to_ignore)


@pytest.mark.slow
def test_torchrun_two_processes_gloo_train_export_verify(tmp_path):
    """`torchrun --nproc_per_node 2 -m edgeexit train` on CPU: gloo, rank 0 alone writes and prints; the model exports."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "edgeexit", "train", *SMALL_ARGS, "--epochs", "2",
               "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(tmp_path / "model.pt")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("wrote ") == 1
    data = read_checkpoint(tmp_path / "model.pt")
    assert data["extra"]["world_size"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "model.pt"]
    result = CliRunner().invoke(main, ["export", str(tmp_path / "model.pt"), str(tmp_path / "bundle")])
    assert result.exit_code == 0, result.output
    assert CliRunner().invoke(main, ["verify", str(tmp_path / "bundle")]).exit_code == 0
