"""model.pt (or several: a model cascade, each model's stages after the previous model's) -> bundle/: fused stage graphs, full.onnx, cascade.onnx and manifest.json, verified, written atomically
(staged and saved through runtime/bundle.py)."""
from __future__ import annotations

import dataclasses
import os
import platform
from pathlib import Path
from typing import Callable, Sequence

import onnx
import onnxruntime
import torch

from edgeexit import __version__
from edgeexit.export.onnx_graphs import DEFAULT_OPSET, FusedStage, SingleOutput, export_graph, graph_io
from edgeexit.export.cascade_graph import write_cascades
from edgeexit.export.verify import verify_bundle_against_model, verify_cascade
from edgeexit.errors import ConfigError
from edgeexit.train.config import ModelConfig
from edgeexit.train.macs import count_params
from edgeexit.train.models import EarlyExitModel, load_model
from edgeexit.runtime.manifest import (
    BATCH_DIM,
    FULL_NAME,
    ExitSpec,
    FullGraph,
    READS_FEATURES,
    READS_INPUT,
    InputSpec,
    Manifest,
    PolicySpec,
    StageMacs,
    StageSpec,
    TensorSpec,
    stage_file,
)
from edgeexit.runtime.provenance import MemberInfo, ModelInfo, Producer
from edgeexit.runtime.bundle import save_manifest, staged_bundle
from edgeexit.runtime.files import sha256_file
from edgeexit.runtime.policies import get_policy

INPUT_NAME = "input"
CASCADE_METHOD = "cascade"  # the model record's method for a bundle of several models
CASCADE_POLICY = "max_softmax"  # the policy of every exit of a model cascade (calibrate may choose another)


def _features_name(index: int) -> str:
    return f"features_{index}"


def _exit_names(index: int, roles: tuple[str, ...]) -> list[str]:
    return [f"exit_{index}_{role}" for role in roles]


@dataclasses.dataclass(frozen=True)
class Member:
    """One model.pt of the bundle: the rebuilt model and the file's sha256 (several make a model cascade)."""

    model: EarlyExitModel
    path: Path
    sha256: str

    def info(self) -> MemberInfo:
        config = self.model.config
        return MemberInfo(config.backbone, config.method, self.sha256, len(self.model.segments))


# what the members of a model cascade must share (what the bundle's one InputSpec says), named in the error line
AGREEMENT: tuple[tuple[str, Callable[[ModelConfig], object]], ...] = (
    ("input channels", lambda c: c.input_shape[0]),
    ("input shape", lambda c: tuple(c.input_shape)),
    ("mean", lambda c: tuple(c.mean)),
    ("std", lambda c: tuple(c.std)),
    ("number of classes", lambda c: c.num_classes),
    ("class names", lambda c: tuple(c.class_names)),
)


def load_members(paths: Sequence[str | os.PathLike]) -> list[Member]:
    """The models of the bundle in stage order; ConfigError naming the first input property two of them disagree on."""
    members = [Member(load_model(path), Path(path), sha256_file(path)) for path in paths]
    first = members[0]
    for member in members[1:]:
        for what, value in AGREEMENT:
            if value(member.model.config) != value(first.model.config):
                raise ConfigError(f"model.pt files disagree on {what}: {first.path.name} has {value(first.model.config)}, "
                                  f"{member.path.name} has {value(member.model.config)}; a model cascade needs one input")
    for member in members if len(members) > 1 else []:  # a single model keeps its own exit policy
        if any("logits" not in head.outputs for head in member.model.exits):
            raise ConfigError(f"{member.path.name}: a model cascade's exits need class logits ({CASCADE_POLICY}); "
                              f"its {member.model.config.exit_type} exits have none")
    return members


def _cascade_policy() -> PolicySpec:
    """Every exit's policy in a model cascade (one kind on every exit, as calibrate expects): max-softmax, which
    reads the class logits that every exit, a whole model's classifier included, has."""
    return PolicySpec(CASCADE_POLICY, get_policy(CASCADE_POLICY).default_threshold)


def write_graphs(members: Sequence[EarlyExitModel], folder: Path, opset: int,
                 progress: Callable[[str], None]) -> tuple[tuple[StageSpec, ...], FullGraph]:
    """Export every stage and full.onnx into `folder`; return their manifest records.

    Each model's stages follow the previous model's: its first stage reads the input, the others the features
    before them; a model that is not the last ends in an exit (its classifier). full.onnx is the last model."""
    stages = []
    cumulative = 0
    for number, model in enumerate(members):
        config = model.config
        last_model = number == len(members) - 1
        example = torch.zeros(2, *config.input_shape)
        previous = TensorSpec(INPUT_NAME, (BATCH_DIM, *config.input_shape))
        heads = list(model.exits)
        for position, (segment, (segment_macs, head_macs)) in enumerate(zip(model.segments, model.stage_macs())):
            index = len(stages)
            ends = position == len(model.segments) - 1
            if ends and last_model:
                module, outputs, exit_spec = SingleOutput(segment), ["logits"], None
            elif ends:
                module, outputs = SingleOutput(segment), _exit_names(index, ("logits",))
                exit_spec = ExitSpec({"logits": outputs[0]}, _cascade_policy(), f"{config.backbone} logits")
            else:
                head = heads[position]
                roles = tuple(head.outputs)
                module = FusedStage(segment, head)
                outputs = [_features_name(index), *_exit_names(index, roles)]
                policy = config.exit_policy(position) if len(members) == 1 else _cascade_policy()
                exit_spec = ExitSpec(dict(zip(roles, outputs[1:])), policy, config.cuts[position])
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
                reads=READS_INPUT if position == 0 else READS_FEATURES,
            ))
            if not ends:
                with torch.no_grad():
                    example = segment.eval()(example)
                previous = outs[0]
    model = members[-1]
    progress(f"exporting {FULL_NAME}")
    export_graph(SingleOutput(model.backbone), torch.zeros(2, *model.config.input_shape), folder / FULL_NAME, INPUT_NAME, ["logits"], opset)
    full = FullGraph(sha256_file(folder / FULL_NAME), model.cut_graph.full_macs, count_params(model.backbone))
    return tuple(stages), full


def model_info(members: Sequence[Member]) -> ModelInfo:
    """The manifest's model record: the model's own, or for a model cascade "cascade" with every member's."""
    configs = [member.model.config for member in members]
    if len(members) == 1:
        config = configs[0]
        return ModelInfo(config.method, config.backbone, config.exit_type, tuple(config.cuts), (members[0].info(),))
    exit_types = ",".join(dict.fromkeys(c.exit_type for c in configs if c.cuts)) or "none"
    return ModelInfo(CASCADE_METHOD, "+".join(c.backbone for c in configs), exit_types,
                     tuple(cut for c in configs for cut in c.cuts), tuple(member.info() for member in members))


def build_manifest(members: Sequence[Member], folder: Path, stages: tuple[StageSpec, ...], full: FullGraph, opset: int) -> Manifest:
    """The manifest records of the exported model(s)."""
    config = members[0].model.config
    return Manifest(
        root=folder,
        producer=Producer(__version__, opset, torch.__version__, onnx.__version__, onnxruntime.__version__, platform.machine()),
        model=model_info(members),
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
    model_path: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    progress: Callable[[str], None] = lambda message: None,
) -> ExportResult:
    """Export model.pt (or several, smallest first: a model cascade) to a verified bundle folder; returns its records
    and the parity checks' differences.

    Graphs are written into a hidden temp folder beside `out` and renamed into place only after
    verification, so a failed or killed export leaves any earlier bundle at `out` intact.
    """
    paths = [model_path] if isinstance(model_path, (str, os.PathLike)) else list(model_path)
    members = load_members(paths)
    models = [member.model for member in members]
    with staged_bundle(out, progress) as staged:
        stages, full = write_graphs(models, staged, opset, progress)
        manifest = save_manifest(staged, build_manifest(members, staged, stages, full, opset))
        if manifest.exits:
            progress("building cascade.onnx and cascade_b1.onnx")
            manifest = save_manifest(staged, write_cascades(manifest))
        verification = cascade_verification = None
        if verify:
            progress("verifying against PyTorch")
            verification = verify_bundle_against_model(staged, models)
            if manifest.cascades:
                progress("verifying cascade.onnx and cascade_b1.onnx against the stage chain")
                cascade_verification = verify_cascade(staged, models[0])
    return ExportResult(dataclasses.replace(manifest, root=Path(out).resolve()), verification, cascade_verification)
