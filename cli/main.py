"""``cadrelu``: parse options, call the library, print. Errors leave through :func:`_run` only.

Every :class:`~retrofit.errors.RetrofitError` becomes one line on stderr and its documented
exit code; anything unexpected becomes one "internal error" line and exit code 1 (set
``CADRELU_DEBUG=1`` to see the traceback). Click's own usage errors (an unknown option, a bad
choice) are one line and exit code 2 too (:class:`_OneLineErrors`). The console script starts
in :mod:`cadrelu.entry`, which catches Ctrl-C and SIGTERM before this module's imports run.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, NoReturn, Optional, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from cadrelu.entry import interrupted_line
from retrofit.config import MEASURES, ActivationName, Measure, MRePUConfig, Reduction
from retrofit.errors import ExitCode, RetrofitError, first_line
from retrofit.pipeline.compare import COMPARED, compare_file
from retrofit.pipeline.compare_report import compare_to_json, compare_to_markdown, print_compare
from retrofit.pipeline.job import evaluate_file, inspect_file, retrofit_file
from retrofit.pipeline.options import (
    compare_request, data_options, inspect_request, retrofit_request,
)
from retrofit.pipeline.report import (
    evaluation_to_json, print_evaluation, print_report, publish_markdown, report_to_json,
    report_to_markdown,
)
from retrofit.torch_path.arch import parse_arch_kwargs
from retrofit.training.distributed import is_main_process
from retrofit.training.launch import launch, prints_errors, record_failure, worker_argv
from retrofit.training.config import AmpMode, OptimizerName
from retrofit.training.config import FinetuneConfig

try:  # Typer 0.2x vendors Click, and raises its own copy's exceptions
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors

class _PipeConsole(Console):
    """stdout for reports. A reader that leaves (`cadrelu ... | head`) does not stop the job:
    the rest of the report goes to /dev/null (rich's own handler exits with 1, a bug code)."""

    def on_broken_pipe(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        self.quiet = True


out = _PipeConsole(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True, emoji=False)  # messages quote paths and user text
T = TypeVar("T")


def _error(message: object, prefix: str = "error: ") -> str:
    """Print one line on stderr as it is (no markup), from rank 0 only unless a launcher
    reports for the workers: under torchrun every rank fails alike, and one line is what the
    caller reads. Returns the line."""
    line = " ".join(str(message).split())
    if prints_errors():
        err.print(Text.assemble((prefix, "red"), line), highlight=False)
    return prefix + line


class _OneLineErrors(typer.core.TyperGroup):
    """Click's usage errors (unknown option, bad choice, missing argument) as one line and exit
    code 2, like every other error, instead of Typer's box of usage and help text."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click_errors.NoArgsIsHelpError as no_args:
            no_args.show()  # no command at all: the help is the answer
            code = no_args.exit_code
        except click_errors.UsageError as error:
            command = error.ctx.command_path if error.ctx else "cadrelu"
            message = error.format_message().replace(": Value error, ", ": ")  # pydantic's prefix
            _error(f"{message} (see {command} --help)")
            code = ExitCode.USAGE
        except click_errors.ClickException as error:
            _error(error.format_message())
            code = error.exit_code
        except typer.Abort:
            _error("interrupted", prefix="")
            code = ExitCode.INTERRUPTED
        code = int(code or 0)
        if not standalone_mode:
            return code
        sys.exit(code)


app = typer.Typer(
    cls=_OneLineErrors,
    help="Retrofit trained ReLU networks: every ReLU becomes CompetitiveReLU (CAReLU) or MRePU.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _run(job: Callable[[], T]) -> T:
    """Run a library call; turn its errors into one line and an exit code."""
    try:
        return job()
    except RetrofitError as error:
        _fail(error.exit_code, error)
    except KeyboardInterrupt as interrupt:
        _fail(ExitCode.INTERRUPTED, interrupted_line(interrupt), prefix="")
    except typer.Exit:
        raise
    except Exception as error:  # a bug of ours: still one line unless debugging
        if os.environ.get("CADRELU_DEBUG"):
            raise
        _fail(ExitCode.INTERNAL, f"{first_line(error, typed=True)} "
              "(set CADRELU_DEBUG=1 for the traceback)", prefix="internal error: ")


def _fail(code: int, message: object, prefix: str = "error: ") -> NoReturn:
    """Leave with ``code`` after one line: printed by rank 0 only, and recorded for a launcher
    to print instead (:mod:`retrofit.training.launch`), so N processes still say it once."""
    line = _error(message, prefix)
    record_failure(line, code)
    raise typer.Exit(int(code)) from None


def _given(ctx: typer.Context) -> set[str]:
    """The options the user set (on the command line or through the environment): an option
    left at its default cannot contradict anything."""
    return {name for name in ctx.params
            if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in _DEFAULTS}


_DEFAULTS = ("DEFAULT", "DEFAULT_MAP")  # click's ParameterSource names for "not set by the user"


ModelArg = Annotated[Path, typer.Argument(help="Model file: .pt2, state dict/safetensors (with --arch), pickled module (with --trust-pickle) or ONNX; the format is read from the content.")]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="Architecture for a state dict: package.module:factory (a class or function returning the nn.Module).")]
ArchKwargsOpt = Annotated[Optional[list[str]], typer.Option("--arch-kwargs", help="Keyword argument for the --arch factory, name=value, the value read as a Python literal (else as text); repeatable, e.g. --arch-kwargs num_classes=10.")]
TrustOpt = Annotated[bool, typer.Option("--trust-pickle", help="Allow loading a pickled nn.Module. Unpickling RUNS CODE stored in the file: use only for files you trust.")]
ShapeOpt = Annotated[Optional[list[str]], typer.Option("--input-shape", help="Shape of a sample input for verification, e.g. 1,3,32,32 (or name:1,3,32,32 for a named ONNX input), with an optional type: 2,16:int64 or input_ids:2,16:int64 for token ids (float32 default, float16, float64, bfloat16, int64, int32, bool); repeat for several inputs.")]
IncludeOpt = Annotated[Optional[list[str]], typer.Option("--include", help="Only sites matching this name, scope prefix or regex (repeatable). A rule matching nothing is an error.")]
ExcludeOpt = Annotated[Optional[list[str]], typer.Option("--exclude", help="Leave sites matching this name, scope prefix or regex as ReLU (repeatable). A rule matching nothing is an error.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout instead of the table.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when there is a GPU), cpu or cuda.")]
DATA = "Data"
FINETUNE = "Fine-tuning"
TRAINING = FinetuneConfig()  # the fine-tuning options' defaults are the library's
CI = "CI gates and reports"
DataOpt = Annotated[Optional[Path], typer.Option("--data", help="Validation data: an image folder (one sub-folder per class), .npz/.pt with x and y, or CSV. Accuracy is scored on it before and after.", rich_help_panel=DATA)]
ImageSizeOpt = Annotated[Optional[int], typer.Option("--image-size", help="Resize images' shorter side to this many pixels (default: native size).", rich_help_panel=DATA)]
CropOpt = Annotated[Optional[int], typer.Option("--crop-size", help="Centre-crop images to this square size (default: --image-size).", rich_help_panel=DATA)]
MeanOpt = Annotated[Optional[str], typer.Option("--mean", help="Per-channel mean to subtract, e.g. 0.485,0.456,0.406 (default 0).", rich_help_panel=DATA)]
StdOpt = Annotated[Optional[str], typer.Option("--std", help="Per-channel std to divide by, e.g. 0.229,0.224,0.225 (default 1).", rich_help_panel=DATA)]
LabelOpt = Annotated[Optional[str], typer.Option("--label-column", help="CSV column holding the label (default: label/target/class/y, else the last).", rich_help_panel=DATA)]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Batch size for scoring and fine-tuning.", rich_help_panel=DATA)]
KOpt = Annotated[float, typer.Option("--k", help="CAReLU scale bound K (> 1).")]
ReduceOpt = Annotated[Reduction, typer.Option(help="CAReLU competition axes: auto (last axis for 3-D sequences, whole sample otherwise), sample, channel or last.")]
POpt = Annotated[float, typer.Option("--p", help="MRePU/RePU power p (> 1).")]
COpt = Annotated[float, typer.Option("--c", help="MRePU shift c.")]
ToleranceOpt = Annotated[float, typer.Option(help="Largest output difference, relative to the output scale, allowed for an identity-initialised retrofit and for ONNX vs torch.")]
FinetuneOpt = Annotated[Optional[Path], typer.Option("--finetune", help="Training data to fine-tune on (same formats as --data); without --data a validation split is taken from it.", rich_help_panel=FINETUNE)]
EpochsOpt = Annotated[int, typer.Option(help="Fine-tuning epochs.", rich_help_panel=FINETUNE)]
OptimizerOpt = Annotated[OptimizerName, typer.Option(help="Optimizer.", rich_help_panel=FINETUNE)]
LrOpt = Annotated[float, typer.Option(help="Learning rate of the network's weights.", rich_help_panel=FINETUNE)]
ActivationLrOpt = Annotated[float, typer.Option(help="Learning rate of the new activation parameters.", rich_help_panel=FINETUNE)]
WeightDecayOpt = Annotated[float, typer.Option(help="Weight decay (not applied to activation parameters, biases and norms).", rich_help_panel=FINETUNE)]
WarmupOpt = Annotated[float, typer.Option(help="Fraction of steps spent in linear warm-up before the cosine decay.", rich_help_panel=FINETUNE)]
GradClipOpt = Annotated[float, typer.Option(help="Clip the gradient norm to this value (0: off).", rich_help_panel=FINETUNE)]
BlendRampOpt = Annotated[float, typer.Option(help="MRePU: ramp the blend from ReLU (0) to MRePU (1) over this fraction of the steps (default 0: the calibrated MRePU from the first step).", rich_help_panel=FINETUNE)]
AmpOpt = Annotated[AmpMode, typer.Option(help="Mixed precision: auto (bf16 on GPU, off on CPU), bf16 or off.", rich_help_panel=FINETUNE)]
DeterministicOpt = Annotated[bool, typer.Option(help="Deterministic algorithms (slower on GPU).", rich_help_panel=FINETUNE)]
ValFractionOpt = Annotated[float, typer.Option(help="Validation fraction split off --finetune when no --data is given.", rich_help_panel=FINETUNE)]
NprocOpt = Annotated[Optional[int], typer.Option("--nproc-per-node", help="Fine-tune in N local processes (one GPU each, or N CPU processes), started and watched by cadrelu: the exit code is the documented one and one line says why (torchrun reports every failure as 1).", rich_help_panel=FINETUNE)]
MaxDropOpt = Annotated[Optional[float], typer.Option("--max-drop", help="Fail (exit 5) when the final top-1 is more than this many points below the original's (compare: the top-ranked candidate's mean).", rich_help_panel=CI)]
MinGainOpt = Annotated[Optional[float], typer.Option("--min-gain", help="Fail (exit 5) unless the final top-1 gains at least this many points (compare: the top-ranked candidate's mean).", rich_help_panel=CI)]
MarkdownOpt = Annotated[Optional[Path], typer.Option("--markdown", help="Write a Markdown report here (also appended to $GITHUB_STEP_SUMMARY when set).", rich_help_panel=CI)]


@app.command()
def retrofit(
    ctx: typer.Context,
    model: ModelArg,
    to: Annotated[ActivationName, typer.Option("--to", help="The activation that replaces ReLU.")] = "carelu",
    measure: Annotated[Measure, typer.Option(help="CAReLU competition measure: energy share, L1 share or count share of the positive side.")] = "energy",
    k: KOpt = 2.0,
    reduce: ReduceOpt = "auto",
    p: POpt = 2.0,
    c: COpt = 1.0,
    calibrate: Annotated[bool, typer.Option("--calibrate/--no-calibrate", help="MRePU: fit each site's input and output gains to the ReLU it replaces, on the data (the calibrated swap); --no-calibrate swaps in the paper's plain MRePU.")] = True,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Where to write the retrofitted model (default: MODEL.<activation>.<suffix> beside the input).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing output files.")] = False,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False,
    input_shape: ShapeOpt = None,
    tolerance: ToleranceOpt = 1e-5,
    seed: Annotated[int, typer.Option(help="Seed for sample inputs, data splits and fine-tuning.")] = 0,
    device: DeviceOpt = "auto",
    export_onnx: Annotated[Optional[Path], typer.Option("--export-onnx", help="Also write the retrofitted model as ONNX, checked against onnxruntime.")] = None,
    onnx_functions: Annotated[bool, typer.Option("--onnx-functions", help="ONNX input: emit each activation as a model-local function instead of inlined nodes.")] = False,
    data: DataOpt = None,
    finetune: FinetuneOpt = None,
    epochs: EpochsOpt = TRAINING.epochs,
    optimizer: OptimizerOpt = "adamw",
    lr: LrOpt = TRAINING.lr,
    activation_lr: ActivationLrOpt = TRAINING.activation_lr,
    weight_decay: WeightDecayOpt = TRAINING.weight_decay,
    warmup: WarmupOpt = TRAINING.warmup_fraction,
    grad_clip: GradClipOpt = TRAINING.grad_clip,
    blend_ramp: BlendRampOpt = MRePUConfig().ramp_fraction,
    amp: AmpOpt = "auto",
    deterministic: DeterministicOpt = False,
    checkpoint: Annotated[Optional[Path], typer.Option(help="Checkpoint file written each epoch and on Ctrl-C (default: OUTPUT.ckpt).", rich_help_panel=FINETUNE)] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted fine-tune from its checkpoint.", rich_help_panel=FINETUNE)] = False,
    control: Annotated[bool, typer.Option(help="Also fine-tune an untouched ReLU copy with the same budget and seed, to separate the activation's effect from more training.", rich_help_panel=FINETUNE)] = False,
    val_fraction: ValFractionOpt = 0.2,
    plot: Annotated[Optional[Path], typer.Option(help="Save training curves and activation-parameter trajectories as PNG.", rich_help_panel=FINETUNE)] = None,
    image_size: ImageSizeOpt = None,
    crop_size: CropOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    label_column: LabelOpt = None,
    batch_size: BatchOpt = 64,
    max_drop: MaxDropOpt = None,
    min_gain: MinGainOpt = None,
    markdown: MarkdownOpt = None,
    json: JsonOpt = False,
    nproc_per_node: NprocOpt = None,
) -> None:
    """Rewrite every selected ReLU site, verify, optionally fine-tune, score and save."""
    job = _run(lambda: retrofit_request(ctx.params, _given(ctx)))
    if nproc_per_node is not None:
        _launch(nproc_per_node, fine_tunes=job.finetune is not None)
    report = _run(lambda: retrofit_file(job))
    if is_main_process():
        _run(lambda: _show(report, report_to_json, print_report, report_to_markdown, json,
                           markdown))
    _run(report.raise_for_outcome)


def _launch(nproc_per_node: int, *, fine_tunes: bool) -> NoReturn:
    """Run this command in ``nproc_per_node`` workers (without the option) and leave with
    their exit code and line."""
    outcome = _run(lambda: launch(worker_argv(sys.argv[1:]), nproc_per_node,
                                  fine_tunes=fine_tunes))
    if outcome.line:
        err.print(outcome.line, highlight=False, markup=False)
    raise typer.Exit(outcome.code)


R = TypeVar("R")


def _show(report: R, as_json: Callable[[R], str], view: Callable[[R, Console], None],
          as_markdown: Callable[[R], str], json: bool, markdown: Path | None) -> None:
    """The report on stdout, as JSON or as the view (a reader that closed the pipe does not
    stop the job), then the Markdown report and the CI step summary."""
    try:
        if json:
            print(as_json(report))
        else:
            view(report, out)
        sys.stdout.flush()
    except BrokenPipeError:  # `cadrelu ... | head`: the rest of stdout goes nowhere
        sys.stdout = open(os.devnull, "w")
    publish_markdown(as_markdown(report), markdown)


@app.command()
def inspect(
    ctx: typer.Context,
    model: ModelArg,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False,
    input_shape: ShapeOpt = None,
    json: JsonOpt = False,
) -> None:
    """List every ReLU site and whether a retrofit would replace it (a dry run: writes nothing)."""
    request = _run(lambda: inspect_request(ctx.params))
    report = _run(lambda: inspect_file(request))
    if json:
        print(report_to_json(report))
    else:
        print_report(report, out, dry_run=True)


@app.command()
def evaluate(
    ctx: typer.Context,
    model: ModelArg,
    data: Annotated[Path, typer.Option("--data", help="Labelled data: an image folder, .npz/.pt with x and y, or CSV.")],
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False,
    device: DeviceOpt = "auto",
    image_size: ImageSizeOpt = None,
    crop_size: CropOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    label_column: LabelOpt = None,
    batch_size: BatchOpt = 256,
    json: JsonOpt = False,
) -> None:
    """Top-1 (and top-5) accuracy of any supported model on a dataset."""
    options = ctx.params
    report = _run(lambda: evaluate_file(model, data_options(options), arch=arch,
                                        arch_kwargs=parse_arch_kwargs(arch_kwargs or ()),
                                        trust_pickle=trust_pickle, device=device))
    if json:
        print(evaluation_to_json(report))
    else:
        print_evaluation(report, out)


@app.command(epilog=(
    "Every candidate and the ReLU control are fine-tuned with the same budget and seeds; the "
    "candidates are ranked by their mean top-1 change against the control, with a 95% interval "
    "paired over samples and seeds. No model is written (retrofit the winner with cadrelu "
    "retrofit). A candidate whose fine-tune diverges or whose model computes NaN/inf is "
    "reported first as failed and not ranked. Exit code 0 once ranked; 5 when a gate fails "
    "(the gates apply to the top-ranked candidate); when nothing could be ranked, the first "
    "failure's code (3 diverged, 4 NaN/inf)."))
def compare(
    ctx: typer.Context,
    model: ModelArg,
    to: Annotated[Optional[list[str]], typer.Option("--to", help=f"Activations to try against the ReLU control: {', '.join(COMPARED)} (repeatable or comma-separated; default: both). CAReLU gives one candidate per --measures, MRePU is the calibrated swap.")] = None,
    measures: Annotated[Optional[list[str]], typer.Option("--measures", help=f"CAReLU competition measures, one candidate each: {', '.join(MEASURES)} (repeatable or comma-separated; default: all).")] = None,
    seeds: Annotated[Optional[list[str]], typer.Option("--seeds", help="Seeds: every arm is fine-tuned once with each, the control with the same (repeatable or comma-separated, e.g. 0,1,2; default 0). A validation split off --finetune uses the first.")] = None,
    k: KOpt = 2.0,
    reduce: ReduceOpt = "auto",
    p: POpt = 2.0,
    c: COpt = 1.0,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False,
    input_shape: ShapeOpt = None,
    tolerance: ToleranceOpt = 1e-5,
    device: DeviceOpt = "auto",
    data: DataOpt = None,
    finetune: FinetuneOpt = None,
    epochs: EpochsOpt = TRAINING.epochs,
    optimizer: OptimizerOpt = "adamw",
    lr: LrOpt = TRAINING.lr,
    activation_lr: ActivationLrOpt = TRAINING.activation_lr,
    weight_decay: WeightDecayOpt = TRAINING.weight_decay,
    warmup: WarmupOpt = TRAINING.warmup_fraction,
    grad_clip: GradClipOpt = TRAINING.grad_clip,
    blend_ramp: BlendRampOpt = MRePUConfig().ramp_fraction,
    amp: AmpOpt = "auto",
    deterministic: DeterministicOpt = False,
    val_fraction: ValFractionOpt = 0.2,
    out_dir: Annotated[Optional[Path], typer.Option("--out-dir", help="Folder for each run's checkpoint and the state file that records finished runs (default: MODEL_STEM.compare beside the model).", rich_help_panel=FINETUNE)] = None,
    resume: Annotated[bool, typer.Option(help="Go on with the comparison in --out-dir: recorded runs are read back, the interrupted one continues from its checkpoint, the rest run.", rich_help_panel=FINETUNE)] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace existing --markdown/--plot files; without --resume, discard an earlier comparison in --out-dir.")] = False,
    image_size: ImageSizeOpt = None,
    crop_size: CropOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    label_column: LabelOpt = None,
    batch_size: BatchOpt = 64,
    max_drop: MaxDropOpt = None,
    min_gain: MinGainOpt = None,
    markdown: MarkdownOpt = None,
    plot: Annotated[Optional[Path], typer.Option(help="Save a bar chart of each ranked candidate's Δ top-1 vs the control, with its 95% CI, as PNG.", rich_help_panel=CI)] = None,
    json: JsonOpt = False,
    nproc_per_node: NprocOpt = None,
) -> None:
    """Which activation helps this model? Rank every candidate against a ReLU control."""
    job = _run(lambda: compare_request(ctx.params, _given(ctx)))
    if nproc_per_node is not None:
        _launch(nproc_per_node, fine_tunes=True)
    report = _run(lambda: compare_file(job))
    if is_main_process():
        _run(lambda: _show(report, compare_to_json, print_compare, compare_to_markdown, json,
                           markdown))
    _run(report.raise_for_outcome)


def run(args: list[str] | None = None) -> int:
    """Run the command line (``sys.argv`` by default) and return its exit code."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
    return app(args=args, prog_name="cadrelu", standalone_mode=False)

