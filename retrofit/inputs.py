"""Sample inputs for verification: from the model file, or from shapes the user gives.

Parity checks and ``.pt2`` export need concrete inputs. A ``torch.export`` program carries its
own; a state dict or a pickled module does not, so the user names shapes
(``--input-shape 1,1,8,8``, ``name:1,3,224,224`` for a named ONNX input, ``2,16:int64`` or
``input_ids:2,16:int64`` for token ids) or gives a dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from retrofit.errors import BadInputError, UsageError

INPUT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "float64": torch.float64,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool,
}
"""The element types ``--input-shape`` accepts after a second colon."""

DEFAULT_INDEX_BOUND = 2
"""Integer sample inputs lie in ``[0, bound)``; without an embedding table to bound them, 0 and 1
only: in range for any index-like input (a table, a mask, a vocabulary of two or more)."""

EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


@dataclass(frozen=True)
class InputShape:
    """A shape for one model input; ``name`` is only needed for models with named inputs;
    ``dtype`` None means "not given": the model's own input type, else float32."""

    dims: tuple[int, ...]
    name: str | None = None
    dtype: torch.dtype | None = None

    @classmethod
    def parse(cls, text: str) -> "InputShape":
        """``"1,3,32,32"``, ``"image:1,3,32,32"``, ``"2,16:int64"`` or ``"ids:2,16:int64"``.

        Every size is a positive whole number: ``1,,3`` or ``1,3,`` is a typo, not ``1,3``."""
        head, _, last = text.rpartition(":")
        dtype = INPUT_DTYPES.get(last.strip().lower())
        if dtype is None and last.strip().lower() in ("float", "int", "long", "half", "double"):
            raise UsageError(f"--input-shape {text!r}: say the type in full, one of "
                             f"{', '.join(INPUT_DTYPES)}")
        body = head if dtype is not None else text
        name, _, dims_text = body.rpartition(":")
        parts = [part.strip() for part in dims_text.replace("x", ",").split(",")]
        if not all(part.isascii() and part.isdigit() and int(part) > 0 for part in parts):
            raise UsageError(f"--input-shape {text!r} must look like 1,3,32,32, name:1,3,32,32 "
                             f"or name:2,16:int64 (sizes above 0; types: "
                             f"{', '.join(INPUT_DTYPES)})")
        dims = tuple(int(part) for part in parts)
        affordable(f"--input-shape {text!r}", dims)
        return cls(dims, name.strip() or None, dtype)


MAX_SAMPLE_ELEMENTS = 2**28
"""Most elements one sample input may have (1 GiB of float32): a larger shape is refused in one
line before anything is allocated, instead of exhausting memory."""


def affordable(what: str, shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` when a sample input of it fits :data:`MAX_SAMPLE_ELEMENTS`; else
    :class:`BadInputError` naming ``what`` (a shape the model may take, but not one to run)."""
    elements = 1
    for size in shape:
        elements *= size
    if elements > MAX_SAMPLE_ELEMENTS:
        raise BadInputError(
            f"{what}: a sample input of shape {tuple(shape)} has {elements:,} elements, more "
            f"than the {MAX_SAMPLE_ELEMENTS:,} cadrelu allocates for one; give a smaller shape "
            "(a batch of 1 or 2 verifies as well)")
    return tuple(shape)


def assign_shapes(shapes: Sequence[InputShape], names: Sequence[str], model: object
                  ) -> dict[str, InputShape]:
    """Which of the model's inputs (``names``, in order) each ``--input-shape`` is for: the one
    it names, else the one at its own position. An unknown name, two shapes for one input, or
    more shapes than inputs are the command line's mistake (:class:`UsageError`)."""
    listed = ", ".join(names) or "none"
    assigned: dict[str, InputShape] = {}
    for position, shape in enumerate(shapes):
        if shape.name is not None and shape.name not in names:
            raise UsageError(f"--input-shape names {shape.name!r}, which is not an input of "
                             f"{model}; its inputs: {listed}")
        if shape.name is None and position >= len(names):
            raise UsageError(f"--input-shape is given {len(shapes)} times, but {model} takes "
                             f"{len(names)} input(s): {listed}")
        name = shape.name if shape.name is not None else names[position]
        if name in assigned:
            raise UsageError(f"two --input-shape for input {name!r} of {model}")
        assigned[name] = shape
    return assigned


def random_inputs(
    shapes: Sequence[InputShape], dtypes: Sequence[torch.dtype] | None = None, seed: int = 0,
    index_bound: int | Sequence[int] = DEFAULT_INDEX_BOUND,
) -> tuple[torch.Tensor, ...]:
    """Seeded inputs of the given shapes: standard normal for floating types, uniform in
    ``[0, bound)`` for integer types (token ids that stay inside an embedding table: pass
    :func:`embedding_bound` of the model, or one bound per input from :func:`table_bounds`),
    fair coin flips for bool. The type is ``dtypes[i]``, else the shape's own, else float32."""
    generator = torch.Generator().manual_seed(seed)
    chosen = list(dtypes) if dtypes else [shape.dtype or torch.float32 for shape in shapes]
    bounds = [index_bound] * len(shapes) if isinstance(index_bound, int) else list(index_bound)
    return tuple(_random_tensor(shape.dims, dtype, generator, bound)
                 for shape, dtype, bound in zip(shapes, chosen, bounds))


def _random_tensor(dims: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator,
                   index_bound: int) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, dims, generator=generator).bool()
    if dtype.is_floating_point:
        return torch.randn(dims, generator=generator).to(dtype)
    return torch.randint(0, max(1, index_bound), dims, generator=generator, dtype=dtype)


def embedding_bound(module: nn.Module) -> int:
    """The smallest embedding table of the model (``nn.Embedding``/``EmbeddingBag`` modules,
    ``aten.embedding`` in exported graphs): token ids below it index every table.
    :data:`DEFAULT_INDEX_BOUND` when the model has none."""
    sizes = [m.num_embeddings for m in module.modules() if isinstance(m, EMBEDDINGS)]
    for graph_module in module.modules():
        if isinstance(graph_module, torch.fx.GraphModule):
            sizes += [_table_rows(graph_module, node.args[0]) for node in graph_module.graph.nodes
                      if node.target is torch.ops.aten.embedding.default]
    sizes = [size for size in sizes if size]
    return min(sizes) if sizes else DEFAULT_INDEX_BOUND


def _table_rows(graph_module: torch.fx.GraphModule, weight: object) -> int:
    if not isinstance(weight, torch.fx.Node):
        return 0
    value = weight.meta.get("val")
    if value is None and weight.op == "get_attr":
        value = getattr(graph_module, str(weight.target), None)
    return int(value.shape[0]) if isinstance(value, torch.Tensor) and value.ndim else 0


def table_bounds(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[int]:
    """Per input, the rows of the smallest embedding table that input indexes, seen in one
    forward pass on ``inputs`` (an exported graph: its ``aten.embedding`` calls on a model
    input); :func:`embedding_bound` for inputs that index none.

    BERT's ``input_ids`` index a vocabulary of thousands, its ``token_type_ids`` a table of 2:
    the smallest table of the model would keep every sample token at 0 or 1.
    """
    fallback = embedding_bound(module)
    found: dict[int, int] = {}

    def note(index: int, rows: int) -> None:
        if rows:
            found[index] = min(rows, found.get(index, rows))

    for graph_module in module.modules():
        if isinstance(graph_module, torch.fx.GraphModule):
            placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
            for node in graph_module.graph.nodes:
                if node.target is torch.ops.aten.embedding.default and node.args[1] in placeholders:
                    note(placeholders.index(node.args[1]), _table_rows(graph_module, node.args[0]))

    def seen(table: nn.Module, args: tuple[object, ...]) -> None:
        for index, given in enumerate(inputs):
            if any(_holds_data_of(arg, given) for arg in args):
                note(index, table.num_embeddings)

    handles = [m.register_forward_pre_hook(seen) for m in module.modules()
               if isinstance(m, EMBEDDINGS)]
    try:
        with torch.no_grad():
            module(*inputs)
    except Exception:  # noqa: BLE001 - user code failing on these values: keep what was seen
        pass
    finally:
        for handle in handles:
            handle.remove()
    return [found.get(index, fallback) for index in range(len(inputs))]


def _holds_data_of(arg: object, given: torch.Tensor) -> bool:
    """``arg`` is the model input ``given`` or a view of it (``input_ids.view(-1, n)``, as OPT
    and GPT-2 write before their lookup): the same memory, reached without computing."""
    if not isinstance(arg, torch.Tensor) or arg.numel() == 0 or given.numel() == 0:
        return arg is given
    return arg.untyped_storage().data_ptr() == given.untyped_storage().data_ptr()


class _FedEmbedding(Exception):
    """Internal: an embedding was called on model input ``index`` (the probe stops there)."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


def _first_embedding_input(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int | None:
    def stop(_module: nn.Module, args: tuple[object, ...]) -> None:
        for index, given in enumerate(inputs):
            if any(_holds_data_of(arg, given) for arg in args):
                raise _FedEmbedding(index)

    handles = [m.register_forward_pre_hook(stop) for m in module.modules()
               if isinstance(m, EMBEDDINGS)]
    try:
        with torch.no_grad():
            module(*inputs)
    except _FedEmbedding as found:
        return found.index
    except Exception:  # noqa: BLE001 - user code failing on these values: no embedding reached
        return None
    finally:
        for handle in handles:
            handle.remove()
    return None


def embedding_inputs(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> set[int]:
    """The positions of the inputs that the model feeds straight into an ``nn.Embedding`` or
    ``EmbeddingBag``: they take token ids, whatever dtype ``inputs`` have.

    The model runs until its first lookup on an input (values of any dtype do: nothing computes
    on them before), that input becomes ids, and it runs again for the next. A model that fails
    before any lookup, or has no embedding module, takes no token ids as far as it can tell.
    """
    if not any(isinstance(m, EMBEDDINGS) for m in module.modules()):
        return set()
    bound = embedding_bound(module)
    found: set[int] = set()
    current = list(inputs)
    while (index := _first_embedding_input(module, tuple(current))) is not None:
        if index in found:
            break
        found.add(index)
        current[index] = current[index].long().clamp(0, bound - 1)
    return found
