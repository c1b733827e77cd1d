"""PyTorch eager baseline for `edgeexit bench`: the plain backbone of model.pt as a numpy -> logits callable."""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch

from edgeexit.train.models import load_model


def eager_predictor(model_path: str | os.PathLike, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """The same computation as full.onnx (backbone, eval mode, no grad) run by PyTorch eager.

    torch's thread count is process-global, so it is set for each call and restored after.
    """
    backbone = load_model(model_path).backbone.eval()
    wanted = threads or torch.get_num_threads()

    def predict(x: np.ndarray) -> np.ndarray:
        previous = torch.get_num_threads()
        torch.set_num_threads(wanted)
        try:
            with torch.inference_mode():
                return backbone(torch.from_numpy(x)).numpy()
        finally:
            torch.set_num_threads(previous)

    return predict
