"""Hand-made bundles whose exit scores are known: every score a stage outputs is a column of the input.

An input sample is a packed row of numbers (shape (D, 1, 1)): per early exit k, C class logits, one
confidence logit and C exclusion logits; then the final stage's C logits. Each stage graph passes
its input on unchanged as its features and picks its own columns with a 0/1 MatMul (exact in
float32), so a test chooses every exit's scores by writing them into the input, and the bundle
needs no training. The manifest is a valid one written through the runtime's own schema check.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASSES = 4
EXITS = 2
ROLES = ("logits", "confidence", "exclusion")  # the columns of one exit (see Layout)
OPSET = 17
IR_VERSION = 8  # what every supported onnxruntime reads
# cumulative MACs of leaving at exit 0, exit 1, the final stage (full.onnx costs FULL_MACS)
CUMULATIVE = (30, 60, 100)
FULL_MACS = 100
# per policy: a threshold and arguments at which every stage of `synthetic_scores` takes a share of the inputs
POLICY_DEFAULTS: dict[str, tuple[float, dict]] = {
    "confidence": (0.5, {}),
    "max_softmax": (0.7, {}),
    "entropy": (0.6, {}),
    "exclusion": (0.0, {"beta": 0.5}),
}


@dataclass(frozen=True)
class Layout:
    """Where each exit's scores sit in the packed input row."""

    exits: int = EXITS
    classes: int = CLASSES

    @property
    def per_exit(self) -> int:
        return 2 * self.classes + 1

    @property
    def width(self) -> int:
        return self.exits * self.per_exit + self.classes

    def columns(self, k: int, role: str) -> slice:
        """Columns of exit k's `role` (k == exits: the final logits)."""
        if k == self.exits:
            start = self.exits * self.per_exit
            return slice(start, start + self.classes)
        base = k * self.per_exit
        return {
            "logits": slice(base, base + self.classes),
            "confidence": slice(base + self.classes, base + self.classes + 1),
            "exclusion": slice(base + self.classes + 1, base + self.per_exit),
        }[role]


def confidence_output() -> tuple[str, bool]:
    """The output role the runtime's confidence policy reads, and whether it holds the logit z (no sigmoid)
    rather than the probability sigmoid(z): bundles are written the way the installed runtime reads them."""
    from edgeexit.runtime.policies import get_policy

    roles = get_policy("confidence").roles
    return ("confidence_logit", True) if "confidence_logit" in roles else ("confidence", False)


def output_role(column: str) -> str:
    """The manifest role name of an exit column (the exclusion column holds the exclusion logits)."""
    return {"confidence": confidence_output()[0], "exclusion": "exclusion_logits"}.get(column, column)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def pack(layout: Layout, exits: list[dict[str, np.ndarray]], final_logits: np.ndarray) -> np.ndarray:
    """Rows of known scores -> model-ready float32 (N, D, 1, 1); `exits[k][role]` are pre-activation values."""
    n = len(final_logits)
    x = np.zeros((n, layout.width), dtype=np.float32)
    for k, scores in enumerate(exits):
        for role in ROLES:
            x[:, layout.columns(k, role)] = np.asarray(scores[role]).reshape(n, -1)
    x[:, layout.columns(layout.exits, "logits")] = final_logits
    return x[:, :, None, None]


def runtime_outputs(layout: Layout, x: np.ndarray) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """The exit outputs as the runtime receives them from a bundle of `write_bundle` (role names, float32)."""
    exits, final = unpack(layout, x)
    flat = x.reshape(len(x), -1)
    logit_confidence = confidence_output()[1]
    outputs = []
    for k, scores in enumerate(exits):
        confidence = flat[:, layout.columns(k, "confidence")] if logit_confidence else scores["confidence"]
        outputs.append({"logits": scores["logits"].astype(np.float32), output_role("confidence"): confidence.astype(np.float32),
                        "exclusion_logits": flat[:, layout.columns(k, "exclusion")].astype(np.float32)})
    return outputs, final.astype(np.float32)


def unpack(layout: Layout, x: np.ndarray) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """The exit scores in x in float64: class logits, confidence probability sigmoid(z), exclusion sigmoids; final logits."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    exits = []
    for k in range(layout.exits):
        exits.append({
            "logits": flat[:, layout.columns(k, "logits")],
            "confidence": sigmoid(flat[:, layout.columns(k, "confidence")]),
            "exclusion": sigmoid(flat[:, layout.columns(k, "exclusion")]),
        })
    return exits, flat[:, layout.columns(layout.exits, "logits")]


def synthetic_scores(n: int = 240, layout: Layout = Layout(), seed: int = 0):
    """Seeded scores where each exit is right more often than chance and confidences spread across (0, 1).

    Returns (packed inputs, labels). Peaked logits are more often right, so max-softmax and entropy
    thresholds trade accuracy for cost as they should; exclusion logits keep the true class above
    the others more often at later exits.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, layout.classes, n)
    onehot = np.eye(layout.classes)[labels]
    exits = []
    for k in range(layout.exits):
        right = rng.random(n) < 0.6 + 0.15 * k
        guess = np.where(right, labels, rng.integers(0, layout.classes, n))
        peak = rng.uniform(0.0, 6.0, n)[:, None]
        logits = np.eye(layout.classes)[guess] * peak + rng.normal(0, 0.7, (n, layout.classes))
        confidence = rng.normal(0.0, 2.0, (n, 1)) + np.where(right, 0.7, -0.7)[:, None]
        exclusion = rng.normal(-0.5, 1.6, (n, layout.classes)) + onehot * (1.0 + k)
        exits.append({"logits": logits, "confidence": confidence, "exclusion": exclusion})
    final = onehot * 3.0 + rng.normal(0, 1.0, (n, layout.classes))
    return pack(layout, exits, final), labels


def _selection(layout: Layout, cols: slice) -> np.ndarray:
    matrix = np.zeros((layout.width, cols.stop - cols.start), dtype=np.float32)
    matrix[np.arange(cols.start, cols.stop), np.arange(cols.stop - cols.start)] = 1.0
    return matrix


def _graph(layout: Layout, k: int, in_name: str, outputs: list[tuple[str, str | None, list]], name: str):
    """One stage graph: Flatten the input, pick columns per output, Sigmoid where asked."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Flatten", [in_name], ["flat"], axis=1)]
    inits, outs = [], []
    for out_name, column, shape in outputs:
        if column is None:  # the features: the input passed on unchanged
            nodes.append(helper.make_node("Identity", [in_name], [out_name]))
        else:
            inits.append(numpy_helper.from_array(_selection(layout, layout.columns(k, column)), f"pick_{out_name}"))
            raw = column in ("logits", "exclusion") or (column == "confidence" and confidence_output()[1])
            target = out_name if raw else f"{out_name}_pre"
            nodes.append(helper.make_node("MatMul", ["flat", f"pick_{out_name}"], [target]))
            if not raw:
                nodes.append(helper.make_node("Sigmoid", [target], [out_name]))
        outs.append(helper.make_tensor_value_info(out_name, TensorProto.FLOAT, shape))
    inputs = [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, ["batch", layout.width, 1, 1])]
    model = helper.make_model(helper.make_graph(nodes, name, inputs, outs, inits),
                              opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgeexit-tests")
    model.ir_version = IR_VERSION
    return model


def write_bundle(root: Path, layout: Layout = Layout(), roles: tuple[str, ...] = ROLES, kind: str = "confidence",
                 threshold: float = 0.5, args: dict | None = None) -> Path:
    """Write a valid bundle (stage graphs, full.onnx, manifest) into `root`; returns root."""
    import onnx

    from edgeexit.runtime.manifest import FORMAT, FORMAT_VERSION, FULL_NAME, stage_file
    from edgeexit.runtime.bundle import save_manifest
    from edgeexit.runtime.files import sha256_file

    root.mkdir(parents=True, exist_ok=True)
    features_shape = ["batch", layout.width, 1, 1]
    stages, in_name = [], "input"
    for k in range(layout.exits + 1):
        final = k == layout.exits
        if final:
            outputs = [("logits", "logits", ["batch", layout.classes])]
        else:
            shapes = {"logits": ["batch", layout.classes], "confidence": ["batch", 1], "exclusion": ["batch", layout.classes]}
            outputs = [(f"features_{k}", None, features_shape)] + [(f"exit_{k}_{output_role(r)}", r, shapes[r]) for r in roles]
        model = _graph(layout, k, in_name, outputs, f"stage_{k}")
        onnx.save(model, root / stage_file(k))
        previous = CUMULATIVE[k - 1] if k else 0
        stages.append({
            "index": k,
            "file": stage_file(k),
            "sha256": sha256_file(root / stage_file(k)),
            "inputs": [{"name": in_name, "shape": features_shape}],
            "outputs": [{"name": name, "shape": shape} for name, _, shape in outputs],
            "macs": {"segment": CUMULATIVE[k] - previous - (0 if final else 5), "head": 0 if final else 5,
                     "cumulative": CUMULATIVE[k]},
            "params": 0,
            "exit": None if final else {
                "outputs": {output_role(r): f"exit_{k}_{output_role(r)}" for r in roles},
                "policy": {"kind": kind, "threshold": threshold, "args": dict(args or {})},
                "cut": f"hand.{k}",
            },
        })
        in_name = outputs[0][0]
    onnx.save(_graph(layout, layout.exits, "input", [("logits", "logits", ["batch", layout.classes])], "full"), root / FULL_NAME)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "producer": {"edgeexit": "tests", "opset": OPSET},
        "model": {"method": "handmade", "backbone": "columns", "exit_type": "columns", "cuts": [f"hand.{k}" for k in range(layout.exits)]},
        "num_classes": layout.classes,
        "input": {"name": "input", "shape": features_shape, "dtype": "float32", "layout": "NCHW",
                  "mean": [0.0] * layout.width, "std": [1.0] * layout.width,
                  "class_names": [f"c{i}" for i in range(layout.classes)]},
        "full": {"file": FULL_NAME, "sha256": sha256_file(root / FULL_NAME), "macs": FULL_MACS, "params": 0},
        "stages": stages,
        "calibration": None,
    }
    save_manifest(root, manifest)
    return root


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def reference_cascade(kind: str, thresholds, args: dict, exits: list[dict[str, np.ndarray]], final: np.ndarray):
    """The cascade written out input by input from stored exit outputs, without onnxruntime or the runtime's policies.

    Returns predictions, exit indices and each input's smallest distance between a score and the cut it
    was compared with: inputs closer than a tie margin may fall either side between float32 graphs,
    batch sizes or a float64 reference, so equality checks leave them out."""
    n, last = len(final), len(exits)
    predictions, exit_index, margin = np.empty(n, np.int64), np.full(n, last), np.full(n, np.inf)
    for i in range(n):
        in_play = np.ones(final.shape[1], dtype=bool)
        for k, (out, threshold) in enumerate(zip(exits, thresholds)):
            if kind == "exclusion":  # sigmoid scores, whichever form the exit outputs
                s = np.asarray(out["exclusion"][i], dtype=np.float64) if "exclusion" in out else sigmoid(out["exclusion_logits"][i])
                best = int(np.argmax(np.where(in_play, s, -np.inf)))
                cut = max(threshold, args["beta"] * s[best])
                others = in_play.copy()
                others[best] = False
                if others.any():
                    margin[i] = min(margin[i], np.abs(s[others] - cut).min(), s[best] - s[others].max())
                in_play = others & (s > cut)
                in_play[best] = True
                leave, guess = in_play.sum() == 1, best
            else:
                if kind == "confidence":  # compared as a probability, whichever form the exit outputs
                    score = float(out["confidence"][i, 0]) if "confidence" in out else float(sigmoid(out["confidence_logit"][i, 0]))
                elif kind == "max_softmax":
                    score = _softmax(out["logits"][i]).max()
                else:
                    p = _softmax(out["logits"][i])
                    score = -(p * np.log(np.clip(p, 1e-12, None))).sum()
                margin[i] = min(margin[i], abs(score - threshold))
                leave = score <= threshold if kind == "entropy" else score >= threshold
                guess = int(np.argmax(out["logits"][i]))
            if leave:
                predictions[i], exit_index[i] = guess, k
                break
        else:
            predictions[i] = int(np.argmax(np.where(in_play, final[i], -np.inf)))
    return predictions, exit_index, margin
