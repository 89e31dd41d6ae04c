"""``cadrelu``: parse options, call the library, print. Errors leave through :func:`_run` only.

Every :class:`~retrofit.errors.RetrofitError` becomes one line on stderr and its documented
exit code; anything unexpected becomes one "internal error" line and exit code 1 (set
``CADRELU_DEBUG=1`` to see the traceback).
"""

from __future__ import annotations

import os
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, Optional, TypeVar

import typer
from rich.console import Console

from retrofit.config import ActivationConfig, CompetitiveReLUConfig, MRePUConfig, RePUConfig
from retrofit.errors import ExitCode, RetrofitError
from retrofit.inputs import InputShape
from retrofit.job import RetrofitRequest, inspect_file, retrofit_file
from retrofit.report import print_report, report_to_json
from retrofit.sites import SiteSelector

app = typer.Typer(
    help="Retrofit trained ReLU networks: every ReLU becomes CompetitiveReLU (CAReLU) or MRePU.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
T = TypeVar("T")


class Activation(str, Enum):
    carelu = "carelu"
    mrepu = "mrepu"
    repu = "repu"


class Measure(str, Enum):
    energy = "energy"
    l1 = "l1"
    count = "count"


class Reduce(str, Enum):
    auto = "auto"
    sample = "sample"
    channel = "channel"
    last = "last"


def _run(job: Callable[[], T]) -> T:
    """Run a library call; turn its errors into one line and an exit code."""
    try:
        return job()
    except RetrofitError as error:
        err.print(f"[red]error:[/] {error}", highlight=False)
        raise typer.Exit(int(error.exit_code)) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    except Exception as error:  # a bug of ours: still one line unless debugging
        if os.environ.get("CADRELU_DEBUG"):
            raise
        first = (str(error).strip().splitlines() or [""])[0]
        err.print(f"[red]internal error:[/] {type(error).__name__}: {first} "
                  "(set CADRELU_DEBUG=1 for the traceback)", highlight=False)
        raise typer.Exit(int(ExitCode.INTERNAL)) from None


ModelArg = Annotated[Path, typer.Argument(help="Model file: .pt2, state dict/safetensors (with --arch), pickled module (with --trust-pickle) or ONNX; the format is read from the content.")]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="Architecture for a state dict: package.module:factory (a class or function returning the nn.Module).")]
TrustOpt = Annotated[bool, typer.Option("--trust-pickle", help="Allow loading a pickled nn.Module. Unpickling RUNS CODE stored in the file: use only for files you trust.")]
ShapeOpt = Annotated[Optional[list[str]], typer.Option("--input-shape", help="Shape of a sample input for verification, e.g. 1,3,32,32 (or name:1,3,32,32 for a named ONNX input); repeat for several inputs.")]
IncludeOpt = Annotated[Optional[list[str]], typer.Option("--include", help="Only sites matching this name, scope prefix or regex (repeatable). A rule matching nothing is an error.")]
ExcludeOpt = Annotated[Optional[list[str]], typer.Option("--exclude", help="Leave sites matching this name, scope prefix or regex as ReLU (repeatable). A rule matching nothing is an error.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout instead of the table.")]


def _config(to: Activation, measure: Measure, k: float, reduce: Reduce, p: float, c: float) -> ActivationConfig:
    try:
        if to is Activation.carelu:
            return CompetitiveReLUConfig(measure=measure.value, k=k, reduce=reduce.value)
        if to is Activation.mrepu:
            return MRePUConfig(p=p, c=c)
        return RePUConfig(p=p)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


def _request(model: Path, config: ActivationConfig, include: list[str] | None,
             exclude: list[str] | None, input_shape: list[str] | None, **fields: object) -> RetrofitRequest:
    return RetrofitRequest(
        model=model, config=config,
        select=SiteSelector(tuple(include or ()), tuple(exclude or ())),
        input_shapes=tuple(InputShape.parse(text) for text in input_shape or ()),
        **fields,  # type: ignore[arg-type]
    )


@app.command()
def retrofit(
    model: ModelArg,
    to: Annotated[Activation, typer.Option("--to", help="The activation that replaces ReLU.")] = Activation.carelu,
    measure: Annotated[Measure, typer.Option(help="CAReLU competition measure: energy share, L1 share or count share of the positive side.")] = Measure.energy,
    k: Annotated[float, typer.Option("--k", help="CAReLU scale bound K (> 1).")] = 2.0,
    reduce: Annotated[Reduce, typer.Option(help="CAReLU competition axes: auto (last axis for 3-D sequences, whole sample otherwise), sample, channel or last.")] = Reduce.auto,
    p: Annotated[float, typer.Option("--p", help="MRePU/RePU power p (> 1).")] = 2.0,
    c: Annotated[float, typer.Option("--c", help="MRePU shift c.")] = 1.0,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Where to write the retrofitted model (default: MODEL.<activation>.<suffix> beside the input).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    input_shape: ShapeOpt = None,
    tolerance: Annotated[float, typer.Option(help="Largest output difference, relative to the output scale, allowed for an identity-initialised retrofit.")] = 1e-5,
    seed: Annotated[int, typer.Option(help="Seed for sample inputs.")] = 0,
    json: JsonOpt = False,
) -> None:
    """Rewrite every selected ReLU site, verify the result and save it beside the input."""
    config = _config(to, measure, k, reduce, p, c)
    request = _run(lambda: _request(model, config, include, exclude, input_shape, output=output,
                                    force=force, arch=arch, trust_pickle=trust_pickle,
                                    tolerance=tolerance, seed=seed))
    report = _run(lambda: retrofit_file(request))
    if json:
        print(report_to_json(report))
    else:
        print_report(report, out)


@app.command()
def inspect(
    model: ModelArg,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    input_shape: ShapeOpt = None,
    json: JsonOpt = False,
) -> None:
    """List every ReLU site and whether a retrofit would replace it (a dry run: writes nothing)."""
    request = _run(lambda: _request(model, CompetitiveReLUConfig(), include, exclude, input_shape,
                                    arch=arch, trust_pickle=trust_pickle))
    report = _run(lambda: inspect_file(request))
    if json:
        print(report_to_json(report))
    else:
        print_report(report, out, dry_run=True)


def main() -> None:
    """Console-script entry point."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
    sys.exit(app())


if __name__ == "__main__":
    main()
