"""The ``hfserve`` command line."""

from __future__ import annotations

import logging
import sys
from enum import StrEnum
from pathlib import Path

import httpx
import typer

from cli.errors import config_error_exit, fail
from cli.service import service_app
from model_host.ipc.settings import HostSettings
from sanic_serve.config import ServerConfig

# Defaults are declared once, in the settings classes; the options below show them.
_HOST = HostSettings()
_SERVER = ServerConfig()

app = typer.Typer(help="hfserve: an OpenAI-compatible server for Hugging Face transformers models.")
app.add_typer(service_app, name="service")


class Dtype(StrEnum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class ToolParserName(StrEnum):
    auto = "auto"
    hermes = "hermes"
    llama3_json = "llama3_json"
    mistral = "mistral"


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"hfserve {version('hfserve')}")
        except PackageNotFoundError:
            typer.echo("hfserve (not installed)")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """hfserve: an OpenAI-compatible server for Hugging Face transformers models."""


@app.command()
def start(
    host: str = typer.Option(_SERVER.host, help="Address to listen on."),
    port: int = typer.Option(_SERVER.port, min=1, max=65535, help="Port to listen on."),
    workers: int = typer.Option(_SERVER.workers, min=1, max=64, help="HTTP worker processes."),
    model: str | None = typer.Option(
        None, help="Hub id or local folder to preload and pin (default: the built-in demo model)."
    ),
    device: str = typer.Option(_HOST.device, help="auto, cpu, cuda, cuda:N or mps."),
    device_map: str = typer.Option(
        _HOST.device_map,
        help="Spread causal LMs over the GPUs and CPU memory with accelerate (auto, balanced, "
        "balanced_low_0, sequential). Default: off.",
        show_default=False,
    ),
    tp: int = typer.Option(
        _HOST.tp_size,
        min=1,
        help="Tensor parallelism: shard causal LMs over this many GPUs, one host process each.",
    ),
    dtype: Dtype = typer.Option(Dtype.auto, help="Weights dtype."),
    trust_remote_code: bool = typer.Option(_HOST.trust_remote_code, help="Allow models with custom code."),
    tool_parser: ToolParserName = typer.Option(
        ToolParserName.auto,
        help=(
            "How tool calls are read from model output "
            "(auto: the tokenizer's response_template, else the chat template's markup)."
        ),
    ),
    mcp_config: Path | None = typer.Option(
        None,
        exists=True,
        dir_okay=False,
        help="MCP servers (the mcpServers JSON) that /v1/responses mcp tools may name by server_label.",
    ),
    mcp_allow_private: bool = typer.Option(
        _SERVER.mcp.allow_private, help="Let requests' MCP server_url reach loopback and private addresses."
    ),
    mcp_allow_hosts: str | None = typer.Option(
        None,
        help="Comma list of the only hosts requests' MCP server_url may name (*.example.com: subdomains).",
    ),
    mcp_timeout_s: float = typer.Option(
        _SERVER.mcp.timeout_s, min=0.1, help="Seconds one MCP operation (listing tools, a call) may take."
    ),
    log_level: str = typer.Option(_HOST.log_level, help="DEBUG, INFO, WARNING or ERROR."),
    torch_threads: int = typer.Option(
        _HOST.torch_threads,
        min=0,
        help="Model host CPU threads (0: torch's default, or 1 for a model more threads do not speed up).",
    ),
    pack_weights: bool = typer.Option(
        _HOST.pack_weights,
        help="Float32 models on the CPU: pack linear weights for the decode steps' batch size (faster "
        "steps, one extra copy of those weights in memory; skipped when it would take over a quarter "
        "of the available memory).",
    ),
    lean_decode: bool = typer.Option(
        _HOST.lean_decode,
        help="Llama-family models (Llama, Mistral, Qwen2, Qwen3): run decode steps without "
        "transformers' per-module overhead (same operators; logits checked bit-identical at load).",
    ),
    max_batch_size: int = typer.Option(_HOST.max_batch_size, min=1, help="Requests running at once."),
    max_batch_tokens: int = typer.Option(
        _HOST.max_batch_tokens,
        min=0,
        help="Prompt tokens prefilled per step; longer prompts are chunked. 0: 256 on CPU, 4096 on GPU.",
    ),
    stream_interval_ms: int = typer.Option(
        _HOST.stream_interval_ms,
        min=0,
        help="A token mid-stream may wait this long to go out with the next ones (fewer, larger chunks "
        "when steps are faster). 0: every step's tokens at once.",
    ),
    max_queue: int = typer.Option(
        _HOST.max_queue, min=0, help="Requests waiting to start, all workers together; more get 429."
    ),
    prefix_cache_mb: int = typer.Option(
        _HOST.prefix_cache_mb,
        min=0,
        help="Memory for the KV of finished requests, reused by prompts that start the same way. 0: off.",
    ),
    idle_unload_s: float = typer.Option(
        _HOST.idle_unload_s,
        min=0,
        help="Unload a model loaded on demand after this many seconds without requests (the default or "
        "pinned model stays). 0: never.",
    ),
    drain_timeout_s: float = typer.Option(
        _SERVER.drain_timeout_s,
        min=0,
        help="On SIGTERM/SIGINT, seconds requests in flight may take to finish (new ones get 503).",
    ),
    request_timeout_s: float = typer.Option(
        _SERVER.request_timeout_s,
        min=0.1,
        help="Seconds a request's headers, then its body, may take to arrive; slower clients get 408.",
    ),
    responses_db: Path | None = typer.Option(
        None,
        dir_okay=False,
        help="SQLite file of stored /v1/responses (default: responses.sqlite3 in the cache folder).",
    ),
    responses_max_mb: float = typer.Option(
        _SERVER.responses_max_mb, min=0.1, help="Bound of the stored responses; the oldest are evicted."
    ),
    responses_ttl_s: float | None = typer.Option(
        None, min=0.1, help="Seconds a stored response is kept (default: until deleted or evicted)."
    ),
    max_audio_mb: float = typer.Option(
        _SERVER.max_audio_mb, min=0.001, help="Largest upload of /v1/audio/* in MB; larger ones get 413."
    ),
    max_audio_s: float = typer.Option(
        _SERVER.max_audio_s, min=0.1, help="Longest audio of /v1/audio/* in seconds, checked while decoding."
    ),
    max_images_per_request: int = typer.Option(
        _SERVER.media.max_images_per_request, min=0, help="Images one request may bring; more get 400."
    ),
    max_image_mb: float = typer.Option(
        _SERVER.media.max_image_bytes / 1024 / 1024, min=0.001, help="Largest image in MB; larger get 413."
    ),
    max_image_pixels: int = typer.Option(
        _SERVER.media.max_image_pixels,
        min=1,
        help="Most pixels (width x height) of an image, read from its header before it is decoded.",
    ),
    allow_remote_media: bool = typer.Option(
        _SERVER.media.allow_remote, help="Fetch images by http(s) URL (off: data URLs only)."
    ),
    allow_private_media: bool = typer.Option(
        _SERVER.media.allow_private,
        help="Let image URLs reach loopback, private and link-local addresses (with --allow-remote-media).",
    ),
    media_allow_hosts: str | None = typer.Option(
        None, help="Comma list of the only hosts image URLs may name, at every redirect (*.example.com)."
    ),
    media_root: Path | None = typer.Option(
        None,
        exists=True,
        file_okay=False,
        help="Folder whose files requests may name as images (file:// URLs, paths). Default: none.",
    ),
    media_timeout_s: float = typer.Option(
        _SERVER.media.fetch_timeout_s, min=0.1, help="Seconds one image fetch, redirects included, may take."
    ),
    api_key: list[str] = typer.Option(
        [],
        "--api-key",
        metavar="KEY",
        help="Require 'Authorization: Bearer KEY' (repeatable). Prefer HFSERVE_API_KEY or --api-key-file: "
        "arguments show in ps.",
    ),
    api_key_file: Path | None = typer.Option(
        None, dir_okay=False, help="File with API keys, one per line ('#' comments)."
    ),
    metrics_auth: bool = typer.Option(_SERVER.metrics_auth, help="/metrics needs the API key too."),
    metrics_vllm_names: bool = typer.Option(
        _SERVER.metrics_vllm_names, help="Name metrics vllm:* instead of hfserve:* (vLLM dashboards)."
    ),
    cors_origin: list[str] = typer.Option(
        [],
        "--cors-origin",
        metavar="ORIGIN",
        help="Origin browsers may call from (repeatable; '*': any). Default: none.",
    ),
) -> None:
    """Start the server: one model host plus WORKERS HTTP workers."""
    from cli.api_keys import load_api_keys
    from cli.preflight import ConfigError, check_device, check_placement, check_port
    from cli.start import check_responses_db, resolve_model_arg, serve

    if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        fail(f"--log-level {log_level!r}: use DEBUG, INFO, WARNING or ERROR", config_error_exit())
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    try:
        check_port(host, port)
        check_device(device)
        check_placement(device, device_map, tp, idle_unload_s)
        api_keys = load_api_keys(api_key, api_key_file)
        model_id, model_path, pinned = resolve_model_arg(model)
        db_path = check_responses_db(responses_db, responses_max_mb)
    except ConfigError as exc:
        fail(str(exc), config_error_exit())
    from sanic_serve.mcp.settings import MCPConfigError, settings_from_options
    from sanic_serve.media.policy import MediaPolicy

    try:
        mcp = settings_from_options(mcp_config, mcp_allow_private, mcp_allow_hosts, mcp_timeout_s)
    except MCPConfigError as exc:
        fail(str(exc), config_error_exit())
    config = ServerConfig(
        host=host,
        port=port,
        workers=workers,
        default_model_id=model_id,
        default_model_path=model_path,
        pinned=pinned,
        log_level=log_level,
        request_timeout_s=request_timeout_s,
        drain_timeout_s=drain_timeout_s,
        responses_db=str(db_path),
        responses_max_mb=responses_max_mb,
        responses_ttl_s=responses_ttl_s,
        max_audio_mb=max_audio_mb,
        max_audio_s=max_audio_s,
        engine=HostSettings(
            device=device,
            device_map=device_map,
            tp_size=tp,
            dtype=dtype.value,
            trust_remote_code=trust_remote_code,
            torch_threads=torch_threads,
            pack_weights=pack_weights,
            lean_decode=lean_decode,
            max_batch_size=max_batch_size,
            max_batch_tokens=max_batch_tokens,
            stream_interval_ms=stream_interval_ms,
            max_queue=max_queue,
            prefix_cache_mb=prefix_cache_mb,
            idle_unload_s=idle_unload_s,
        ),
        mcp=mcp,
        media=MediaPolicy(
            allow_remote=allow_remote_media,
            allow_private=allow_private_media,
            allow_hosts=tuple(h.strip() for h in (media_allow_hosts or "").split(",") if h.strip()),
            media_root=str(media_root.resolve()) if media_root is not None else None,
            max_image_bytes=int(max_image_mb * 1024 * 1024),
            max_image_pixels=max_image_pixels,
            max_images_per_request=max_images_per_request,
            fetch_timeout_s=media_timeout_s,
        ),
        tool_parser=None if tool_parser is ToolParserName.auto else tool_parser.value,
        api_keys=api_keys,
        metrics_auth=metrics_auth,
        cors_origins=tuple(cors_origin),
        metrics_vllm_names=metrics_vllm_names,
    )
    raise typer.Exit(serve(config))


@app.command()
def bench(
    base_url: str = typer.Option("http://127.0.0.1:8000", help="Any OpenAI-compatible server."),
    model: str | None = typer.Option(None, help="Model to request (default: the first listed)."),
    concurrency: str = typer.Option("1,8,32", help="Concurrent streams; a comma list sweeps."),
    num_prompts: int = typer.Option(64, min=1, help="Requests per concurrency level."),
    input_len: int = typer.Option(40, min=1, help="Prompt length: tokens with --tokenizer, else words."),
    output_len: int = typer.Option(64, min=1, help="Tokens to generate (max_tokens, ignore_eos)."),
    request_rate: float = typer.Option(float("inf"), help="Requests/s, Poisson arrivals (inf: all at once)."),
    seed: int = typer.Option(0, help="Prompt and arrival seed."),
    tokenizer: str | None = typer.Option(None, help="tokenizer.json or model folder for exact lengths."),
    label: str = typer.Option("server", help="Name of this server in results and plots."),
    out: Path | None = typer.Option(None, help="Write JSON results here."),
    plot: Path | None = typer.Option(None, help="Write a PNG plot here."),
    ignore_eos: bool = typer.Option(True, help="Send ignore_eos for a fixed output length."),
    api_key: str = typer.Option(
        "", envvar=["HFSERVE_API_KEY", "OPENAI_API_KEY"], help="Sent as a bearer token.", show_default=False
    ),
) -> None:
    """Measure throughput and latency of a running server under streaming load."""
    from rich.console import Console

    from cli.bench import BenchConfig, run_bench
    from cli.bench_plot import table

    try:
        levels = [int(x) for x in concurrency.split(",") if x.strip()]
    except ValueError as exc:
        raise typer.BadParameter("--concurrency takes integers, e.g. 1,8,32") from exc
    if not levels or min(levels) < 1:
        raise typer.BadParameter("--concurrency takes positive integers, e.g. 1,8,32")
    if plot is not None:
        try:  # checked before the run, not after minutes of load
            import matplotlib  # noqa: F401
        except ImportError:
            fail("--plot needs matplotlib: pip install 'hfserve[bench]'")
    console = Console()
    cfg = BenchConfig(
        base_url,
        model,
        levels,
        num_prompts,
        input_len,
        output_len,
        request_rate,
        seed,
        tokenizer,
        label,
        out,
        plot,
        ignore_eos,
        api_key,
    )
    try:
        report = run_bench(cfg, console)
    except (OSError, RuntimeError, httpx.HTTPError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(table([report]))
    if any(run["failed"] for run in report["runs"]):
        console.print("[yellow]some requests failed:[/yellow]", [r["errors"] for r in report["runs"]])


@app.command()
def chat(
    base_url: str = typer.Argument("http://127.0.0.1:8000", help="The server (any OpenAI-compatible)."),
    model: str | None = typer.Option(None, help="Model to talk to (default: the server's first)."),
    api_key: str = typer.Option(
        "", envvar=["HFSERVE_API_KEY", "OPENAI_API_KEY"], help="Sent as a bearer token.", show_default=False
    ),
    prompt: str | None = typer.Option(None, "-p", "--prompt", help="One-shot: answer this and exit."),
    as_json: bool = typer.Option(False, "--json", help="One-shot: print the final response object."),
    system: str | None = typer.Option(None, help="System prompt."),
    temperature: float | None = typer.Option(None, min=0.0, max=2.0),
    top_p: float | None = typer.Option(None, min=0.0, max=1.0),
    max_tokens: int | None = typer.Option(None, min=1),
    seed: int | None = typer.Option(None),
    mcp_config: Path | None = typer.Option(None, exists=True, dir_okay=False, help="MCP servers (JSON)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Run tool calls without asking."),
    max_tool_rounds: int = typer.Option(5, min=0, help="Model → tools → model rounds per message."),
    save_dir: Path = typer.Option(
        Path.home() / ".local" / "share" / "hfserve" / "chats", help="Where !save and history go."
    ),
) -> None:
    """Chat with a server: streamed replies, !-commands, MCP tools."""
    from cli.chat.main import run_interactive, run_one_shot
    from cli.chat.session import ChatSession

    settings = {
        k: v
        for k, v in {
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_tokens,
            "seed": seed,
        }.items()
        if v is not None
    }
    session = ChatSession(base_url, api_key, model, settings)
    session.system = system
    if prompt is not None:
        raise typer.Exit(run_one_shot(session, prompt, as_json, mcp_config, max_tool_rounds))
    raise typer.Exit(run_interactive(session, save_dir, mcp_config, not yes, max_tool_rounds))


def run() -> None:
    """The console script: usage errors (a bad option, a value out of range) are one line and exit 1
    too, instead of a boxed usage text and exit 2; those of ``hfserve start`` exit as its other
    settings errors do (see ``cli.errors``)."""
    # typer bundles its own click: its exception types are reached through the public ones.
    usage_error: type[Exception] = typer.BadParameter.__mro__[1]
    try:
        code = app(standalone_mode=False)
    except usage_error as exc:
        ctx = getattr(exc, "ctx", None)
        hint = f" (see hfserve {ctx.info_name} --help)" if ctx is not None and ctx.parent else ""
        typer.echo(f"error: {exc.format_message()}{hint}", err=True)  # type: ignore[attr-defined]
        sys.exit(config_error_exit() if ctx is not None and ctx.info_name == "start" else 1)
    except typer.Abort:
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    run()
