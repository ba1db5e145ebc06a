"""The ``lvlm-probe`` command. It only parses arguments and calls the library."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import track
from rich.table import Table

# The command line is an application: quiet transformers' per-load progress bars there (never in
# the library, which must not change global state).
def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()


app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Interpretability diagnostics for vision-language models.")
console = Console()


@app.command("families")
def families_cmd() -> None:
    """List the supported model families and their transformers classes."""
    from . import families

    table = Table("family", "transformers classes", "image mode")
    for name in families.names():
        fam = families.get(name)
        table.add_row(name, ", ".join(fam.hf_classes), fam.image_mode)
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
) -> None:
    """Run every supported family on one picture and show its token layout."""
    _quiet_transformers()
    from . import demo as demo_lib, families

    names = families.names()
    table = Table("family", "class", "image tokens", "prompt", "template",
                  "per image", "P(yes)", title="Token layout of one picture and prompt, per family")
    reports = demo_lib.run(family_names=names, device=device)
    for report in track(reports, total=len(names), description="tiny models", console=console):
        table.add_row(report.family, report.hf_class.removesuffix("ForConditionalGeneration"),
                      str(report.counts["image"]),
                      str(report.counts["prompt"]), str(report.counts["template"]),
                      escape(report.images), f"{report.p_yes:.3f}")
    console.print(table)


def _load(model: str, device: str | None, dtype: str | None):
    import lvlm_probe as lp

    _quiet_transformers()
    if model.startswith("tiny:"):
        return lp.zoo.tiny(model.removeprefix("tiny:"), device=device, dtype=dtype)
    return lp.load(model, device=device, dtype=dtype)


if __name__ == "__main__":
    app()
