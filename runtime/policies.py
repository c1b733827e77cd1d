"""Exit policies: each policy's numpy rule and its ONNX builder, written side by side in one class.

Every policy is one entry in POLICIES, and an entry is one class holding both halves of each rule
(RULES): `scores`/`graph_scores`, `decide` (or `assess`)/`emit`, `start`/`emit_start`, `final`/`emit_final`, ...
The numpy half runs in the stage chain and the calibration simulator; the ONNX half builds the
policy's ops in cascade.onnx through a GraphOps builder that export/cascade_graph.py passes in, so
this module never imports onnx. Registration refuses a class that defines one half of a rule
without the other (`check_rules`), so the two engines cannot drift apart.

A policy may carry per-input state from stage to stage (the class mask of class exclusion, the
running ensemble of ensembles at deferral); the cascade keeps that state aligned with the
surviving inputs by indexing it like the batch.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar, Protocol, Sequence

import numpy as np

from edgeexit.errors import BundleError, ConfigError
from edgeexit.registry import Registry

if TYPE_CHECKING:  # the manifest builds policies, so it imports this module
    from edgeexit.runtime.manifest import PolicySpec, StageSpec

NO_ENSEMBLE = "none"


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


def check_weight(value: object) -> float:
    """An ensemble weight as float, or ConfigError unless it is a finite number > 0."""
    number = check_range("ensemble weight", value, (0.0, math.inf))
    if not (0.0 < number < math.inf):
        raise ConfigError(f"ensemble weight must be a finite number > 0, got {number}")
    return number


class GraphOps(Protocol):
    """What a policy's ONNX builder may do; export/cascade_graph.py implements it over onnx.

    Tensors are value names. Per-exit inputs (`per_exit`) are float64 [1] slices of cascade.onnx's
    per-exit vectors (GRAPH_INPUTS); a `transform` of the whole vector runs once per call, before the
    stages, on a GraphOps that emits there."""

    def node(self, op: str, inputs: Sequence[str], base: str, **attrs) -> str: ...
    def const(self, base: str, value: np.ndarray) -> str: ...
    def cast(self, x: str, dtype: str) -> str: ...  # dtype: a numpy dtype name (float64, int64, ...)
    def per_exit(self, vector: str, index: int, transform: Callable[["GraphOps", str], str] | None = None) -> str: ...
    def reduce(self, op: str, x: str, base: str) -> str: ...  # over the class axis, keepdims 0
    def argmax(self, x: str) -> str: ...  # over the class axis, the first of equal maxima (as numpy)
    def flat(self, column: str) -> str: ...  # an (n, 1) column as (n,) (the batch-1 graph keeps it (1, 1))


# (numpy half, ONNX half) of every rule: a class that defines one must define the other. A tuple names a half that
# may be written either way: `emit` is the ONNX half of `decide`, which a policy gives directly or through `assess`
RULES = (("scores", "graph_scores"), ("cutoff", "graph_cutoff"), ("compare", "graph_compare"), (("decide", "assess"), "emit"),
         ("start", "emit_start"), ("final", "emit_final"), ("tempered", "graph_tempered"),
         ("probabilities", "graph_probabilities"), ("score_probs", "graph_score_probs"), ("ensembled", "graph_ensembled"),
         ("term", "graph_term"), ("combine", "graph_combine"))


def _owner(cls: type, name: str | tuple[str, ...]) -> type | None:
    """The class in cls's MRO whose body defines `name` (a tuple: the first class defining any of the names)."""
    names = (name,) if isinstance(name, str) else name
    return next((base for base in cls.__mro__ if any(n in vars(base) for n in names)), None)


def check_rules(cls: type) -> type:
    """`cls` unless it defines a rule's numpy half without its ONNX half (or the reverse): ValueError naming it."""
    rank = {base: i for i, base in enumerate(cls.__mro__)}
    for pair in RULES:
        owners = [_owner(cls, half) for half in pair]
        if owners[0] is not owners[1]:
            defined, missing = pair if rank.get(owners[0], len(rank)) < rank.get(owners[1], len(rank)) else pair[::-1]
            defined, missing = (h if isinstance(h, str) else "/".join(h) for h in (defined, missing))
            raise ValueError(f"{cls.__name__} defines {defined} without {missing}: a rule needs its numpy and ONNX halves")
    return cls


def graph_logit(g: GraphOps, t: str) -> str:
    """log(t) - log(1 - t) in float64 (-inf at 0, +inf at 1). `logit` takes log1p(-t), which can differ in the
    last bit; a float32 confidence logit would have to fall between the two to decide otherwise."""
    one_minus = g.node("Sub", [g.const("one", np.array(1.0)), t], "one_minus_t")
    return g.node("Sub", [g.node("Log", [t], "log_t"), g.node("Log", [one_minus], "log_1mt")], "logit_t")


def graph_cumulative(g: GraphOps, weights: str) -> str:
    """The running sums of the exit weights (np.cumsum's sequential order): what exit k's ensemble divides by."""
    return g.node("CumSum", [weights, g.const("axis", np.array(0, dtype=np.int64))], "weight_sum")


def graph_final_total(g: GraphOps, weights: str) -> str:
    """The running sums plus the final stage's weight 1: at the last exit, what the final stage divides by."""
    return g.node("Add", [graph_cumulative(g, weights), g.const("one", np.array(1.0))], "final_weight_sum")


class Ensemble:
    """How stage k combines exits 0..k (Zero Time Waste style): a running total of w_j * term(z_j / T_j) over the exits
    so far (w_j > 0 per exit, 1 for the final stage), combined with the total weight into class probabilities."""

    name: ClassVar[str] = ""

    def term(self, z: np.ndarray) -> np.ndarray:
        """What one exit adds (before its weight), from its tempered float64 logits."""
        raise NotImplementedError

    def graph_term(self, g: GraphOps, z: str) -> str:
        raise NotImplementedError

    def combine(self, total: np.ndarray, weight_sum: float) -> np.ndarray:
        """Class probabilities from the running total and the sum of the weights in it."""
        raise NotImplementedError

    def graph_combine(self, g: GraphOps, total: str, weight_sum: str) -> str:
        raise NotImplementedError


ENSEMBLES: Registry[Ensemble] = Registry("ensemble")


def register_ensemble(cls: type[Ensemble]) -> type[Ensemble]:
    """Register an ensemble rule (both halves of each rule checked) under its name."""
    ENSEMBLES.register(check_rules(cls).name, cls())
    return cls


@register_ensemble
class MeanEnsemble(Ensemble):
    """Arithmetic mean of the probabilities: sum_j w_j softmax(z_j / T_j) / sum_j w_j."""

    name: ClassVar[str] = "mean"

    def term(self, z):
        return softmax(z)

    def graph_term(self, g, z):
        return g.node("Softmax", [z], "probs", axis=1)

    def combine(self, total, weight_sum):
        return total / weight_sum

    def graph_combine(self, g, total, weight_sum):
        return g.node("Div", [total, weight_sum], "mean_probs")


@register_ensemble
class GeometricEnsemble(Ensemble):
    """Weighted geometric mean, renormalized: softmax(sum_j w_j z_j / T_j / sum_j w_j). The log-normalizer of each
    exit's softmax is the same for every class and cancels, so the mean of the tempered logits is enough."""

    name: ClassVar[str] = "geometric"

    def term(self, z):
        return z

    def graph_term(self, g, z):
        return z

    def combine(self, total, weight_sum):
        return softmax(total / weight_sum)

    def graph_combine(self, g, total, weight_sum):
        return g.node("Softmax", [g.node("Div", [total, weight_sum], "mean_logits")], "probs", axis=1)


def ensemble_choices() -> list[str]:
    """What --ensemble takes: none, then every registered ensemble."""
    return [NO_ENSEMBLE, *ENSEMBLES]


@dataclass
class Policy:
    """Base policy: `decide` returns (exits, predictions, state) for one exit's outputs; `emit` builds the same in ONNX.

    `temperature` (> 0) divides an exit's class logits before any softmax the policy takes
    (temperature scaling, fitted per exit by `edgeexit calibrate`); 1 leaves them as trained.
    `ensemble` (a name in ENSEMBLES, or none) makes a policy that reads class probabilities read
    those of exits 0..k combined with `weights` (one per exit so far) instead of exit k's alone.
    """

    threshold: float
    args: dict = field(default_factory=dict)
    temperature: float = 1.0
    ensemble: str = NO_ENSEMBLE
    weights: tuple[float, ...] = ()

    name: ClassVar[str] = ""
    default_threshold: ClassVar[float] = 0.5  # used when a bundle is run with a policy other than its own
    roles: ClassVar[tuple[str, ...]] = ("logits",)
    per_class_roles: ClassVar[tuple[str, ...]] = ("logits",)  # outputs that must be [batch, num_classes]
    arg_names: ClassVar[tuple[str, ...]] = ()
    threshold_range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    exits_below: ClassVar[bool] = False  # an input leaves when its score is <= the cutoff (else >=)
    reads_probabilities: ClassVar[bool] = False  # decides on softmax(logits / temperature): takes an ensemble
    vectors: ClassVar[tuple[str, ...]] = ("thresholds",)  # the per-exit GRAPH_VECTORS its ONNX rule reads
    # thresholds that send every input out / keep every input (profiling cascade.onnx, whose exits are forced
    # through its thresholds input); None: the policy has no such pair (stateful class exclusion)
    forcing: ClassVar[tuple[float, float] | None] = (0.0, 1.0)

    def __post_init__(self) -> None:
        self.threshold = self.check_threshold(self.threshold)
        self.temperature = check_temperature(self.temperature)
        self.check_args()
        self.check_ensemble()

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

    def check_ensemble(self) -> None:
        """Refuse an unknown ensemble, one on a policy that reads no probabilities, or weights that are not > 0."""
        if self.ensemble == NO_ENSEMBLE:
            self.weights = ()
            return
        if self.ensemble not in ENSEMBLES:
            raise ConfigError(f"unknown ensemble '{self.ensemble}'; choose from: {', '.join(ensemble_choices())}")
        if not self.reads_probabilities:
            raise ConfigError(f"ensemble '{self.ensemble}' needs a policy that reads class probabilities "
                              f"({', '.join(ensemble_policies())}); exit policy '{self.name}' does not")
        if not self.weights:
            raise ConfigError(f"ensemble '{self.ensemble}' needs a weight for each exit so far")
        self.weights = tuple(check_weight(w) for w in self.weights)

    @classmethod
    def has_score(cls) -> bool:
        """Whether the policy compares one per-input score with its threshold (what `calibrate --policy auto` searches)."""
        return _owner(cls, "scores") is not Policy

    def vector_names(self) -> tuple[str, ...]:
        """The per-exit GRAPH_VECTORS this exit's ONNX rule reads."""
        return self.vectors + (() if self.ensemble == NO_ENSEMBLE else ("weights",))

    def compare(self, scores: np.ndarray) -> np.ndarray:
        """Which inputs leave: score >= cutoff (<= for a policy that exits below it)."""
        return scores <= self.cutoff() if self.exits_below else scores >= self.cutoff()

    def graph_compare(self, g: GraphOps, scores: str, index: int) -> str:
        return g.node("LessOrEqual" if self.exits_below else "GreaterOrEqual", [scores, self.graph_cutoff(g, index)], "exits")

    def start(self, n: int, num_classes: int) -> np.ndarray | None:
        """Per-input state at the first stage (None for stateless policies)."""
        return None

    def emit_start(self, g: GraphOps, out: dict[str, str]) -> str | None:
        return None

    def scores(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """The per-input number compared with the threshold (in score space, see `cutoff`)."""
        raise NotImplementedError

    def graph_scores(self, g: GraphOps, out: dict[str, str], index: int) -> str:
        raise NotImplementedError

    def cutoff(self) -> float:
        """The threshold mapped into score space (identity unless the score is a transform of it)."""
        return self.threshold

    def graph_cutoff(self, g: GraphOps, index: int) -> str:
        return g.per_exit("thresholds", index)

    @classmethod
    def threshold_of(cls, scores: np.ndarray) -> np.ndarray:
        """Inverse of `cutoff`: the thresholds whose cutoffs are these scores (for calibration grids)."""
        return scores

    def assess(self, outputs: dict[str, np.ndarray], state: np.ndarray | None):
        """Each input's score, its prediction and the state passed on: the decision before the threshold."""
        return self.scores(outputs), outputs["logits"].argmax(axis=1), state

    def decide(self, outputs: dict[str, np.ndarray], state: np.ndarray | None):
        """Which inputs exit here, their predictions, and the state passed on."""
        scores, predictions, state = self.assess(outputs, state)
        return self.compare(scores), predictions, state

    @classmethod
    def thresholds_only_compare(cls) -> bool:
        """Whether the threshold enters the decision only through `compare` (decide is assess + compare): scores,
        predictions and state are then the same at every threshold, and the simulator assesses each exit once."""
        return _owner(cls, "decide") is Policy and cls.has_score()

    def emit(self, g: GraphOps, out: dict[str, str], index: int, state: str | None) -> tuple[str, str, str, str | None]:
        """`decide` as ONNX ops on exit `index`'s outputs: (exits bool, prediction int64, scores float (n, C), state)."""
        return self.graph_compare(g, self.graph_scores(g, out, index), index), g.argmax(out["logits"]), out["logits"], state

    def final(self, logits: np.ndarray, state: np.ndarray | None) -> np.ndarray:
        """Predictions at the final stage for inputs that never exited."""
        return logits.argmax(axis=1)

    def emit_final(self, g: GraphOps, logits: str, state: str | None, index: int) -> str:
        """`final` as ONNX ops (`index`: this last exit's)."""
        return g.argmax(logits)


POLICIES: Registry[type[Policy]] = Registry("exit policy")


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Register an exit policy under its name, refused unless each of its rules has both halves (check_rules)."""
    check_rules(cls)
    if _owner(cls, "scores") is Policy and _owner(cls, "decide") is Policy:
        raise ValueError(f"{cls.__name__} has no decision: define scores/graph_scores or decide/emit")
    POLICIES.register(cls.name, cls)
    return cls


def logit(p: float) -> float:
    """log(p / (1 - p)) in float64: -inf at 0, +inf at 1."""
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p) - math.log1p(-p)


@register_policy
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

    def graph_scores(self, g, out, index):
        return g.cast(g.flat(out["confidence_logit"]), "float64")

    def cutoff(self) -> float:
        return logit(self.threshold)

    def graph_cutoff(self, g, index):
        return g.per_exit("thresholds", index, transform=graph_logit)

    @classmethod
    def threshold_of(cls, scores):
        return 1.0 / (1.0 + np.exp(-np.asarray(scores, dtype=np.float64)))


@dataclass
class ProbabilityPolicy(Policy):
    """A policy whose score is a function of p = softmax(logits / temperature) in float64 (`score_probs`).

    With an ensemble, p is that of exits 0..k combined (`ensembled`), and the prediction is its
    argmax at every stage, the final one included; without, the exit's own argmax of the logits."""

    reads_probabilities: ClassVar[bool] = True
    vectors: ClassVar[tuple[str, ...]] = ("thresholds", "temperature")

    def tempered(self, logits: np.ndarray) -> np.ndarray:
        """The exit's logits in float64 divided by its temperature."""
        return logits.astype(np.float64) / self.temperature

    def graph_tempered(self, g: GraphOps, logits: str, index: int) -> str:
        return g.node("Div", [g.cast(logits, "float64"), g.per_exit("temperature", index)], "scaled")

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Softmax of the exit's logits at this policy's temperature."""
        return softmax(self.tempered(logits))

    def graph_probabilities(self, g: GraphOps, logits: str, index: int) -> str:
        return g.node("Softmax", [self.graph_tempered(g, logits, index)], "probs", axis=1)

    def score_probs(self, probs: np.ndarray) -> np.ndarray:
        """The per-input score of class probabilities (n, C)."""
        raise NotImplementedError

    def graph_score_probs(self, g: GraphOps, probs: str) -> str:
        raise NotImplementedError

    def scores(self, outputs):
        return self.score_probs(self.probabilities(outputs["logits"]))

    def graph_scores(self, g, out, index):
        return self.graph_score_probs(g, self.graph_probabilities(g, out["logits"], index))

    def ensembled(self, logits: np.ndarray, state: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(running total, probabilities) of exits 0..k: this exit's weighted term added to the total, combined."""
        rule = ENSEMBLES.get(self.ensemble)
        term = self.weights[-1] * rule.term(self.tempered(logits))
        total = term if state is None else state + term
        return total, rule.combine(total, np.cumsum(self.weights)[-1])

    def graph_ensembled(self, g: GraphOps, logits: str, index: int, state: str | None) -> tuple[str, str]:
        rule = ENSEMBLES.get(self.ensemble)
        term = g.node("Mul", [rule.graph_term(g, self.graph_tempered(g, logits, index)), g.per_exit("weights", index)], "weighted")
        total = term if state is None else g.node("Add", [state, term], "total")
        return total, rule.graph_combine(g, total, g.per_exit("weights", index, transform=graph_cumulative))

    def assess(self, outputs, state):
        if self.ensemble == NO_ENSEMBLE:
            return super().assess(outputs, state)
        total, probs = self.ensembled(outputs["logits"], state)
        return self.score_probs(probs), probs.argmax(axis=1), total

    def emit(self, g, out, index, state):
        if self.ensemble == NO_ENSEMBLE:
            return super().emit(g, out, index, state)
        total, probs = self.graph_ensembled(g, out["logits"], index, state)
        return self.graph_compare(g, self.graph_score_probs(g, probs), index), g.argmax(probs), out["logits"], total

    def final_probabilities(self, logits: np.ndarray, state: np.ndarray) -> np.ndarray:
        """The final stage's ensemble: the final logits' term (weight 1, temperature 1) added to the running total."""
        rule = ENSEMBLES.get(self.ensemble)
        return rule.combine(state + rule.term(logits.astype(np.float64)), np.cumsum(self.weights)[-1] + 1.0)

    def final(self, logits, state):
        if self.ensemble == NO_ENSEMBLE:
            return super().final(logits, state)
        return self.final_probabilities(logits, state).argmax(axis=1)

    def emit_final(self, g, logits, state, index):
        if self.ensemble == NO_ENSEMBLE:
            return super().emit_final(g, logits, state, index)
        rule = ENSEMBLES.get(self.ensemble)
        total = g.node("Add", [state, rule.graph_term(g, g.cast(logits, "float64"))], "total")
        return g.argmax(rule.graph_combine(g, total, g.per_exit("weights", index, transform=graph_final_total)))


@register_policy
@dataclass
class MaxSoftmaxPolicy(ProbabilityPolicy):
    """SDN-style baseline: exit when the top softmax probability >= T."""

    name: ClassVar[str] = "max_softmax"
    default_threshold: ClassVar[float] = 0.9

    def score_probs(self, probs):
        return probs.max(axis=1)

    def graph_score_probs(self, g, probs):
        return g.reduce("ReduceMax", probs, "top")


@register_policy
@dataclass
class EntropyPolicy(ProbabilityPolicy):
    """BranchyNet: exit when the softmax entropy (nats) <= T (at most log C; 0 = one-hot)."""

    name: ClassVar[str] = "entropy"
    threshold_range: ClassVar[tuple[float, float]] = (0.0, math.inf)
    exits_below: ClassVar[bool] = True
    forcing: ClassVar[tuple[float, float] | None] = (1e9, 0.0)  # entropy is at most log C; 0 only for one-hot

    def score_probs(self, probs):
        return -(probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=1)

    def graph_score_probs(self, g, probs):
        clipped = g.node("Clip", [probs, g.const("eps", np.array(1e-12))], "clipped")
        plogp = g.node("Mul", [probs, g.node("Log", [clipped], "logp")], "plogp")
        return g.node("Neg", [g.reduce("ReduceSum", plogp, "sum")], "entropy")


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function in float64 (a float32 sigmoid rounds every logit above ~17 to exactly 1)."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


@register_policy
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
    vectors: ClassVar[tuple[str, ...]] = ("thresholds", "beta")
    default_threshold: ClassVar[float] = 0.0
    forcing: ClassVar[tuple[float, float] | None] = None
    beta_range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    # Uncalibrated default. The authors' searched beta_k (0.01-0.31 on VGG/AlexNet/ResNet-50) exclude nothing on
    # heads trained briefly with their loss (every class scores about 0.8 until a head learns): digits, resnet20, 3
    # linear exits, 8 epochs, test: beta 0.1 kept all inputs to the end; 0.8 lost nothing at 0.77 of the MACs, 0.9
    # 0.4 points at 0.74, 0.95 6 points. `calibrate --target-drop` searches beta_k per exit.
    default_beta: ClassVar[float] = 0.8

    def __post_init__(self) -> None:
        super().__post_init__()
        self.args = {**self.args, "beta": check_range("beta", self.args.get("beta", self.default_beta), self.beta_range)}

    def start(self, n, num_classes):
        return np.ones((n, num_classes), dtype=bool)

    def emit_start(self, g, out):
        shape = g.node("Shape", [out["exclusion_logits"]], "shape")
        return g.node("Expand", [g.const("all_true", np.array(True)), shape], "state")

    def decide(self, outputs, state):
        scores = sigmoid(outputs["exclusion_logits"])
        in_play = np.where(state, scores, -np.inf)
        best = in_play.argmax(axis=1)
        cut = np.maximum(self.threshold, self.args["beta"] * in_play.max(axis=1))
        mask = state & (scores > cut[:, None])
        mask[np.arange(len(best)), best] = True
        return mask.sum(axis=1) == 1, best, mask

    def emit(self, g, out, index, state):
        """s = sigmoid as 0.5 (1 + tanh(z / 2)) in float64, as `sigmoid`; the scores output is the float32 logits."""
        logits = out["exclusion_logits"]
        half = g.const("half", np.array(0.5))
        tanh = g.node("Tanh", [g.node("Mul", [g.cast(logits, "float64"), half], "half_z")], "tanh")
        scores = g.node("Mul", [g.node("Add", [tanh, g.const("one64", np.array(1.0))], "one_plus"), half], "sigmoid")
        in_play = g.node("Where", [state, scores, g.const("ninf64", np.array(-np.inf))], "in_play")
        best = g.argmax(in_play)
        beta_top = g.node("Mul", [g.per_exit("beta", index), g.reduce("ReduceMax", in_play, "top")], "beta_top")
        cut = g.node("Max", [beta_top, g.per_exit("thresholds", index)], "cut")
        axis = g.const("axis", np.array([1], dtype=np.int64))
        above = g.node("Greater", [scores, g.node("Unsqueeze", [cut, axis], "cut_col")], "above")
        one = g.const("one", np.array(1, dtype=np.int64))
        count = g.node("Gather", [g.node("Shape", [logits], "shape"), one], "classes_n")
        classes = g.node("Range", [g.const("zero", np.array(0, dtype=np.int64)), count, one], "classes")
        is_best = g.node("Equal", [classes, g.node("Unsqueeze", [best, axis], "best_col")], "is_best")
        mask = g.node("Or", [g.node("And", [state, above], "kept"), is_best], "mask")
        left = g.reduce("ReduceSum", g.cast(mask, "int64"), "left")
        return g.node("Equal", [left, one], "exits"), best, logits, mask

    def final(self, logits, state):
        return logits.argmax(axis=1) if state is None else np.where(state, logits, -np.inf).argmax(axis=1)

    def emit_final(self, g, logits, state, index):
        if state is None:
            return g.argmax(logits)
        return g.argmax(g.node("Where", [state, logits, g.const("ninf", np.array(-np.inf, dtype=np.float32))], "masked"))


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


def policies_for(roles, scored: bool = False) -> list[str]:
    """Names of the policies whose needed exit outputs are all among `roles` (scored: only those with a score)."""
    return [name for name, cls in POLICIES.items() if set(cls.roles) <= set(roles) and (cls.has_score() or not scored)]


def ensemble_policies() -> list[str]:
    """Names of the policies that take an ensemble (they read class probabilities)."""
    return [name for name, cls in POLICIES.items() if cls.reads_probabilities]


def get_policy(kind: str) -> type[Policy]:
    """Look up a policy class by name, with an error listing the valid names."""
    return POLICIES.get(kind)


def with_ensemble(policies: Sequence[Policy], mode: str, weights: Sequence[float] | None = None) -> list[Policy]:
    """The exit policies with ensemble `mode` (none drops it): exit k combines exits 0..k with weights[:k+1] (all 1
    when None); the final stage adds its own probabilities at weight 1."""
    weights = [1.0] * len(policies) if weights is None else [float(w) for w in weights]
    if len(weights) != len(policies):
        raise ConfigError(f"got {len(weights)} ensemble weights for {len(policies)} exits")
    keep = () if mode == NO_ENSEMBLE else None
    return [dataclasses.replace(p, ensemble=mode, weights=tuple(weights[: k + 1]) if keep is None else keep)
            for k, p in enumerate(policies)]


def manifest_ensemble(specs: Sequence[PolicySpec]) -> tuple[str, list[float]]:
    """The ensemble mode and per-exit weights stored in the exits' policy specs (BundleError when exits disagree)."""
    modes = sorted({spec.ensemble for spec in specs})
    if len(modes) > 1:
        raise BundleError(f"the exits' policies name different ensembles ({', '.join(modes)}); every exit needs the same one")
    return (modes[0] if modes else NO_ENSEMBLE), [spec.weight for spec in specs]


def ensembled(policies: Sequence[Policy], specs: Sequence[PolicySpec], choice: str | None = None) -> list[Policy]:
    """The exit policies with the manifest's ensemble and weights, or ensemble `choice` instead (its fitted weights
    when it is the manifest's own mode, else all 1). Without a choice, policies that read no class probabilities
    (run --policy confidence on an ensemble bundle) run without the manifest's ensemble."""
    mode, weights = manifest_ensemble(specs)
    if choice is None and not all(p.reads_probabilities for p in policies):
        mode = NO_ENSEMBLE
    elif choice is not None and choice != mode:
        mode, weights = choice, None
    return with_ensemble(policies, mode, weights)


# cascade.onnx's per-exit float64 vectors in graph order, and the value each takes from an exit's policy
GRAPH_VECTORS: dict[str, Callable[[Policy], float]] = {
    "thresholds": lambda p: p.threshold,
    "beta": lambda p: float(p.args.get("beta", 0.0)),
    "temperature": lambda p: p.temperature,
    "weights": lambda p: p.weights[-1] if p.weights else 1.0,
}


def graph_vectors(policies: Sequence[Policy]) -> dict[str, np.ndarray]:
    """The per-exit vectors cascade.onnx reads for these exit policies, in graph order, with their values."""
    needed = {name for policy in policies for name in policy.vector_names()}
    return {name: np.array([value(p) for p in policies], dtype=np.float64) for name, value in GRAPH_VECTORS.items() if name in needed}
