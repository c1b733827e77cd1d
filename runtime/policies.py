"""Exit policies: pure numpy rules that decide, from an exit's outputs, which inputs leave.

Each policy is one entry in POLICIES. A policy may carry per-input state from stage to
stage (the class mask of class exclusion); the cascade keeps that state aligned with the
surviving inputs by indexing it like the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from edgeexit.errors import BundleError, ConfigError
from edgeexit.registry import Registry

if TYPE_CHECKING:  # the manifest builds policies, so it imports this module
    from edgeexit.runtime.manifest import StageSpec


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    expo = np.exp(shifted)
    return expo / expo.sum(axis=1, keepdims=True)


def check_range(label: str, value: object, bounds: tuple[float, float]) -> float:
    """`value` as float, or ConfigError naming `label` if it is not a number within `bounds`."""
    low, high = bounds
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{label} must be a number, got {value!r}") from None
    if not (low <= number <= high):
        raise ConfigError(f"{label} must be in [{low}, {high}], got {number}")
    return number


def check_temperature(value: object) -> float:
    """A temperature as float, or ConfigError unless it is a finite number > 0."""
    number = check_range("temperature", value, (0.0, math.inf))
    if not (0.0 < number < math.inf):
        raise ConfigError(f"temperature must be a finite number > 0, got {number}")
    return number


@dataclass
class Policy:
    """Base policy: `decide` returns (exits, predictions, state) for one exit's outputs.

    `temperature` (> 0) divides an exit's class logits before any softmax the policy takes
    (temperature scaling, fitted per exit by `edgeexit calibrate`); 1 leaves them as trained.
    """

    threshold: float
    args: dict = field(default_factory=dict)
    temperature: float = 1.0

    name: ClassVar[str] = ""
    default_threshold: ClassVar[float] = 0.5  # used when a bundle is run with a policy other than its own
    roles: ClassVar[tuple[str, ...]] = ("logits",)
    per_class_roles: ClassVar[tuple[str, ...]] = ("logits",)  # outputs that must be [batch, num_classes]
    arg_names: ClassVar[tuple[str, ...]] = ()
    threshold_range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    # thresholds that send every input out / keep every input (profiling cascade.onnx, whose exits are forced
    # through its thresholds input); None: the policy has no such pair (stateful class exclusion)
    forcing: ClassVar[tuple[float, float] | None] = (0.0, 1.0)

    def __post_init__(self) -> None:
        self.threshold = self.check_threshold(self.threshold)
        self.temperature = check_temperature(self.temperature)
        self.check_args()

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Softmax of the exit's logits at this policy's temperature."""
        return softmax(logits.astype(np.float64) / self.temperature)

    @classmethod
    def check_threshold(cls, value: float) -> float:
        """Return the threshold as float or raise ConfigError if it is outside the valid range."""
        return check_range(f"{cls.name} threshold", value, cls.threshold_range)

    @classmethod
    def check_outputs(cls, stage: StageSpec, num_classes: int) -> None:
        """BundleError unless each per-class exit output of a manifest stage is [batch, num_classes]."""
        shapes = {tensor.name: tensor.shape for tensor in stage.outputs}
        for role in cls.per_class_roles:
            name = stage.exit.outputs[role]
            if shapes[name][1:] != (num_classes,):
                raise BundleError(
                    f"{stage.file}: exit output '{name}' has shape {list(shapes[name])}, "
                    f"expected [batch, {num_classes}] (one {role} score per class)"
                )

    def check_args(self) -> None:
        """Refuse arguments this policy does not take (e.g. --beta on a confidence bundle)."""
        unknown = sorted(set(self.args) - set(self.arg_names))
        if unknown:
            takes = f"; it takes: {', '.join(self.arg_names)}" if self.arg_names else ""
            raise ConfigError(f"exit policy '{self.name}' takes no argument '{unknown[0]}'{takes}")

    def start(self, n: int, num_classes: int) -> np.ndarray | None:
        """Per-input state at the first stage (None for stateless policies)."""
        return None

    def scores(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """The per-input number compared with the threshold (in score space, see `cutoff`)."""
        raise NotImplementedError

    def cutoff(self) -> float:
        """The threshold mapped into score space (identity unless the score is a transform of it)."""
        return self.threshold

    @classmethod
    def threshold_of(cls, scores: np.ndarray) -> np.ndarray:
        """Inverse of `cutoff`: the thresholds whose cutoffs are these scores (for calibration grids)."""
        return scores

    def decide(self, outputs: dict[str, np.ndarray], state: np.ndarray | None):
        """Which inputs exit here, their predictions, and the state passed on."""
        exits = self.scores(outputs) >= self.cutoff()
        return exits, outputs["logits"].argmax(axis=1), state

    def final(self, logits: np.ndarray, state: np.ndarray | None) -> np.ndarray:
        """Predictions at the final stage for inputs that never exited."""
        return logits.argmax(axis=1)


def logit(p: float) -> float:
    """log(p / (1 - p)) in float64: -inf at 0, +inf at 1."""
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p) - math.log1p(-p)


@dataclass
class ConfidencePolicy(Policy):
    """EENets / PTEENet: exit when the learned confidence sigmoid(z) >= T, decided as z >= logit(T).

    The exit outputs the confidence logit z (role "confidence_logit"); T in [0, 1] is mapped to
    logit(T) in float64 and compared there, which is `sigmoid(z) >= T` in exact arithmetic but
    never ties two inputs whose float32 sigmoids both round to 1.0 (z = 150 and z = 200 keep
    their order). `>=` as in the other score policies: T = 0 lets every input exit (z >= -inf),
    T = 1 none (no finite z reaches +inf; a NaN z never exits either).
    """

    name: ClassVar[str] = "confidence"
    roles: ClassVar[tuple[str, ...]] = ("logits", "confidence_logit")

    def scores(self, outputs):
        return outputs["confidence_logit"].reshape(-1).astype(np.float64)

    def cutoff(self) -> float:
        return logit(self.threshold)

    @classmethod
    def threshold_of(cls, scores):
        return 1.0 / (1.0 + np.exp(-np.asarray(scores, dtype=np.float64)))


@dataclass
class MaxSoftmaxPolicy(Policy):
    """SDN-style baseline: exit when the top softmax probability >= T."""

    name: ClassVar[str] = "max_softmax"
    default_threshold: ClassVar[float] = 0.9

    def scores(self, outputs):
        return self.probabilities(outputs["logits"]).max(axis=1)


@dataclass
class EntropyPolicy(Policy):
    """BranchyNet: exit when the softmax entropy (nats) <= T (at most log C; 0 = one-hot)."""

    name: ClassVar[str] = "entropy"
    threshold_range: ClassVar[tuple[float, float]] = (0.0, math.inf)
    forcing: ClassVar[tuple[float, float] | None] = (1e9, 0.0)  # entropy is at most log C; 0 only for one-hot

    def scores(self, outputs):
        probs = self.probabilities(outputs["logits"])
        return -(probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=1)

    def decide(self, outputs, state):
        exits = self.scores(outputs) <= self.threshold
        return exits, outputs["logits"].argmax(axis=1), state


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function in float64 (a float32 sigmoid rounds every logit above ~17 to exactly 1)."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


@dataclass
class ExclusionPolicy(Policy):
    """Class exclusion (Wang, Li, Zhang 2023): drop classes stage by stage, exit when one class is left.

    State: a boolean (N, C) mask of the classes still in play, all True at the start.
    At each exit, with s = sigmoid(exclusion logits) in float64 (high = class still
    plausible) and m = max of s over the classes in play, class c in play is removed when
        s_c <= max(T, beta * m)
    where beta (args["beta"], in [0, 1], set per exit) is the authors' dynamic threshold
    (their code keeps c iff s_c > beta_k * max s) and T (the policy threshold, default 0 =
    off) is an optional static floor of edgeexit's own. (The authors' "CR" baseline, softmax
    heads keeping classes above a fixed T_k, is the max_softmax policy.) The best class in
    play (argmax of s over the mask) is never removed, so the mask never empties; beta = 1
    keeps only it. An input exits when exactly one class remains and is predicted as that
    class; at the final stage the prediction is the final classifier's best class among
    those still in play.
    """

    name: ClassVar[str] = "exclusion"
    roles: ClassVar[tuple[str, ...]] = ("exclusion_logits",)
    per_class_roles: ClassVar[tuple[str, ...]] = ("exclusion_logits",)
    arg_names: ClassVar[tuple[str, ...]] = ("beta",)
    default_threshold: ClassVar[float] = 0.0
    forcing: ClassVar[tuple[float, float] | None] = None
    beta_range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    # In the authors' tuned range (their searched beta_k run 0.01-0.31 on VGG/AlexNet/ResNet-50).
    default_beta: ClassVar[float] = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        self.args = {**self.args, "beta": check_range("beta", self.args.get("beta", self.default_beta), self.beta_range)}

    def start(self, n, num_classes):
        return np.ones((n, num_classes), dtype=bool)

    def decide(self, outputs, state):
        scores = sigmoid(outputs["exclusion_logits"])
        in_play = np.where(state, scores, -np.inf)
        best = in_play.argmax(axis=1)
        cut = np.maximum(self.threshold, self.args["beta"] * in_play.max(axis=1))
        mask = state & (scores > cut[:, None])
        mask[np.arange(len(best)), best] = True
        return mask.sum(axis=1) == 1, best, mask

    def final(self, logits, state):
        return logits.argmax(axis=1) if state is None else np.where(state, logits, -np.inf).argmax(axis=1)


def per_exit_args(args: dict, index: int, num_exits: int) -> dict:
    """Policy args for exit `index` of `num_exits`: a list value holds one value per exit, a scalar is shared."""
    resolved = {}
    for name, value in args.items():
        if isinstance(value, (list, tuple)):
            if len(value) not in (1, num_exits):
                raise ConfigError(f"{name} takes one value or one per exit ({num_exits}), got {len(value)}")
            value = value[index] if len(value) == num_exits else value[0]
        resolved[name] = value
    return resolved


POLICIES: Registry[type[Policy]] = Registry("exit policy")
for _policy in (ConfidencePolicy, MaxSoftmaxPolicy, EntropyPolicy, ExclusionPolicy):
    POLICIES.register(_policy.name, _policy)


SCORE_POLICIES = ("confidence", "max_softmax", "entropy")  # what `calibrate --policy auto` chooses among


def policies_for(roles) -> list[str]:
    """Names of the policies whose needed exit outputs are all among `roles`."""
    return [name for name, cls in POLICIES.items() if set(cls.roles) <= set(roles)]


def get_policy(kind: str) -> type[Policy]:
    """Look up a policy class by name, with an error listing the valid names."""
    return POLICIES.get(kind)
