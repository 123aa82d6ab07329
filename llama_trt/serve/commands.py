"""``llama-trt serve`` and ``llama-trt package`` (each parses, calls one library function, prints)."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli_support import FiniteFloat, backend_option, friendly_errors, tokenizer_options



@click.command("serve")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port to listen on.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 1024),
              help="Decode slots batched in one step.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1),
              help="Requests waiting for a slot; beyond it: 503 + Retry-After.")
@click.option("--api-key", envvar="LLAMA_TRT_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' (env LLAMA_TRT_API_KEY); /health stays open.")
@backend_option()
@tokenizer_options
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="CPU threads (default: physical cores).")
@click.option("--max-context", type=click.IntRange(1), default=None,
              help="Context to serve, below the export's (the KV cache, per batch row, is sized to it; "
                   "ONNX Runtime backend).")
@click.option("--max-body-bytes", default=1 << 20, show_default=True, type=click.IntRange(1),
              help="Larger bodies get 413 (also bounds the text one request makes the server tokenize).")
@click.option("--request-timeout", default=600.0, show_default=True, type=FiniteFloat(0.0, min_open=True),
              help="Seconds a request may take in all (queue + generation); then 504 / an error event.")
@click.option("--shutdown-timeout", default=30.0, show_default=True, type=FiniteFloat(0.0),
              help="On SIGTERM: seconds running requests get to finish before their streams are ended.")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="Allow browsers from this origin (repeatable; default: none).")
@click.option("--model-name", default=None, help="Model id clients send (default: the artifact folder name).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]), help="uvicorn log level.")
@friendly_errors
def serve_cmd(artifact, host, port, max_batch, max_queue, api_key, backend, tokenizer, chat_template, threads,
              max_context, max_body_bytes, request_timeout, shutdown_timeout, cors_origins, model_name, log_level):
    """Serve ARTIFACT over an OpenAI-compatible HTTP API (completions, chat, SSE streaming, /metrics)."""
    from .server import serve
    from .settings import ServeSettings

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"warning: binding {host} without --api-key exposes the model to the network", err=True)
    from ..validate.certificate import read_certificate

    if Path(artifact).is_dir() and (cert := read_certificate(artifact)) is not None:
        click.echo(cert.summary(), err=True)  # what `validate` verified about this artifact
    settings = ServeSettings(host=host, port=port, api_key=api_key or None, max_body_bytes=max_body_bytes,
                             request_timeout_s=request_timeout, shutdown_timeout_s=shutdown_timeout,
                             cors_origins=tuple(cors_origins))
    serve(artifact, settings, backend=backend, max_batch=max_batch, max_queue=max_queue, model_name=model_name,
          log_level=log_level, threads=threads, max_context=max_context, tokenizer_path=tokenizer,
          chat_template_file=chat_template)


@click.command("package")
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--triton", "triton_out", type=click.Path(path_type=Path), required=True,
              help="Write a Triton Inference Server model repository here.")
@click.option("--model-name", default=None, help="Triton model name (default: the artifact folder name).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 1024),
              help="Slots of the generate model.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1),
              help="Requests the generate model queues; beyond it: UNAVAILABLE (503).")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1, 64),
              help="GPU instances of the plan model (engines).")
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="ONNX Runtime threads of the generate model (exports; default: physical cores).")
@click.option("--force", is_flag=True, help="Replace the models in OUT if they exist.")
@friendly_errors
def package_cmd(artifact_dir, triton_out, model_name, max_batch, max_queue, instances, threads, force):
    """Package an engine or ONNX export folder for Triton (a python generate model; engines also
    get a tensorrt_plan model) and print the tritonserver command that serves it (docs/serving.md)."""
    from .triton import package_triton
    from .tritonserver import command_for_repository

    res = package_triton(artifact_dir, triton_out, model_name=model_name, force=force, max_batch=max_batch,
                         max_queue=max_queue, instances=instances, threads=threads or 0)
    for m in res.models:
        click.echo(f"wrote {res.repository / m}")
    line, note = command_for_repository(res.repository, [res.generate_model])
    click.echo(f"start it with:\n  {line}")
    if note:
        click.echo(note)
    click.echo(f"or: llama-trt triton-serve {res.repository} --model {res.generate_model}")


@click.command("triton-serve")
@click.argument("repository", type=click.Path(path_type=Path))
@click.option("--model", "models", multiple=True, required=True,
              help="Model to load (repeatable), e.g. NAME_generate as `package` printed.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address of HTTP, gRPC and metrics.")
@click.option("--http-port", default=8000, show_default=True, type=click.IntRange(1, 65535),
              help="Triton's HTTP/REST port (v2 inference + generate extension).")
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(1, 65535),
              help="Triton's gRPC port (streaming for decoupled models).")
@click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(1, 65535),
              help="Triton's Prometheus /metrics port.")
@click.option("--backend-dir", type=click.Path(path_type=Path), default=None,
              help="Where to prepare the python backend for this Python (default: ~/.cache/llama-trt/tritonserver).")
@click.option("--ready-timeout", default=300.0, show_default=True, type=FiniteFloat(0.0, min_open=True),
              help="Seconds to wait for /v2/health/ready.")
@friendly_errors
def triton_serve_cmd(repository, models, host, http_port, grpc_port, metrics_port, backend_dir, ready_timeout):
    """Run the tritonserver of the nvidia-pytriton wheel on REPOSITORY until Ctrl-C / SIGTERM."""
    from .tritonserver import TritonPorts, launch_spec, serve_blocking

    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: binding {host}: Triton has no authentication of its own", err=True)
    spec = launch_spec(repository, list(models), ports=TritonPorts(http_port, grpc_port, metrics_port), host=host,
                       backend_dir=backend_dir)
    click.echo(spec.command_line(), err=True)
    serve_blocking(spec, ready_timeout, on_ready=lambda url: click.echo(f"ready: {url}", err=True))


__all__ = ["package_cmd", "serve_cmd", "triton_serve_cmd"]
