"""model.pt -> bundle/: fused stage graphs, full.onnx, cascade.onnx and manifest.json, verified, written atomically
(staged and saved through runtime/bundle.py)."""
from __future__ import annotations

import dataclasses
import os
import platform
from pathlib import Path
from typing import Callable

import onnx
import onnxruntime
import torch

from edgeexit import __version__
from edgeexit.export.onnx_graphs import DEFAULT_OPSET, FusedStage, SingleOutput, export_graph, graph_io
from edgeexit.export.cascade_graph import write_cascades
from edgeexit.export.verify import verify_bundle_against_model, verify_cascade
from edgeexit.train.macs import count_params
from edgeexit.train.models import EarlyExitModel, load_model
from edgeexit.runtime.manifest import (
    BATCH_DIM,
    FULL_NAME,
    ExitSpec,
    FullGraph,
    InputSpec,
    Manifest,
    ModelInfo,
    Producer,
    StageMacs,
    StageSpec,
    TensorSpec,
    stage_file,
)
from edgeexit.runtime.bundle import save_manifest, staged_bundle
from edgeexit.runtime.files import sha256_file

INPUT_NAME = "input"


def _features_name(index: int) -> str:
    return f"features_{index}"


def _exit_names(index: int, roles: tuple[str, ...]) -> list[str]:
    return [f"exit_{index}_{role}" for role in roles]


def write_graphs(model: EarlyExitModel, folder: Path, opset: int,
                 progress: Callable[[str], None]) -> tuple[tuple[StageSpec, ...], FullGraph]:
    """Export every stage and full.onnx into `folder`; return their manifest records."""
    config = model.config
    example = torch.zeros(2, *config.input_shape)
    stages = []
    previous = TensorSpec(INPUT_NAME, (BATCH_DIM, *config.input_shape))
    cumulative = 0
    heads = list(model.exits)
    for index, (segment, (segment_macs, head_macs)) in enumerate(zip(model.segments, model.stage_macs())):
        final = index == len(model.segments) - 1
        if final:
            module, outputs, exit_spec = SingleOutput(segment), ["logits"], None
        else:
            head = heads[index]
            roles = tuple(head.outputs)
            module = FusedStage(segment, head)
            outputs = [_features_name(index), *_exit_names(index, roles)]
            exit_spec = ExitSpec(dict(zip(roles, outputs[1:])), config.exit_policy(index), config.cuts[index])
        progress(f"exporting {stage_file(index)}")
        graph = export_graph(module, example, folder / stage_file(index), previous.name, outputs, opset)
        inputs, outs = graph_io(graph)
        cumulative += segment_macs + head_macs
        stages.append(StageSpec(
            index=index,
            file=stage_file(index),
            sha256=sha256_file(folder / stage_file(index)),
            inputs=inputs,
            outputs=outs,
            macs=StageMacs(segment_macs, head_macs, cumulative),
            params=count_params(module),
            exit=exit_spec,
        ))
        with torch.no_grad():
            example = segment.eval()(example) if not final else example
        if not final:
            previous = outs[0]
    progress(f"exporting {FULL_NAME}")
    export_graph(SingleOutput(model.backbone), torch.zeros(2, *config.input_shape), folder / FULL_NAME, INPUT_NAME, ["logits"], opset)
    full = FullGraph(sha256_file(folder / FULL_NAME), model.cut_graph.full_macs, count_params(model.backbone))
    return tuple(stages), full


def build_manifest(model: EarlyExitModel, folder: Path, stages: tuple[StageSpec, ...], full: FullGraph, opset: int) -> Manifest:
    """The manifest records of an exported model."""
    config = model.config
    return Manifest(
        root=folder,
        producer=Producer(__version__, opset, torch.__version__, onnx.__version__, onnxruntime.__version__, platform.machine()),
        model=ModelInfo(config.method, config.backbone, config.exit_type, tuple(config.cuts)),
        num_classes=config.num_classes,
        input_spec=InputSpec(
            name=INPUT_NAME,
            shape=(BATCH_DIM, *config.input_shape),
            mean=tuple(config.mean),
            std=tuple(config.std),
            class_names=tuple(config.class_names) or tuple(str(i) for i in range(config.num_classes)),
        ),
        full=full,
        stages=stages,
    )


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What `export_bundle` wrote: the manifest records, and the parity checks' max differences (None: not verified).

    `verification`: per check input (random, ...) and output, the max abs diff of the ONNX
    graphs against PyTorch; `cascade_verification`: cascade.onnx's decisions against the chain's.
    """

    manifest: Manifest
    verification: dict | None = None
    cascade_verification: dict | None = None

    @property
    def worst_diff(self) -> float | None:
        """The largest graph-vs-PyTorch difference over every check, None when not verified."""
        if not self.verification:
            return None
        return max(v for kind in self.verification.values() for v in kind.values())


def export_bundle(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    progress: Callable[[str], None] = lambda message: None,
) -> ExportResult:
    """Export model.pt to a verified bundle folder; returns its records and the parity checks' differences.

    Graphs are written into a hidden temp folder beside `out` and renamed into place only after
    verification, so a failed or killed export leaves any earlier bundle at `out` intact.
    """
    model = load_model(model_path)
    with staged_bundle(out, progress) as staged:
        stages, full = write_graphs(model, staged, opset, progress)
        manifest = save_manifest(staged, build_manifest(model, staged, stages, full, opset))
        progress("building cascade.onnx and cascade_b1.onnx")
        manifest = save_manifest(staged, write_cascades(manifest))
        verification = cascade_verification = None
        if verify:
            progress("verifying against PyTorch")
            verification = verify_bundle_against_model(staged, model)
            progress("verifying cascade.onnx and cascade_b1.onnx against the stage chain")
            cascade_verification = verify_cascade(staged, model)
    return ExportResult(dataclasses.replace(manifest, root=Path(out).resolve()), verification, cascade_verification)
