"""The ``hfserve`` command line."""

from __future__ import annotations

import logging
from enum import StrEnum

import typer

app = typer.Typer(help="hfserve: an OpenAI-compatible server for Hugging Face transformers models.")


class Dtype(StrEnum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@app.callback()
def main() -> None:
    """hfserve: an OpenAI-compatible server for Hugging Face transformers models."""


@app.command()
def start(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    workers: int = typer.Option(1, min=1, max=64, help="HTTP worker processes."),
    model: str | None = typer.Option(
        None, help="Hub id or local folder to preload and pin (default: the built-in demo model)."
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    dtype: Dtype = typer.Option(Dtype.auto, help="Weights dtype."),
    trust_remote_code: bool = typer.Option(False, help="Allow models with custom code."),
    log_level: str = typer.Option("INFO", help="DEBUG, INFO, WARNING or ERROR."),
    torch_threads: int = typer.Option(0, help="CPU threads for the model host (0: torch default)."),
    max_batch_size: int = typer.Option(64, min=1, help="Requests generating at once."),
    max_batch_tokens: int = typer.Option(
        2048, min=16, help="Prompt tokens prefilled per step; longer prompts are chunked."
    ),
    max_queue: int = typer.Option(
        256, min=0, help="Requests waiting to start, all workers together; more get 429."
    ),
) -> None:
    """Start the server: one model host plus WORKERS HTTP workers."""
    from cli.start import DemoModelError, resolve_model_arg, serve
    from sanic_serve.config import ServerConfig

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    try:
        model_id, model_path, pinned = resolve_model_arg(model)
    except DemoModelError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    config = ServerConfig(
        host=host,
        port=port,
        workers=workers,
        default_model_id=model_id,
        default_model_path=model_path,
        pinned=pinned,
        device=device,
        dtype=dtype.value,
        trust_remote_code=trust_remote_code,
        log_level=log_level,
        torch_threads=torch_threads,
        max_batch_size=max_batch_size,
        max_batch_tokens=max_batch_tokens,
        max_queue=max_queue,
    )
    serve(config)


if __name__ == "__main__":
    app()
