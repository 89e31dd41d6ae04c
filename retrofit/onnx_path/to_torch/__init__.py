"""Run an ONNX graph as a trainable torch module, and write what training learned back into it.

Fine-tuning an ONNX model must hand the user back *their* model: the same graph, node names,
inputs, outputs and opset, with only the weights changed. So training does not go through a
model converted to some other architecture; ``builder.onnx_to_torch`` turns the ONNX graph
into a ``torch.fx.GraphModule`` that computes exactly what the graph computes (one fx node per
ONNX op, a few where one torch call cannot say it), whose float initializers are
``nn.Parameter``\\ s named by ``weights.torch_name``. After training,
``weights.write_back_initializers`` copies the trained values into the original initializers by
those names.

What callers may rely on:

* Placeholders are the graph inputs that are not initializers, in graph order; the module returns
  one tensor for a one-output graph, else a tuple in graph-output order.
* Each ONNX ``Relu`` becomes one ``call_function`` node with target ``torch.relu`` and
  ``node.meta["site_name"]`` set to the site name the ONNX rewrite uses (``node.name`` or its
  first output, made unique in graph order by :func:`retrofit.onnx_path.site_names.graph_site_names`).
* Float initializers used as run-time tensors are parameters; other initializers used at run time
  (integer tables, BatchNormalization running statistics) are persistent buffers; ``Constant``
  nodes and values folded at build time are non-persistent buffers or Python literals. The state
  dict therefore holds initializers only, keyed by ``weights.torch_name``.
* Values the graph computes from shapes stay symbolic (``x.size(i)`` and integer arithmetic), so
  the module is re-traceable by ``torch.fx.symbolic_trace`` and exportable by
  ``torch.export.export``, dynamic batch included. Arguments an op needs as Python values
  (Reshape targets, Slice bounds, Squeeze axes, Resize scales) must be constants or shape
  arithmetic; an initializer read that way is a constant, not a parameter.
* An initializer used at several places is one parameter. Exporters store equal tensors once
  (a fresh BatchNorm's running variance *is* its weight), so such values train together, which
  is what the written-back ONNX model then computes.
* ``Dropout`` is the identity and ``BatchNormalization`` uses its running statistics: the module
  computes what the ONNX model computes at inference, in ``train()`` and ``eval()`` mode alike.
  A Dropout whose ``training_mode`` input is true (or only known at run time) is refused: its
  result is random.
* Graph inputs and outputs must be tensors of a type torch computes with (no strings, no
  unsigned integers wider than 8 bits, no float8/int4): others are refused up front.
* Tensors the graph creates (from shapes, ConstantOfShape, Range) are made on the device of the
  tensor they derive from, so ``module.to("cuda")`` works. Every fx node records the ONNX node it
  came from in ``node.meta["onnx_node"]``.
* Ops are registered by ONNX op version (their schema's ``since_version`` at the model's
  opset): each handler lists the versions whose semantics it implements, and a version it does
  not list is refused up front, never run as an older version whose meaning differs.
* An op or op feature this module cannot express raises :class:`UnsupportedModelError` before
  any work is done (op types) or when the node is reached (features); the input is never changed.

Where things are: :mod:`~retrofit.onnx_path.to_torch.builder` (checks and the graph builder),
:mod:`~retrofit.onnx_path.to_torch.registry` (handlers by ``(op_type, since_version)``),
:mod:`~retrofit.onnx_path.to_torch.context` (what handlers share), one module per op family
(imported here, so the registry is complete whenever the package is), and
:mod:`~retrofit.onnx_path.to_torch.weights` (names and write-back).
"""

from retrofit.onnx_path.to_torch import (  # noqa: F401 - importing a family registers its ops
    activations,
    creation,
    elementwise,
    indexing,
    linear,
    normalization,
    padding,
    pooling,
    reduce,
    resize,
    shape_ops,
)
from retrofit.onnx_path.to_torch.registry import op_types

SUPPORTED_OPS: frozenset[str] = op_types()
"""ONNX op types (default domain) that ``builder.onnx_to_torch`` can run."""
