"""Shared fixtures: tiny models and bundles trained once per session so the suite stays fast."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

TINY = {"backbone": "resnet8", "input_size": 16, "epochs": 3, "num_exits": 2, "placement": "linear", "exit_type": "plain"}


def tiny_train(tmp: Path, **overrides) -> Path:
    """Train a tiny model on digits (a few seconds) and return its model.pt path."""
    from edgeexit import workflows
    from edgeexit.train.config import TrainSpec

    out = tmp / "model.pt"
    workflows.train(TrainSpec(**{**TINY, **overrides}), str(out), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A resnet8 EENets model (plain exits, v2 loss) on 16x16 digits."""
    return tiny_train(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_model_path) -> Path:
    """The tiny model exported (and verified) to a bundle."""
    from edgeexit.export import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "bundle"
    export_bundle(tiny_model_path, out)
    return out


@pytest.fixture(scope="session")
def digits_test(tiny_bundle) -> tuple[np.ndarray, np.ndarray]:
    """The digits test split, normalized for the tiny bundle."""
    from edgeexit.runtime.datasets import load_eval_data
    from edgeexit.runtime.manifest import load_manifest

    return load_eval_data("digits", "test", load_manifest(tiny_bundle).input_spec)


@pytest.fixture(scope="session")
def handmade_bundles(tmp_path_factory) -> dict[str, Path]:
    """One hand-made bundle per exit policy (known scores, no training; see handmade.py), all stages taking inputs."""
    import handmade

    root = tmp_path_factory.mktemp("handmade")
    return {kind: handmade.write_bundle(root / kind, kind=kind, threshold=threshold, args=args)
            for kind, (threshold, args) in handmade.POLICY_DEFAULTS.items()}


@pytest.fixture
def bundle_copy(tmp_path, tiny_bundle) -> Path:
    """A private copy of the tiny bundle that a test may tamper with."""
    import shutil

    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


@pytest.fixture
def fake_torchvision(monkeypatch):
    """Swap a torchvision data set class for a tiny in-memory one (20 images); returns its constructor calls."""
    import torchvision.datasets as tvd
    from torchvision.datasets import FakeData

    from edgeexit.runtime.datasets import DATASETS

    def install(name: str) -> list:
        cls_name, channels, size, _, _ = DATASETS.get(name).torchvision
        calls = []

        class Tiny(FakeData):
            classes = [str(i) for i in range(10)]

            def __init__(self, root, train=None, split=None, transform=None, download=False):
                calls.append((root, train, split, download))
                super().__init__(size=20, image_size=(channels, size, size), num_classes=10, transform=None)
                self._mode, self._transform = ("L" if channels == 1 else "RGB"), transform

            def __getitem__(self, index):
                image, label = super().__getitem__(index)
                return self._transform(image.convert(self._mode)), int(label)

        monkeypatch.setattr(tvd, cls_name, Tiny)
        return calls

    return install


def _hypothesis_profiles() -> None:
    """CI runs the fuzz tests derandomized (the same cases every run: a failure there is never luck);
    elsewhere hypothesis explores new cases each run. HYPOTHESIS_PROFILE=ci|explore picks one by hand."""
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
    settings.register_profile("explore", derandomize=False)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "explore"))


_hypothesis_profiles()
