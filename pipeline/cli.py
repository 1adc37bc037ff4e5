"""The `hepreg` command line: thin wrappers that load the config and call one stage each.

Stages are imported inside each command so that `hepreg --help` stays fast and a stage never pays for
another's imports.
"""
from __future__ import annotations

import errno
import sys
import typing
from pathlib import Path
from importlib.metadata import PackageNotFoundError, version
from typing import Optional

import typer
from rich.text import Text

from hepreg.config import load_config
from hepreg.settings import Config, Device, EmbedDtype, HeadTrainSource, PredictSource, Split
from hepreg.errors import ConfigError, HepregError
from hepreg.runs.outputs import find_run_config
from hepreg.runs.progress import console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cached-embedding two-stage training for muon-spectrometer track reconstruction.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and check an embedding cache.")
app.add_typer(cache_app, name="cache")

_state = {"debug": False}


def choices(tp: typing.Any) -> str:
    """The values of a `Literal` of the config as an option's metavar: --help shows the choices declared there."""
    return "|".join(typing.get_args(tp))


def check_choice(value: str | None, tp: typing.Any, option: str) -> None:
    """An option that is no config value (the config loader checks those), against its `Literal`."""
    if value is not None and value not in typing.get_args(tp):
        raise ConfigError(f"{option} {value!r} is not one of the valid choices: {', '.join(typing.get_args(tp))}")


# Options shared by several commands: declared once here.
ConfigOpt = typer.Option(None, "--config", "-c",
                         help="YAML run config (see configs/); default: the config saved in the run's folder.")
SetOpt = typer.Option(None, "--set", help="Dotted override, e.g. --set head.hidden_dim=256 (repeatable).")
PrintOpt = typer.Option(False, "--print-config", help="Print the resolved config and exit.")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace the results of an earlier run of this stage (kept "
                                                        "until the new ones are complete).")
CheckpointOpt = typer.Option(None, "--checkpoint", help="Stage-1 checkpoint (default assign/best.pt).")
HeadOpt = typer.Option(None, "--head", help="Head checkpoint (default head/best.pt; a sweep member's best.pt by "
                                            "path).")
SplitOpt = typer.Option(None, "--split", metavar=choices(Split), help="Split of the config's dataset (default: "
                                                                      "eval.split).")


def resume_opt(stage: str) -> typing.Any:
    """--resume of a training stage, continuing `<stage>/last.pt`."""
    return typer.Option(False, "--resume", help=f"Continue from {stage}/last.pt (more epochs allowed).")


ModelOpt = typer.Option(None, "--model", help="A fine-tuned model: stage 1 and head in one checkpoint "
                                              "(`hepreg finetune`'s finetune/best.pt).")


def _config(path: Optional[Path], overrides: Optional[list[str]], print_config: bool,
            saved_in: tuple[str, ...] = ("head", "assign")) -> Config:
    """The resolved config: `-c` file, else the one an earlier stage saved in the run's folder, then `--set`.

    Without either it is an error rather than a silent run on built-in defaults (`--print-config` shows them).
    """
    if path is None and not print_config:
        named = load_config(None, overrides or [])  # only for the run's name and folder
        path = find_run_config(named, saved_in)
        if path is None:
            looked = ", ".join(str(named.run_path / s) for s in saved_in)
            raise ConfigError(f"no config given: pass -c FILE (e.g. configs/demo.yaml), or name a run whose folder "
                              f"holds a saved config.yaml (looked in {looked})")
        console.print(f"config: {path} (no -c given)", highlight=False)
    cfg = load_config(path, overrides or [])
    if print_config:
        typer.echo(cfg.to_yaml())
        raise typer.Exit(0)
    return cfg


def _version(value: bool) -> None:
    if value:
        try:
            typer.echo(f"hepreg {version('hepreg')}")
        except PackageNotFoundError:
            typer.echo("hepreg (not installed)")
        raise typer.Exit(0)


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for user errors (anywhere on the "
                                                             "command line)."),
          _: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit.")) -> None:
    _state["debug"] = _state["debug"] or debug


@app.command()
def generate(
    out: Path = typer.Argument(..., help="Output dataset directory (written atomically)."),
    events: int = typer.Option(100_000, "--events", "-n", help="Number of events."),
    seed: int = typer.Option(1, "--seed", help="Random seed; same seed, byte-identical arrays."),
    preset: str = typer.Option("default", "--preset", help="default (high occupancy) | light (quick CPU demos)."),
    noise_mean: Optional[float] = typer.Option(None, "--noise-mean", help="Mean background hits per event."),
    max_tracks: Optional[int] = typer.Option(None, "--max-tracks", help="Muons per event: 1..max_tracks."),
    pt_min: Optional[float] = typer.Option(None, "--pt-min", help="Minimum muon pT [GeV]."),
    pt_max: Optional[float] = typer.Option(None, "--pt-max", help="Maximum muon pT [GeV]."),
    eta_max: Optional[float] = typer.Option(None, "--eta-max", help="Maximum |eta| of the muons."),
    events_per_file: Optional[int] = typer.Option(None, "--events-per-file", help="Events per HDF5 chunk file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dataset directory."),
) -> None:
    """Write a synthetic dataset from the toy spectrometer, in the ATLAS-muon HDF5 layout."""
    from hepreg.data.synthetic import generate as run

    run(out, events=events, seed=seed, preset=preset, noise_mean=noise_mean, max_tracks=max_tracks,
        pt_min=pt_min, pt_max=pt_max, eta_max=eta_max, events_per_file=events_per_file, overwrite=overwrite)


@app.command("reference-fit")
def reference_fit(
    data: Path = typer.Argument(..., help="Dataset directory."),
    max_events: Optional[int] = typer.Option(None, "--max-events", help="Fit only the first N events."),
) -> None:
    """Classical least-squares fit on truth-assigned hits: the resolution limit for the head."""
    from hepreg.evaluation.reference_fit import run

    run(data, max_events=max_events)


@app.command("train-assign")
def train_assign(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = SetOpt,
                 print_config: bool = PrintOpt,
                 resume: bool = resume_opt("assign"), overwrite: bool = OverwriteOpt) -> None:
    """Stage 1: train the MaskFormer assignment model."""
    cfg = _config(config, overrides, print_config, ("assign",))
    from hepreg.stages.train_assign import run

    run(cfg, resume=resume, overwrite=overwrite)


@app.command("export-embeddings")
def export_embeddings(
    config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = SetOpt, print_config: bool = PrintOpt,
    checkpoint: Optional[Path] = CheckpointOpt,
    splits: Optional[str] = typer.Option(None, "--splits", help="Comma-separated, e.g. train,val,test."),
    dtype: Optional[str] = typer.Option(None, "--dtype", metavar=choices(EmbedDtype), help="Of hits/embed."),
    prune_threshold: Optional[float] = typer.Option(None, "--prune-threshold", help="0 keeps every hit."),
    overwrite: bool = OverwriteOpt,
) -> None:
    """Run the frozen stage-1 model once and write the Zarr cache."""
    options = {"export.splits": splits, "export.dtype": dtype, "export.prune_threshold": prune_threshold}
    cfg = _config(config, [*(overrides or []), *(f"{k}={v}" for k, v in options.items() if v is not None)],
                  print_config, ("assign",))  # the options checked as config values, like --set
    from hepreg.stages.export import run

    run(cfg, checkpoint=checkpoint, overwrite=overwrite)


@cache_app.command("info")
def cache_info(path: Path = typer.Argument(..., help="Cache directory or one split's .zarr group.")) -> None:
    """Splits, events, hits kept, bytes per event, compression, provenance."""
    from hepreg.cache.inspect import info

    info(path)


@cache_app.command("verify")
def cache_verify(path: Path = typer.Argument(..., help="Cache directory or one split's .zarr group.")) -> None:
    """Decode every chunk and check offsets, finiteness and targets."""
    from hepreg.cache.inspect import verify

    verify(path)


@app.command("train-head")
def train_head(
    config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = SetOpt, print_config: bool = PrintOpt,
    source: Optional[str] = typer.Option(None, "--source", metavar=choices(HeadTrainSource),
                                         help="The head's inputs: the cache (default), or live (the frozen stage-1 "
                                              "model run on every batch)."),
    resume: bool = resume_opt("head"),
    overwrite: bool = OverwriteOpt,
    sweep: Optional[Path] = typer.Option(None, "--sweep", help="YAML list of head configs trained together."),
) -> None:
    """Stage 2: train a regression head, or a sweep of them, from the cache (or live, the baseline)."""
    cfg = _config(config, [*(overrides or []), *([f"head_train.source={source}"] if source else [])], print_config)
    from hepreg.stages.train_head import run

    run(cfg, resume=resume, sweep=sweep, overwrite=overwrite)


@app.command()
def tune(
    config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = SetOpt, print_config: bool = PrintOpt,
    space: Path = typer.Option(..., "--space", help="YAML space file: the head settings to search (see "
                                                    "configs/tune_space.yaml)."),
    trials: int = typer.Option(20, "--trials", min=1, help="Trials this process runs (a rerun adds as many)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", min=0, metavar="MIN", help="Start no trial after MIN minutes."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL shared by several processes or "
                                                                 "nodes (default sqlite:///runs/<name>/tune/study.db)."),
) -> None:
    """Search head settings with Optuna (TPE, pruning) from the cache: trials → tune/, best head → tune/best/."""
    cfg = _config(config, overrides, print_config)
    from hepreg.stages.tune import run

    run(cfg, space, trials=trials, timeout_min=timeout, storage=storage)


@app.command()
def finetune(
    config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = SetOpt, print_config: bool = PrintOpt,
    head: Optional[Path] = HeadOpt,
    resume: bool = resume_opt("finetune"),
    overwrite: bool = OverwriteOpt,
) -> None:
    """Train stage 1 and a trained head end to end from their checkpoints → finetune/best.pt (both in one)."""
    cfg = _config(config, overrides, print_config)
    from hepreg.stages.finetune import run

    run(cfg, head=head, resume=resume, overwrite=overwrite)


@app.command()
def predict(
    config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = SetOpt, print_config: bool = PrintOpt,
    split: Optional[str] = SplitOpt,
    data: Optional[Path] = typer.Option(None, "--data", help="Any dataset directory instead (truth optional)."),
    head: Optional[Path] = HeadOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="HDF5 file (default runs/<name>/predict/<split>.h5)."),
    source: str = typer.Option("hdf5", "--from", metavar=choices(PredictSource),
                               help="Stage 1's outputs: hdf5 (the frozen stage 1 run on the events) or cache (the "
                                    "exported split)."),
    checkpoint: Optional[Path] = CheckpointOpt,
    model: Optional[Path] = ModelOpt,
    overwrite: bool = OverwriteOpt,
) -> None:
    """Per-track predictions (track probability, hits, pT, eta, phi, q, matched truth) to one HDF5 file."""
    check_choice(source, PredictSource, "--from")
    cfg = _config(config, [*(overrides or []), *([f"eval.split={split}"] if split else [])], print_config)
    from hepreg.stages.predict import run

    run(cfg, split=split, data=data, head=head, out=out, source=source, checkpoint=checkpoint, overwrite=overwrite,
        model=model)


@app.command("export-model")
def export_model(
    config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = SetOpt, print_config: bool = PrintOpt,
    head: Optional[Path] = HeadOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="ONNX file (default runs/<name>/model.onnx)."),
    checkpoint: Optional[Path] = CheckpointOpt,
    model: Optional[Path] = ModelOpt,
    overwrite: bool = OverwriteOpt,
    exporter: str = typer.Option("torchscript", "--exporter", help="torchscript (seconds) | dynamo (torch.export; "
                                                                   "the same model, a minute on a CPU)."),
) -> None:
    """Stage 1 and the head as one ONNX model, checked against torch with ONNX Runtime."""
    cfg = _config(config, overrides, print_config)
    from hepreg.stages.export_model import run

    run(cfg, head=head, out=out, checkpoint=checkpoint, overwrite=overwrite, exporter=exporter, model=model)


@app.command()
def evaluate(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = SetOpt,
             print_config: bool = PrintOpt,
             split: Optional[str] = SplitOpt, head: Optional[Path] = HeadOpt,
             sweep: Optional[Path] = typer.Option(None, "--sweep", help="Compare every head of a trained sweep "
                                                                          "(the ablation table)."),
             model: Optional[Path] = typer.Option(None, "--model", help="A fine-tuned model (finetune/best.pt): "
                                                                          "one more series, beside the head it "
                                                                          "started from."),
             overwrite: bool = OverwriteOpt) -> None:
    """Resolutions, residuals, charge mis-ID, assignment efficiency and purity, plots → eval/<split>/."""
    cfg = _config(config, [*(overrides or []), *([f"eval.split={split}"] if split else [])], print_config)
    from hepreg.stages.evaluate import ablation, run

    ablation(cfg, sweep) if sweep is not None else run(cfg, head=head, overwrite=overwrite, model=model)


@app.command()
def bench(quick: bool = typer.Option(False, "--quick", help="Small sizes, for a smoke run."),
          out: Path = typer.Option(Path("BENCHMARKS.md"), "--out", help="Where the table is written."),
          workdir: Path = typer.Option(Path("runs/bench"), "--workdir", help="Scratch data and runs."),
          device: str = typer.Option("auto", "--device", metavar=choices(Device), help="Where every step runs."),
          assign_checkpoint: Optional[Path] = typer.Option(
              None, "--assign-checkpoint", help="A trained stage-1 checkpoint to use instead of training one "
                                                "(e.g. runs/demo/assign/best.pt)."),
          stream_split: Optional[Path] = typer.Option(
              None, "--stream-split", help="The cache split streamed against held (default: the demo's "
                                           "runs/demo/cache/train.zarr where it exists, else the bench's own).")) -> None:
    """Measure the cached pipeline against the live baseline, side by side in one run."""
    from hepreg.stages.bench import run

    check_choice(device, Device, "bench --device")
    run(quick=quick, out=out, workdir=workdir, device=device, assign_checkpoint=assign_checkpoint,
        stream_split=stream_split)


def os_error_message(e: OSError) -> str:
    """One paragraph for a failed file operation: what happened, to which file, what to do."""
    where = f" {e.filename}" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"the disk is full (no space left writing{where}). Files already complete are kept, and "
                f"checkpoints and caches are written atomically, so nothing valid was replaced: free some space "
                f"and run the same command again (train-assign/train-head with --resume)")
    if e.errno == errno.EROFS:
        return (f"cannot write{where}: the file system is read-only. Point the run somewhere writable, e.g. "
                f"--set run_dir=/a/writable/dir")
    if e.errno in (errno.EACCES, errno.EPERM):
        return (f"permission denied for{where}. Point the run somewhere you may write, e.g. --set "
                f"run_dir=/a/writable/dir, or fix the permissions")
    if e.errno == errno.ENOENT:
        return f"no such file or directory:{where}"
    return f"{e.strerror or type(e).__name__}{':' if where else ''}{where}"


def main() -> None:
    from hepreg.runs.allocator import tune

    tune()  # the Makefile's MALLOC_* settings, for a `hepreg` started any other way
    if "--debug" in sys.argv[1:]:  # accepted anywhere on the command line, not only before the command
        _state["debug"] = True
        sys.argv = [a for a in sys.argv if a != "--debug"]
    try:
        app()
    except (HepregError, OSError) as e:
        if _state["debug"]:
            raise
        message = os_error_message(e) if isinstance(e, OSError) else str(e)
        console.print(Text.assemble(("error: ", "bold red"), message), highlight=False)  # no markup in messages
        sys.exit(2)


if __name__ == "__main__":
    main()
