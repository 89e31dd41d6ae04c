"""What an ONNX ReLU site is and what it is called, and which opset it is read at, for every
ONNX module that looks for one.

The rewrite names each site it replaces, the ONNX->torch builder tags each ``torch.relu`` it
makes with the same name, and the fine-tune writes the trained parameters back into the rewritten
graph by that name: the three agree because they all ask this module.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import onnx

from retrofit.sites import unique_site_names

DEFAULT_DOMAINS = ("", "ai.onnx")
"""The two spellings of ONNX's default operator domain."""


def is_default_domain(domain: str) -> bool:
    return domain in DEFAULT_DOMAINS


def default_opset(opset_imports: Iterable[onnx.OperatorSetIdProto]) -> int | None:
    """The default-domain version among ``opset_imports`` (None when they import none): what
    an op's meaning, and so every site's emission and translation, depends on."""
    versions = [o.version for o in opset_imports if is_default_domain(o.domain)]
    return max(versions) if versions else None


def is_relu(node: onnx.NodeProto) -> bool:
    """A site: a default-domain ``Relu`` node."""
    return node.op_type == "Relu" and is_default_domain(node.domain)


def node_label(node: onnx.NodeProto, index: int) -> str:
    """A node's name in reports: its own name, else its first output, else its place."""
    return node.name or (node.output[0] if node.output else f"node_{index}")


def graph_site_names(nodes: Sequence[onnx.NodeProto], prefix: str = "") -> list[str]:
    """The site names of the ``Relu`` nodes among ``nodes`` (one graph scope), in order."""
    return unique_site_names([prefix + node_label(node, index)
                              for index, node in enumerate(nodes) if is_relu(node)])
