"""ONNX spellings of the activations that replace ReLU: one site's computation as nodes.

The rewrite (:mod:`retrofit.onnx_path.rewrite`) decides where a site is, what it is called and where
its parameters live; this module only turns a config plus one site's :class:`SitePlan` into
nodes, for every default-domain opset from :data:`MIN_OPSET` to the newest one onnx knows, either
inline or as the body of one model-local function per variant.

The math is activations.md's. CompetitiveReLU is emitted with the fewest passes over the
tensor that keep it exact, because onnxruntime runs every node as its own pass (and its
``ReduceSumSquare``/``ReduceL1`` are several times slower than ``Mul``/``Abs`` plus ``ReduceSum``):
``pos = Max(z, 0)``, the two sums of the measure (``ReduceSum`` of ``z*z`` and ``pos*pos``, or of
``|z|`` and ``pos``), and the output ``Mul(pos, s)``, which is ``max(s*z, 0)`` when every ``s`` of
the batch is >= 0. Two ``If`` nodes, on one element each, keep the rest exact: where a sum
is not below ``big / K`` (it may have overflowed, and ``s * z`` could: possible for float32,
float64 and bfloat16 inputs, not for float16 ones) ``p`` is
measured on ``u = z / m`` with ``m = max(max|z|, 1)`` and eps scaled to match (``eps / m^2`` for
energy, ``eps / m`` for L1), which is the paper's ``p`` exactly while ``z^2`` cannot overflow; and
where some ``s`` is negative, or the output is cast to a half type, the output is
``Clip(s * z, 0, big)``. No ``Relu`` node is emitted, so a rewritten model has no ReLU site left.
MRePU is ``b * MRePU(a * x)`` with the
site's input gain ``a`` (``gain_in``) and output gain ``b`` (``gain_out``), blended with ReLU by
``blend`` (lam): ``(1 - lam) * max(x, 0) + lam * (b * MRePU(a * x))``. As in the torch
modules, float16 and bfloat16 tensors are computed in float32 and cast back (MRePU overflows
float16 early; the sums of CompetitiveReLU do too), and a result beyond the output type's range
saturates at its largest finite value instead of becoming inf.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from retrofit.activations.functional import competition_axes as shared_competition_axes
from retrofit.config import (
    REDUCTIONS,
    ActivationConfig,
    CompetitiveReLUConfig,
    MRePUConfig,
    Reduction,
    RePUConfig,
    check_choice,
)
from retrofit.errors import UnsupportedModelError, UsageError

MIN_OPSET = 9
"""Oldest default-domain opset the emitted nodes support (Max/Greater/Cast/Flatten forms)."""

MAX_OPSET = onnx.defs.onnx_opset_version()
"""Newest default-domain opset the installed onnx knows."""

DEFAULT_OPSET = 20
"""Default-domain opset of the ONNX files cadrelu writes from torch models: torch 2.13's default
for ``torch.onnx.export(dynamo=True)`` (onnxscript's torchlib writes opset 18 and converts up);
onnxruntime runs opset 20 from 1.17 on."""

FUNCTION_DOMAIN = "cadrelu"
"""Domain of the model-local functions emitted with ``as_functions=True``."""

FUNCTION_MIN_IR_VERSION = 8
"""Model-local functions (``ModelProto.functions``) exist from ONNX IR version 8 on."""

FUNCTION_NAMES = {"carelu": "CompetitiveReLU", "mrepu": "MRePU", "repu": "RePU"}
"""Base name of the model-local function for each activation (variants get a suffix)."""

# Element types a ReLU site may carry and the type its new activation is computed in.
_COMPUTE_TYPES = {
    TensorProto.FLOAT: TensorProto.FLOAT,
    TensorProto.DOUBLE: TensorProto.DOUBLE,
    TensorProto.FLOAT16: TensorProto.FLOAT,
    TensorProto.BFLOAT16: TensorProto.FLOAT,
}

# Largest finite value of each float type: outputs saturate there instead of becoming inf,
# as the torch modules do (== torch.finfo(dtype).max).
_FINITE_MAX = {
    TensorProto.FLOAT: 3.4028234663852886e38,
    TensorProto.DOUBLE: 1.7976931348623157e308,
    TensorProto.FLOAT16: 65504.0,
    TensorProto.BFLOAT16: 3.3895313892515355e38,
}

# Element types whose CompetitiveReLU sums can overflow the compute type: squares of float16
# values (<= 65504^2) summed in float32 stay finite for any tensor that fits in memory.
_SUMS_CAN_OVERFLOW = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.BFLOAT16}

# Opset from which a reduction takes its axes as an input instead of an attribute.
_AXES_INPUT_SINCE = {"ReduceSum": 13, "ReduceMax": 18, "ReduceMin": 18, "ReduceMean": 18}

# Opset from which Clip takes its bounds as inputs (of any float type) instead of float attributes.
_CLIP_BOUNDS_AS_INPUTS = 11

Fresh = Callable[[str], str]
"""Returns a name, derived from the hint it is given, that is unused in the target scope."""


def compute_type(elem_type: int) -> int | None:
    """The element type a site of ``elem_type`` is computed in, or None when it is not a float."""
    return _COMPUTE_TYPES.get(elem_type)


@dataclass(frozen=True)
class CompetitionAxes:
    """Where CompetitiveReLU measures ``p(z)`` at one site.

    ``axes`` are the reduced axes (kept as size 1, so ``p`` broadcasts back onto ``z``;
    negative ones count from the end); ``None`` reduces every axis. ``flatten`` is the
    rank-agnostic per-sample form used when the rank is unknown: ``p`` is measured over axis 1
    of ``Flatten(z, 1)`` and the result is reshaped back to ``Shape(z)``.
    """

    axes: tuple[int, ...] | None
    flatten: bool = False

    def describe(self) -> str:
        if self.flatten:
            return "per sample (rank unknown: measured on Flatten(z, 1))"
        return "over all axes" if self.axes is None else f"over axes {list(self.axes)}"


def competition_axes(
    reduce: Reduction, rank: int | None, opset: int, *, site: str = ""
) -> CompetitionAxes:
    """Resolve a config's ``reduce`` to concrete axes for a tensor of ``rank`` dimensions.

    With the rank known, the torch forms' axes
    (:func:`retrofit.activations.functional.competition_axes`), every axis of a 0-D or 1-D
    tensor written as ``None``. With the rank unknown, ``sample`` is measured rank-agnostically
    through ``Flatten`` and ``last`` as axis -1 (opset 11 on); ``auto`` and ``channel`` cannot
    be decided and raise :class:`UnsupportedModelError`.
    """
    check_choice(reduce, REDUCTIONS, "reduce")
    if rank is None:
        if reduce == "sample":
            return CompetitionAxes((1,), flatten=True)
        if reduce == "last" and opset >= 11:
            return CompetitionAxes((-1,))
        where = f"ReLU site {site!r}" if site else "a ReLU site"
        raise UnsupportedModelError(
            f"the rank of the input of {where} is unknown, so reduce={reduce!r} cannot choose "
            "its axes; give the model's inputs static ranks or use reduce='sample'"
            + (" or 'last'" if opset >= 11 else "")
        )
    if rank <= 1:
        return CompetitionAxes(None)
    return CompetitionAxes(tuple(shared_competition_axes(rank, reduce)))


@dataclass(frozen=True)
class SitePlan:
    """What one site's computation depends on besides the config: the element type of the
    ReLU's tensor and, for CompetitiveReLU, where ``p(z)`` is measured. Equal plans (with equal
    configs and opsets) produce the same nodes, so a plan keys one function variant."""

    elem_type: int
    axes: CompetitionAxes | None = None

    @property
    def compute_type(self) -> int:
        computed = compute_type(self.elem_type)
        if computed is None:
            raise UsageError(f"element type {type_name(self.elem_type)} is not a float type")
        return computed


def _initial_values(config: ActivationConfig) -> dict[str, float]:
    """Each trainable scalar a site of this activation owns, with its start value, in input
    order (the torch modules' parameter names, so trained values map back by name)."""
    if isinstance(config, CompetitiveReLUConfig):
        return {"alpha": config.alpha_init, "beta": config.beta}
    if isinstance(config, MRePUConfig):
        return {"gain_in": 1.0, "gain_out": 1.0}  # a = b = 1: the paper's MRePU
    return {}


def parameter_names(config: ActivationConfig) -> tuple[str, ...]:
    """The trainable scalars each site of this activation owns, in input order."""
    return tuple(_initial_values(config))


def parameter_values(
    config: ActivationConfig, overrides: Mapping[str, float] | None = None
) -> dict[str, float]:
    """A site's parameter values: the config's initial values, replaced by ``overrides``
    (trained values written back after fine-tuning)."""
    defaults = _initial_values(config)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        allowed = ", ".join(defaults) if defaults else f"none for {config.name}"
        raise UsageError(f"unknown site value(s) {', '.join(unknown)}; allowed: {allowed}")
    return {name: float(overrides.get(name, value)) for name, value in defaults.items()}


def parameter_tensor(name: str, value: float, plan: SitePlan) -> TensorProto:
    """One scalar parameter as an initializer in the site's compute type (raw data, as
    exporters write it)."""
    dtype = helper.tensor_dtype_to_np_dtype(plan.compute_type)
    return numpy_helper.from_array(np.array(value, dtype=dtype), name)


def describe(config: ActivationConfig, plan: SitePlan) -> str:
    """One line saying what a site computes (doc strings of emitted functions)."""
    if isinstance(config, CompetitiveReLUConfig):
        where = plan.axes.describe() if plan.axes else ""
        return (
            f"CompetitiveReLU max(K*tanh(alpha*p+beta)*z, 0), p = {config.measure} share of the "
            f"positive side {where}; K={config.k:g}, eps={config.eps:g}"
        )
    if isinstance(config, MRePUConfig):
        if config.blend == 0:
            return "ReLU max(x, 0): MRePU at blend 0 (gain_in and gain_out unused)"
        text = "b*MRePU(a*x)"
        if config.blend < 1:
            text = f"(1-{config.blend:g})*max(x,0) + {config.blend:g}*{text}"
        shape = f"x*max(0, x+{config.c:g})^{config.p:g}"
        return f"{text}; MRePU(x) = {shape}, a = gain_in, b = gain_out"
    return f"RePU max(0, x)^{config.p:g}"


class _Builder:
    """Appends nodes for one site; constants are Constant nodes so the same code serves a graph,
    a subgraph and a function body."""

    def __init__(self, fresh: Fresh, opset: int, dtype: int) -> None:
        self.fresh = fresh
        self.opset = opset
        self.dtype = dtype
        self.nodes: list[onnx.NodeProto] = []
        self._constants: dict[tuple[int, float], str] = {}
        self._axes: dict[tuple[int, ...], str] = {}

    def branch(self) -> "_Builder":
        """A builder for an ``If`` branch: it sees this scope's constants (outer-scope names),
        and what it adds stays in the branch."""
        child = _Builder(self.fresh, self.opset, self.dtype)
        child._constants = dict(self._constants)
        child._axes = dict(self._axes)
        return child

    def if_(self, condition: str, then: Callable[["_Builder"], str],
            otherwise: Callable[["_Builder"], str], hint: str) -> str:
        """``If(condition)``: the value ``then`` or ``otherwise`` computes in its own branch."""
        branches = {}
        for key, body in (("then_branch", then), ("else_branch", otherwise)):
            child = self.branch()
            result = body(child)
            if not child.nodes or child.nodes[-1].output[0] != result:  # an outer name
                result = child.op("Identity", [result], hint)
            output = helper.make_tensor_value_info(result, self.dtype, None)
            branches[key] = helper.make_graph(child.nodes, self.fresh(key), [], [output])
        return self.op("If", [condition], hint, **branches)

    def op(self, op_type: str, inputs: Sequence[str], hint: str = "", **attrs: object) -> str:
        output = self.fresh(hint or op_type.lower())
        node = helper.make_node(op_type, list(inputs), [output], name=self.fresh(op_type), **attrs)
        self.nodes.append(node)
        return output

    def const(self, value: float, dtype: int | None = None) -> str:
        dtype = self.dtype if dtype is None else dtype
        key = (dtype, value)
        if key not in self._constants:
            hint = f"c{value:g}".replace("-", "m").replace(".", "p").replace("+", "")
            tensor = helper.make_tensor(hint, dtype, [], [value])
            self._constants[key] = self.op("Constant", [], hint, value=tensor)
        return self._constants[key]

    def reduce(self, op_type: str, x: str, axes: tuple[int, ...] | None, hint: str) -> str:
        if axes is None:
            return self.op(op_type, [x], hint, keepdims=1)
        if self.opset >= _AXES_INPUT_SINCE[op_type]:
            if axes not in self._axes:
                tensor = helper.make_tensor("axes", TensorProto.INT64, [len(axes)], list(axes))
                self._axes[axes] = self.op("Constant", [], "axes", value=tensor)
            return self.op(op_type, [x, self._axes[axes]], hint, keepdims=1)
        return self.op(op_type, [x], hint, axes=list(axes), keepdims=1)

    def finish(self, result: str, output: str) -> list[onnx.NodeProto]:
        """Make the last node, which computes ``result``, write ``output`` instead (``result``
        is a fresh name that nothing else reads)."""
        assert self.nodes[-1].output[0] == result
        self.nodes[-1].output[0] = output
        return self.nodes


def emit_activation(
    config: ActivationConfig,
    plan: SitePlan,
    x: str,
    y: str,
    *,
    opset: int,
    fresh: Fresh,
    params: Sequence[str] = (),
) -> list[onnx.NodeProto]:
    """Nodes that compute ``y = activation(x)`` for one site, in graph order.

    ``params`` names the site's parameter values (initializers or function inputs), in the
    order :func:`parameter_names` gives; ``fresh`` provides every other name. Nothing outside
    the returned nodes is touched.
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UnsupportedModelError(
            f"default-domain opset {opset} is outside {MIN_OPSET}..{MAX_OPSET}, which cadrelu "
            "rewrites; convert the model with onnx.version_converter first"
        )
    if len(params) != len(parameter_names(config)):
        raise UsageError(f"{config.name} takes {len(parameter_names(config))} parameter(s)")
    dtype = plan.compute_type
    b = _Builder(fresh, opset, dtype)
    z = x if dtype == plan.elem_type else b.op("Cast", [x], "x_f32", to=dtype)
    big = _FINITE_MAX[plan.elem_type]
    if isinstance(config, CompetitiveReLUConfig):
        if plan.axes is None:
            raise UsageError("a CompetitiveReLU site needs its competition axes")
        result = _competitive_relu(b, config, plan, z, *params)
    elif isinstance(config, MRePUConfig):
        result = _mrepu(b, config, z, big, *params)
    elif isinstance(config, RePUConfig):
        positive = b.op("Max", [z, b.const(0.0)], "pos")
        result = _saturate(b, b.op("Pow", [positive, b.const(config.p)], "repu"), big)
    else:
        raise UsageError(f"no ONNX form for activation {type(config).__name__}")
    if dtype != plan.elem_type:
        result = b.op("Cast", [result], "y", to=plan.elem_type)
    return b.finish(result, y)


def _saturate(b: _Builder, y: str, big: float) -> str:
    """Clamp to [-big, big]: a result beyond the output type's range becomes its largest
    finite value, not inf."""
    return b.op("Max", [b.op("Min", [y, b.const(big)], "upper"), b.const(-big)], "saturated")


def _scaled_relu(b: _Builder, s: str, z: str, big: float) -> str:
    """``max(s * z, 0)`` saturated at ``big`` (torch: ``clamp(0, big)``), one ``Clip`` where the
    opset lets its bounds be of the compute type."""
    scaled = b.op("Mul", [s, z], "scaled")
    if b.opset >= _CLIP_BOUNDS_AS_INPUTS:
        return b.op("Clip", [scaled, b.const(0.0), b.const(big)], "carelu")
    if b.dtype == TensorProto.FLOAT:  # Clip-6's bounds are float attributes
        return b.op("Clip", [scaled], "carelu", min=0.0, max=big)
    return b.op("Min", [b.op("Max", [scaled, b.const(0.0)], "positive"), b.const(big)], "carelu")


def _rescaled_share(
    b: _Builder, config: CompetitiveReLUConfig, axes: tuple[int, ...] | None, z: str
) -> str:
    """The competition measured on ``u = z / m``, ``m = max(max|z|, 1)``, with eps scaled to
    match: the same ``p`` as the plain sums, and finite where those overflowed."""
    m = b.op("Max", [b.reduce("ReduceMax", b.op("Abs", [z], "abs"), axes, "abs_max"),
                     b.const(1.0)], "m")
    _, part, total = _measure_sums(b, config.measure, b.op("Div", [z, m], "u"), axes)
    if config.measure == "energy":
        eps = b.op("Div", [b.const(config.eps), b.op("Mul", [m, m], "m_sq")], "eps_scaled")
    else:
        eps = b.op("Div", [b.const(config.eps), m], "eps_scaled")
    return b.op("Div", [part, b.op("Add", [total, eps], "denominator")], "p")


def _measure_sums(
    b: _Builder, measure: str, z: str, axes: tuple[int, ...] | None
) -> tuple[str, str, str]:
    """``max(z, 0)`` and the measure's two sums over ``axes``: the positive side's and the
    total. ``ReduceSum`` of ``Mul``/``Abs``, not ``ReduceSumSquare``/``ReduceL1``, which
    onnxruntime runs several times slower."""
    pos = b.op("Max", [z, b.const(0.0)], "pos")
    if measure == "energy":
        total = b.reduce("ReduceSum", b.op("Mul", [z, z], "sq"), axes, "energy")
        part = b.reduce("ReduceSum", b.op("Mul", [pos, pos], "pos_sq"), axes, "pos_energy")
        return pos, part, total
    if measure == "l1":
        total = b.reduce("ReduceSum", b.op("Abs", [z], "abs"), axes, "l1")
        return pos, b.reduce("ReduceSum", pos, axes, "pos_l1"), total
    raise UsageError(f"unknown measure {measure!r}; choose energy, l1 or count")


def _nonnegative(b: _Builder, s: str) -> str:
    """One element: every ``s`` >= 0 (True for an empty batch, whose ReduceMin is +inf)."""
    lowest = b.reduce("ReduceMin", s, None, "s_min")
    if b.opset >= 12:
        return b.op("GreaterOrEqual", [lowest, b.const(0.0)], "s_nonnegative")
    return b.op("Not", [b.op("Less", [lowest, b.const(0.0)], "s_negative")], "s_nonnegative")


def _competitive_relu(
    b: _Builder,
    config: CompetitiveReLUConfig,
    plan: SitePlan,
    x: str,
    alpha: str,
    beta: str,
) -> str:
    """CompetitiveReLU in the fewest passes over the tensor (see the module docstring)."""
    assert plan.axes is not None
    where, big = plan.axes, _FINITE_MAX[plan.elem_type]
    flatten_at = _rows_view_axis(where)
    z = x if flatten_at is None else b.op("Flatten", [x], "rows", axis=flatten_at)
    axes = where.axes if flatten_at is None else (1,)
    in_range = pos = None
    if config.measure == "count":
        positive = b.op("Cast", [b.op("Greater", [z, b.const(0.0)], "is_pos")], "pos_count",
                        to=b.dtype)
        p = b.reduce("ReduceMean", positive, axes, "p")
    else:
        pos, part, total = _measure_sums(b, config.measure, z, axes)

        def share(scope: _Builder) -> str:
            eps = scope.const(config.eps)
            return scope.op("Div", [part, scope.op("Add", [total, eps], "denominator")], "p")

        if plan.elem_type in _SUMS_CAN_OVERFLOW:
            # One element: every sum is below big / k, so none overflowed and |s * z| < big
            # (False for inf and NaN, which the rescaled form keeps as the torch module does).
            every = b.reduce("ReduceSum", total, None, "all_sums")
            in_range = b.op("Less", [every, b.const(big / config.k)], "sums_in_range")
            p = b.if_(in_range, share, lambda exact: _rescaled_share(exact, config, axes, z), "p")
        else:
            p = share(b)
    t = b.op("Add", [b.op("Mul", [alpha, p], "alpha_p"), beta], "t")
    s = b.op("Mul", [b.const(config.k), b.op("Tanh", [t], "tanh")], "s")
    if in_range is None or plan.compute_type != plan.elem_type:
        y = _scaled_relu(b, s, z, big)
    else:  # s * max(z, 0) = max(s * z, 0) where every s >= 0, unsaturated in range
        same_sign = b.op("And", [in_range, _nonnegative(b, s)], "positive_side")
        kept = pos
        y = b.if_(same_sign, lambda fast: fast.op("Mul", [kept, s], "carelu"),
                  lambda mixed: _scaled_relu(mixed, s, z, big), "carelu")
    if flatten_at is not None:
        y = b.op("Reshape", [y, b.op("Shape", [x], "shape")], "carelu")
    return y


def _rows_view_axis(where: CompetitionAxes) -> int | None:
    """Where to ``Flatten`` the site's tensor into (groups, D) rows, or None to keep it.

    Unknown ranks are measured per sample through ``Flatten(z, 1)``. A group spanning several
    (trailing) axes is flattened too: onnxruntime keeps a convolution's output in its blocked
    NCHWc layout for an elementwise ``Mul`` of that tensor with itself, and reorders the
    square back in an extra pass; on the rows view (an alias) every op reads the plain layout.
    """
    if where.flatten:
        return 1
    if where.axes is not None and len(where.axes) > 1 and min(where.axes) > 0:
        return where.axes[0]
    return None


def _mrepu(
    b: _Builder, config: MRePUConfig, x: str, big: float, gain_in: str, gain_out: str
) -> str:
    """``(1 - lam) * max(x, 0) + lam * (gain_out * MRePU(gain_in * x))``, in the order the torch
    module computes it: the MRePU term saturates before the output gain scales it (a zero gain
    never meets inf), and the result saturates again."""
    zero = b.const(0.0)
    if config.blend == 0.0:
        # lam = 0 is ReLU: no MRePU, so no inf*0; the gains stay inputs (trained values round-trip)
        return b.op("Max", [x, zero], "relu")
    ax = b.op("Mul", [gain_in, x], "gained_in")
    shifted = b.op("Max", [b.op("Add", [ax, b.const(config.c)], "shifted"), zero], "shifted_pos")
    mrepu = b.op("Mul", [ax, b.op("Pow", [shifted, b.const(config.p)], "power")], "mrepu")
    gained = b.op("Mul", [_saturate(b, mrepu, big), gain_out], "gained_out")
    if config.blend == 1.0:
        return _saturate(b, gained, big)
    kept = b.op("Mul", [b.const(1.0 - config.blend), b.op("Max", [x, zero], "relu")], "relu_part")
    added = b.op("Mul", [b.const(config.blend), gained], "mrepu_part")
    return _saturate(b, b.op("Add", [added, kept], "blend"), big)


def local_fresh(used: set[str] | None = None) -> Fresh:
    """A :data:`Fresh` for a namespace of its own (a function body): hints as they are, numbered
    on repeats."""
    taken = set(used or ())

    def fresh(hint: str) -> str:
        name, k = hint, 0
        while name in taken:
            k += 1
            name = f"{hint}_{k}"
        taken.add(name)
        return name

    return fresh


def activation_function(
    config: ActivationConfig,
    plan: SitePlan,
    *,
    opset: int,
    name: str,
    domain: str = FUNCTION_DOMAIN,
) -> onnx.FunctionProto:
    """The site computation as a model-local function ``Y = name(X, *parameters)``.

    Call it with :func:`activation_call`; each call passes its own parameter initializers, so
    every call is its own site. Requires a model of IR version >= 8.
    """
    inputs = ["X", *parameter_names(config)]
    fresh = local_fresh({*inputs, "Y"})
    nodes = emit_activation(
        config, plan, "X", "Y", opset=opset, fresh=fresh, params=parameter_names(config)
    )
    return helper.make_function(
        domain,
        name,
        inputs,
        ["Y"],
        nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        doc_string=describe(config, plan),
    )


def activation_call(
    function: onnx.FunctionProto, x: str, y: str, params: Sequence[str], *, node_name: str
) -> onnx.NodeProto:
    """One call of an :func:`activation_function` for one site."""
    return helper.make_node(
        function.name, [x, *params], [y], name=node_name, domain=function.domain
    )


def type_name(elem_type: int) -> str:
    """Lower-case ONNX name of an element type (``float16``), for messages."""
    try:
        return TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return f"type {elem_type}"
