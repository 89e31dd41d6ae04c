"""The site model shared by the torch and ONNX rewrites: what a ReLU site is, how sites are
named, how include/exclude rules select them, and what a rewrite returns.

A *site* is one place where the model computes ReLU: one call of an ``nn.ReLU`` module (a module
called twice is two sites), one functional call, or one ONNX ``Relu`` node.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Generic, Iterable, Sequence, TypeVar

from retrofit.errors import SelectionError

ModelT = TypeVar("ModelT")


@dataclass(frozen=True)
class ReluSite:
    """One ReLU site and what the rewrite did with it.

    ``name`` is unique within the model and is what include/exclude rules match;
    ``kind`` is how the model spells ReLU there (``nn.ReLU``, ``F.relu``, ``aten.relu``,
    ``onnx.Relu`` ...); ``owner`` is the module or graph scope it sits in;
    ``replaced`` says whether it now computes the new activation, and ``reason`` why not
    (or a remark when it was); ``parameters`` names its new trainable values as they appear in
    the saved model (state-dict keys or ONNX initializer names).
    """

    name: str
    kind: str
    owner: str
    replaced: bool = False
    reason: str = ""
    parameters: tuple[str, ...] = ()


def unique_site_names(base_names: Sequence[str]) -> list[str]:
    """Give every site a unique name: a base seen more than once becomes ``base#1``, ``base#2``...

    Numbering follows the order given (graph order), so names are stable for a given model.
    """
    totals = Counter(base_names)
    seen: Counter[str] = Counter()
    names = []
    for base in base_names:
        if totals[base] == 1:
            names.append(base)
        else:
            seen[base] += 1
            names.append(f"{base}#{seen[base]}")
    return names


def no_site_message(searched: str, others: Counter[str]) -> str:
    """The error for a model with nothing to rewrite: what was searched for, and which other
    activations were found and left alone (ReLU6, GELU... are other functions)."""
    if others:
        ranked = sorted(others.items(), key=lambda item: (-item[1], item[0]))
        listed = ", ".join(f"{count} {kind}" for kind, count in ranked)
        found = f"found and left alone: {listed}"
    else:
        found = "it holds no other activation either"
    return f"no ReLU site to replace ({searched} were searched); {found}"


def _rule_matches(rule: str, name: str) -> bool:
    """A rule matches a site by exact name, as a scope prefix, or as a full regular expression."""
    if name == rule or name.startswith((rule + ".", rule + "#", rule + "/")):
        return True
    try:
        return re.fullmatch(rule, name) is not None
    except re.error:
        return False


def _regex_problem(rule: str) -> str:
    """Why ``rule`` is no regular expression (empty when it is one): a rule that matches no
    name and does not compile is most likely a mistyped pattern."""
    try:
        re.compile(rule)
    except re.error as error:
        return f" (not a valid regular expression: {error})"
    return ""


@dataclass(frozen=True)
class SiteSelector:
    """Which sites to replace: all by default; ``include`` narrows, ``exclude`` removes.

    Selection is strict: a rule that matches no site raises :class:`SelectionError`, because a
    typo in a CI pipeline must not silently change nothing.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for rule in (*self.include, *self.exclude):
            if not rule:
                raise SelectionError("an include/exclude rule is empty")

    def select(self, names: Iterable[str]) -> dict[str, str]:
        """Map every name to ``""`` when selected, or to the reason it is not."""
        names = list(names)
        unmatched = [
            rule
            for rule in (*self.include, *self.exclude)
            if not any(_rule_matches(rule, name) for name in names)
        ]
        if unmatched:
            listed = ", ".join(f"{rule!r}{_regex_problem(rule)}" for rule in unmatched)
            raise SelectionError(
                f"selection rule(s) {listed} match no ReLU site; "
                "run `cadrelu inspect` to list the site names"
            )
        decisions = {}
        for name in names:
            if self.include and not any(_rule_matches(rule, name) for rule in self.include):
                decisions[name] = "not included"
            elif any(_rule_matches(rule, name) for rule in self.exclude):
                decisions[name] = "excluded"
            else:
                decisions[name] = ""
        return decisions


@dataclass
class RetrofitResult(Generic[ModelT]):
    """What a rewrite returns: the new model, every site found, and remarks for the user.

    ``notes`` holds what the user must know but is not an error: places the rewrite could not
    reach, parameters shared because a module could not be traced, opset conversions.
    """

    model: ModelT
    sites: list[ReluSite]
    activation: str
    notes: list[str] = field(default_factory=list)

    @property
    def replaced(self) -> list[ReluSite]:
        """The sites that now compute the new activation."""
        return [site for site in self.sites if site.replaced]

    @property
    def kept(self) -> list[ReluSite]:
        """The sites left as ReLU, each with its reason."""
        return [site for site in self.sites if not site.replaced]
