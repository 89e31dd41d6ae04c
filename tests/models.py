"""Tiny models shared by the tests, each spelling ReLU in a way the rewrite must handle."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock pattern: one nn.ReLU module called at two places."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(), BasicBlock())
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(F.relu(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class AllSpellings(nn.Module):
    """Seven ReLU call sites, one of each spelling (and GELU/ReLU6/LeakyReLU, which are not)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.act = nn.ReLU()
        self.act_inplace = nn.ReLU(inplace=True)
        self.others = nn.Sequential(nn.GELU(), nn.ReLU6(), nn.LeakyReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.lin(x))
        x = self.act_inplace(self.lin(x))
        x = F.relu(self.lin(x))
        x = F.relu(self.lin(x), inplace=True)
        x = torch.relu(self.lin(x))
        x = self.lin(x).relu()
        x = self.lin(x).relu_()
        return self.others(self.lin(x))


class InplaceReadAgain(nn.Module):
    """An in-place ReLU whose input tensor is read again afterwards (aliasing matters)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        torch.relu_(h)
        return h * 2


class NoRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.ReLU6(), nn.LeakyReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DataDependent(nn.Module):
    """A forward fx cannot trace (control flow on a tensor value) with a ReLU child and a
    functional ReLU the rewrite cannot reach."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e9:
            x = F.relu(x)
        return self.act(self.lin(x))


class WithUntraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = DataDependent()
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.inner(x)))


class Encoder(nn.Module):
    """nn.TransformerEncoderLayer keeps its ReLU as the function F.relu in an attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(1))


def count_relu_calls(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Independent count of ReLU executions at the dispatcher (the ground truth for site counts)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.relu.default, torch.ops.aten.relu_.default):
                Counter.calls += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Counter():
        model(*inputs)
    return Counter.calls


class TokenEmbedding(nn.Module):
    """No ReLU, and a forward fx would specialise: traced with a Proxy for ``ids``, the
    ``ids is not None`` branch is kept and the other one dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(10, 6)

    def forward(self, ids: torch.Tensor | None = None,
                embeds: torch.Tensor | None = None) -> torch.Tensor:
        if ids is not None:
            embeds = self.table(ids)
        assert embeds is not None
        return embeds


class OptionalMask(nn.Module):
    """A functional ReLU in a forward with an optional argument (a trace would drop a branch)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = F.relu(self.lin(x))
        return h if mask is None else h * mask


class ModeDependent(nn.Module):
    """A functional ReLU next to ``training=self.training`` (a trace would fix the mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(F.relu(self.lin(x)), 0.5, training=self.training)


class TypeDependent(nn.Module):
    """A functional ReLU next to a type check of the argument (a Proxy while tracing)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, tuple):
            x = x[0]
        return F.relu(x)


class ReusedRelu(nn.Module):
    """Straight-line code calling one ReLU module twice: the traced copy is needed (two sites);
    ``spare`` is never called and must survive in the copy (same state dict)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.act = nn.ReLU()
        self.spare = nn.Linear(2, 2)
        self.register_buffer("scale", torch.tensor(2.0))
        self.offset = torch.tensor(0.5)  # a plain tensor attribute: not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(self.act(x))) * self.scale + self.offset


class Specialising(nn.Module):
    """Each way tracing silently specialises, next to a module that must be traced."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = TokenEmbedding()
        self.masked = OptionalMask()
        self.mode = ModeDependent()
        self.reused = ReusedRelu()
        self.typed = TypeDependent()
        self.head = nn.Sequential(nn.Linear(6, 3), nn.ReLU())

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(ids)
        x = self.masked(x, mask) if mask is not None else self.masked(x)
        return self.head(self.typed(self.reused(self.mode(x))))
