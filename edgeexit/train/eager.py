"""PyTorch eager baseline for `edgeexit bench`: the plain backbone of model.pt as a numpy -> logits callable."""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch

from edgeexit.train.hardware import resolve_device
from edgeexit.train.models import load_model


def eager_predictor(
    model_path: str | os.PathLike, threads: int | None = None, device: str = "cpu"
) -> Callable[[np.ndarray], np.ndarray]:
    """The same computation as full.onnx (backbone, eval mode, no grad) run by PyTorch eager on `device`.

    torch's thread count is process-global, so it is set for each call and restored after.
    On a GPU each call includes the copies in and out (the result is back on the host, so
    the timing covers the finished computation).
    """
    target = resolve_device(device)
    backbone = load_model(model_path).backbone.eval().to(target)
    wanted = threads or torch.get_num_threads()

    def predict(x: np.ndarray) -> np.ndarray:
        previous = torch.get_num_threads()
        torch.set_num_threads(wanted)
        try:
            with torch.inference_mode():
                return backbone(torch.from_numpy(x).to(target)).cpu().numpy()
        finally:
            torch.set_num_threads(previous)

    return predict
