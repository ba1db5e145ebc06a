"""The ``lvlm-probe`` command. It only parses arguments and calls the library."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import track
from rich.table import Table

from .errors import InputError, LVLMProbeError


# The command line is an application: quiet transformers' per-load progress bars there (never in
# the library, which must not change global state).
def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()


class _Application(typer.Typer):
    """The command line: a user's mistake (an :class:`~lvlm_probe.errors.LVLMProbeError`, a file
    that is missing or cannot be written) prints as one short message with exit code 2, its
    traceback only with ``--debug``; Ctrl-C says which commands resume when run again."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        argv = list(kwargs.pop("args", None) or sys.argv[1:])
        debug = "--debug" in argv
        argv = [a for a in argv if a != "--debug"]
        try:
            code = super().__call__(*args, args=argv, standalone_mode=False, **kwargs)
        except typer.Exit as done:
            sys.exit(done.exit_code)
        except typer.TyperException as usage:  # bad options: the parser's own message and exit code
            usage.show()
            sys.exit(usage.exit_code)
        except (typer.Abort, KeyboardInterrupt):
            err_console.print(INTERRUPTED)
            sys.exit(130)
        except USER_ERRORS as err:
            if debug:
                raise
            err_console.print(f"error: {escape(str(err))}", highlight=False)
            err_console.print("(run with --debug for the traceback)", style="dim")
            sys.exit(2)
        # Outside standalone mode typer turns Ctrl-C (KeyboardInterrupt) into a returned 130 and
        # any Exit into its returned code; the commands themselves return None.
        if code == 130:
            err_console.print(INTERRUPTED)
        if isinstance(code, int) and code:
            sys.exit(code)
        return code


# Ctrl-C's message (exit code 130, the shell's for SIGINT): what was kept and how to go on.
INTERRUPTED = ("interrupted. `sweep`, `report` and `zoo train` keep what they finished: rerunning the "
               "same command resumes where it stopped; other commands start over")

# What a user can cause and fix: bad input, a model or file that cannot be read, a folder that
# cannot be written. Anything else is a bug and keeps its traceback.
USER_ERRORS = (LVLMProbeError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)

app = _Application(add_completion=False, no_args_is_help=True,
                   help="Interpretability diagnostics for vision-language models (--debug: show "
                        "tracebacks of errors).")
console = Console(width=max(Console().width, 120))  # tables stay readable when piped
err_console = Console(stderr=True, width=max(Console().width, 120))


@app.command("families")
def families_cmd() -> None:
    """List the supported model families: classes, layout, multi-image, DLA and bridge support."""
    from .interop.support import support_table

    frame = support_table()
    table = Table()
    width = max(len(name) for name in frame["family"])
    table.add_column(frame.columns[0], no_wrap=True, min_width=width)  # names are looked up: whole
    for column in frame.columns[1:]:
        table.add_column(column, overflow="fold")
    for row in frame.itertuples(index=False):
        table.add_row(*(str(v) for v in row))
    console.print(table)


@app.command()
def info(
    model: str = typer.Argument(..., help="hub id, local directory, or tiny:<family>"),
    device: str = typer.Option(None, help="cpu, cuda, cuda:1, ... (default: cuda if available)"),
    dtype: str = typer.Option(None, help="float32 (default), bfloat16, float16"),
) -> None:
    """Load a model and print its summary."""
    lvlm = _load(model, device, dtype)
    console.print(lvlm.summary())


@app.command()
def layout(
    model: str = typer.Argument(..., help="hub id, local directory, or tiny:<family>"),
    image: list[Path] = typer.Option(..., help="image file(s) for the prompt"),
    prompt: str = typer.Option(..., help="the user prompt"),
    device: str = typer.Option(None),
    dtype: str = typer.Option(None),
) -> None:
    """Show where image, prompt and template tokens sit for one prompt."""
    from PIL import Image

    missing = [str(p) for p in image if not p.is_file()]
    if missing:
        raise InputError(f"--image {', '.join(map(repr, missing))}: not a file; expected image files")
    lvlm = _load(model, device, dtype)
    batch = lvlm.prepare(images=[[Image.open(p) for p in image]], prompts=[prompt])
    lay = batch.layouts[0]
    console.print(lay.summary())
    group_of = {int(p): g for g in ("image", "prompt", "template", "pad") for p in lay.positions(g)}
    styles = {"image": "magenta", "prompt": "green", "template": "dim", "pad": "dim"}
    text = [f"[{styles[group_of[i]]}]{escape(tok)}[/]" for i, tok in enumerate(lay.tokens)]
    console.print(" ".join(text), highlight=False)


@app.command()
def demo(
    device: str = typer.Option(None, help="cpu, cuda, ... (default: cuda if available)"),
    n: int = typer.Option(60, help="questions per level and split asked of shapes-llava"),
) -> None:
    """The main job on the shipped reference model, then every family's token layout."""
    from . import demo as demo_lib
    from . import families, zoo

    _quiet_transformers()
    if "shapes-llava" in zoo.checkpoints():
        console.rule("shapes-llava on fresh ShapesWorld questions")
        report = demo_lib.reference_report(n=n, device=device)
        console.print(report.summary)
        console.print(_table(report.examples, title="One question per split and level"))
        console.print(_table(report.accuracy, title="Accuracy per split and level"))
        console.print(_table(_frame(report.priors), title="The training priors in its answers"))

    console.rule("Every supported family (tiny random weights) on one picture")
    names = families.names()
    table = Table("family", "class", "image tokens", "prompt", "template", "per image", "P(yes)")
    reports = demo_lib.run(family_names=names, device=device)
    for report in track(reports, total=len(names), description="tiny models", console=console):
        table.add_row(report.family, report.hf_class.removesuffix("ForConditionalGeneration"),
                      str(report.counts["image"]), str(report.counts["prompt"]),
                      str(report.counts["template"]), escape(report.images), f"{report.p_yes:.3f}")
    console.print(table)


@app.command()
def sweep(
    definition: Path = typer.Argument(..., help="a sweep definition, e.g. probes/shapes_objects.yaml"),
    out: str = typer.Option(None, help="output folder (default: the definition's out)"),
    device: str = typer.Option(None, help="overrides the definition's device"),
    backend: str = typer.Option(None, help="overrides the definition's backend: local or ray"),
    ray_address: str = typer.Option(None, help="a Ray cluster to join (default: a local Ray instance)"),
) -> None:
    """Extract activations and fit probes per layer as a YAML definition says; resumes when rerun.

    With ``--backend ray`` both the extraction and the probe fits run on Ray workers."""
    import dataclasses

    from .devices import resolve_device
    from .workflows.sweep import run_sweep
    from .workflows.sweep_config import FolderData, check_folder, load_config

    _quiet_transformers()
    config = load_config(definition)
    changes = {k: v for k, v in (("out", out), ("device", device), ("backend", backend),
                                 ("ray_address", ray_address)) if v is not None}
    config = dataclasses.replace(config, **changes)
    # the inputs and the output location are checked before the model loads
    if isinstance(config.data, FolderData):
        check_folder(config.data)
    resolve_device(config.device)  # a device this machine lacks (the template's cuda) fails here
    check_out_folder(Path(config.out), "--out" if out is not None else f"out (in {definition})")
    run = run_sweep(config)
    from .probing import best_layers

    if run.changed_images:
        console.print(f"image files changed since the last run, extracted again from the first: "
                      f"{', '.join(run.changed_images)}")

    best = best_layers(run.results)[["target", "hook", "accuracy", "ci_low", "ci_high", "selectivity",
                                     "chance", "n_test"]]
    console.print(_table(best.round(3), title="Best layer per target (ties: higher selectivity, then earlier)"))
    if run.transfer is not None:
        top = (run.transfer.sort_values("accuracy", ascending=False).groupby(["target", "direction"]).head(1)
               [["target", "direction", "hook", "accuracy", "chance"]])
        console.print(_table(top.round(3), title="Best cross-modal transfer"))
    console.print(f"results: {run.out / 'results.parquet'}")
    for name, path in run.figures.items():
        console.print(f"figure {name}: {path}")


@app.command()
def attribute(
    model: str = typer.Option(..., help="zoo name, hub id, local directory, or tiny:<family>"),
    out: Path = typer.Option(..., help="a .png for one prompt; a folder with --world"),
    image: Path = typer.Option(None, help="the image (one-prompt mode)"),
    prompt: str = typer.Option(None, help="the prompt (one-prompt mode)"),
    target: str = typer.Option(None, help="the answer to explain (one token)"),
    foil: str = typer.Option(None, help="the alternative answer, for log-odds"),
    method: str = typer.Option("ig", help="image map: ig, ablation, shapley, attention"),
    grid: str = typer.Option(None, help="grid of a multi-grid image to map (default: the finest covering "
                                        "the whole image)"),
    world: int = typer.Option(0, help="dataset mode: this many ShapesWorld colour questions"),
    device: str = typer.Option(None),
    dtype: str = typer.Option(None),
) -> None:
    """Split an answer among prior, prompt and image, and map it over the image."""
    from .attribution import image_map, source_split
    from .viz import save_figure
    from .workflows.attribution_run import world_attribution

    # every user input is checked before the model loads and the attribution runs
    if not world:
        if image is None or prompt is None or target is None:
            raise typer.BadParameter("one-prompt mode needs --image, --prompt and --target (or use --world N)")
        if not image.is_file():
            raise InputError(f"--image {str(image)!r} is not a file")
        if out.is_dir() or not out.parent.is_dir():
            raise InputError(f"--out {str(out)!r} must be a file path in an existing folder (e.g. map.png), "
                             "for the image map")
    else:
        check_out_folder(out, "--out")  # with --world, the folder to write into
    _quiet_transformers()
    lvlm = _load(model, device, dtype)
    if world:
        table = world_attribution(lvlm, out, n=world, method=method)
        summary = table.groupby("outcome")[["prior_share", "prompt_share", "image_share", "image"]].mean()
        console.print(_table(summary.round(3).reset_index(), title="Mean split per outcome"))
        console.print(f"written to {out}")
        return
    from PIL import Image

    # prepare composites transparency on white (with a warning); convert("RGB") would drop it
    batch = lvlm.prepare(images=[Image.open(image)], prompts=[prompt])
    split = source_split(lvlm, batch, target, foil=foil)
    console.print(_table(split.shares().round(4), title="Source split"))
    maps = image_map(lvlm, batch, target, foil=foil, method=method, grid=grid)
    save_figure(maps.plot(0), out, metadata=maps.metadata(0))
    if maps.answer_differs(0):
        console.print(f"[yellow]{escape(maps.mismatch(0))}[/yellow]")
    console.print(f"image map: {out}")


@app.command()
def report(
    model: str = typer.Option(..., help="zoo name, hub id, local directory, or tiny:<family>"),
    out: Path = typer.Option(..., help="output folder: report.html, report.json, stages/ (resumes)"),
    n: int = typer.Option(60, help="questions per level and split"),
    seed: int = typer.Option(1000, help="world seed of the questions (not the training seed)"),
    folder: Path = typer.Option(None, help="a ShapesWorld export folder instead of a fresh world"),
    maps: int = typer.Option(4, help="wrong answers shown with an image map"),
    device: str = typer.Option(None),
    dtype: str = typer.Option(None),
) -> None:
    """Benchmark a model at the object, attribute and relation levels, diagnose its errors, and
    write a self-contained HTML report with the same numbers as JSON."""
    from .report import write_report
    from .worlds import ShapesWorld

    check_out_folder(out, "--out")
    if folder is not None and not folder.is_dir():
        raise InputError(f"--folder {str(folder)!r} is not a folder; expected a ShapesWorld export folder")
    lvlm = _load(model, device, dtype)
    world = folder if folder is not None else ShapesWorld(seed=seed, image_size=64)
    result = write_report(lvlm, out, name=model, world=world, n=n, maps=maps).result
    console.print(_table(result.levels, title="Accuracy, error rate and severity per level"))
    causes = (result.diagnosis.causes
              .pivot_table(index=["split", "level"], columns="cause", values="n", aggfunc="sum", fill_value=0)
              .reset_index())
    console.print(_table(causes, title="Errors per cause"))
    console.print(f"report: {out / 'report.html'}  numbers: {out / 'report.json'}")


def _frame(figures: dict[str, float]):
    import pandas as pd

    return pd.DataFrame({"figure": list(figures), "value": list(figures.values())})


zoo_app = typer.Typer(no_args_is_help=True, help="Reference models: train and evaluate.")
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("train")
def zoo_train(
    name: str = typer.Argument("shapes-llava", help="the reference model to train"),
    out: Path = typer.Option(Path("shapes-llava"), help="output folder (resumes a run found there)"),
    device: str = typer.Option(None, help="cpu, cuda, ... (default: cuda if available)"),
) -> None:
    """Train a reference model on ShapesWorld with its recorded recipe."""
    from .zoo import train as train_lib
    from .zoo.shapes_llava import NAME

    if name != NAME:
        raise typer.BadParameter(f"unknown reference model {name!r}; expected {NAME!r}")
    check_out_folder(out, "--out")
    path = train_lib.train(out, device=device)
    console.print(f"saved to {path}")


@zoo_app.command("eval")
def zoo_eval(
    model: str = typer.Argument("shapes-llava", help="shipped checkpoint name, directory, or tiny:<family>"),
    n: int = typer.Option(300, help="questions per level and split"),
    seed: int = typer.Option(1000, help="world seed of the questions (not the training seed)"),
    device: str = typer.Option(None),
) -> None:
    """Accuracy per level on typical and counterfactual ShapesWorld questions."""
    from .workflows import evaluation

    _quiet_transformers()
    from .bench import accuracy_by

    lvlm = _load(model, device, None)
    results = evaluation.answers(lvlm, n=n, seed=seed)
    table = accuracy_by(results, "split", "level")
    console.print(_table(table, title=f"{model}: accuracy on fresh questions (world seed {seed})"))
    for key, value in evaluation.prior_figures(results).items():
        console.print(f"{key}: {value:.3f}")


def check_out_folder(out: Path, option: str) -> None:
    """Raise an InputError, before any computation, where ``out`` cannot be the folder a command
    writes into: an existing file, or a location this user cannot write (the folder itself when
    it exists, else its nearest existing parent, where it would be created).

    Args:
        out: the output folder as given (relative to the working directory).
        option: how the user gave it, for the message (``"--out"``, ``"out (in x.yaml)"``).
    """
    if out.exists() and not out.is_dir():
        raise InputError(f"{option} {str(out)!r} is a file; expected a folder to write into (created "
                         "if missing): choose another path or move the file")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"{option} {str(out)!r} cannot be created: {str(existing)!r} is a file, not a "
                         "folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{option} {str(out)!r} cannot be written: {str(existing)!r} is not writable "
                         "by this user; choose a folder you can write, e.g. under your home")


def _table(frame, title: str | None = None) -> Table:
    table = Table(*map(str, frame.columns), title=title)
    for row in frame.itertuples(index=False):
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else escape(str(v)) for v in row))
    return table


def _load(model: str, device: str | None, dtype: str | None):
    from .zoo import from_name

    _quiet_transformers()
    return from_name(model, device=device, dtype=dtype)


if __name__ == "__main__":
    app()
