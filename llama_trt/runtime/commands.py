"""``llama-trt run`` and ``llama-trt bench``: parse, call one library function, print.

Imports stay lazy so ``llama-trt --help`` and ONNX runs never pull in torch.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from ..cli_support import FiniteFloat, backend_option, friendly_errors, tokenizer_options

THREADS = click.IntRange(1, 1024)



def _parse_ids(text: str) -> list[int]:
    from ..errors import GenerationError

    try:
        ids = [int(t) for t in text.replace(" ", ",").split(",") if t.strip()]
    except ValueError:
        raise GenerationError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise GenerationError("the prompt is empty; give at least one token id in --prompt-ids")
    return ids


def _open(artifact: Path, backend: str, tokenizer: Path | None, threads: int | None,
          chat_template: Path | None = None):
    from . import open_session, resolve_artifact
    from .tokenizer import TokenizerError, open_tokenizer

    art = resolve_artifact(artifact)
    from ..validate.certificate import certificate_from_manifest

    if (cert := certificate_from_manifest(art.manifest)) is not None:
        click.echo(cert.summary(), err=True)  # what `validate` verified about this artifact
    tok = open_tokenizer(art.tokenizer_path(), tokenizer, chat_template)
    session = open_session(art, backend, threads=threads)
    if tok is not None and tok.vocab_size > session.config.vocab_size:
        raise TokenizerError(
            f"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary is "
            f"{session.config.vocab_size}: it belongs to another model; pass --prompt-ids or the right --tokenizer"
        )
    return art, session, tok


def _sampling_options(fn, max_new_tokens: int = 64):
    """Sampling options shared by run and chat."""
    for option in reversed([
        click.option("--max-new-tokens", default=max_new_tokens, show_default=True, type=click.IntRange(1),
                     help="Tokens to generate at most (prompt + these must fit the context)."),
        click.option("--temperature", default=0.0, show_default=True, type=FiniteFloat(0.0), help="0 = greedy."),
        click.option("--top-k", default=0, show_default=True, type=click.IntRange(0), help="0 = off."),
        click.option("--top-p", default=1.0, show_default=True, type=FiniteFloat(0.0, 1.0, min_open=True),
                     help="1 = off."),
        click.option("--repetition-penalty", default=1.0, show_default=True, type=FiniteFloat(0.0, min_open=True),
                     help="1 = off (CTRL/HF)."),
        click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=None,
                     help="Seed of the sampler (reproducible sampling), 0..2**64-1."),
    ]):
        fn = option(fn)
    return fn


def _prompt_ids(tok, prompt: str, chat: bool, system: str | None) -> list[int]:
    if not chat:
        return tok.encode(prompt)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tok.encode_chat(messages, add_generation_prompt=True)


@click.command("run")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", help="Prompt text (needs a tokenizer next to the artifact or --tokenizer).")
@click.option("--prompt-ids", help="Prompt token ids, comma separated (e.g. 1,2,3); used as given (no BOS added).")
@click.option("--chat", is_flag=True, help="Wrap --prompt as a user message with the tokenizer's chat template.")
@click.option("--system", default=None, help="System prompt (with --chat).")
@tokenizer_options
@_sampling_options
@click.option("--stop", multiple=True, help="Stop string (repeatable; needs a tokenizer).")
@click.option("--stop-id", multiple=True, type=int, help="Stop token id (repeatable).")
@click.option("--ignore-eos", is_flag=True, help="Keep going past the end-of-sequence token.")
@backend_option()
@click.option("--threads", type=THREADS, default=None, help="CPU threads (default: physical cores).")
@click.option("--stream", is_flag=True, help="Print tokens as they are produced.")
@click.option("--no-echo", is_flag=True, help="Print only the continuation, not the prompt before it.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (with --stream: a JSON line per token first).")
@friendly_errors
def run_command(artifact, prompt, prompt_ids, chat, system, tokenizer, chat_template, max_new_tokens, temperature,
                top_k, top_p, repetition_penalty, seed, stop, stop_id, ignore_eos, backend, threads, stream, no_echo,
                as_json) -> None:
    """Generate from ARTIFACT: an export folder, an engine folder or a checkpoint."""
    from ..errors import GenerationError
    from . import GenerationConfig, generate
    from . import stream as stream_gen
    from .tokenizer import continuation_gap

    if (prompt is None) == (prompt_ids is None):
        raise GenerationError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    if prompt is not None and not prompt:
        raise GenerationError("the prompt is empty; give some text")
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           repetition_penalty=repetition_penalty, seed=seed, stop_strings=tuple(stop),
                           stop_token_ids=tuple(stop_id), ignore_eos=ignore_eos)
    ids = _parse_ids(prompt_ids) if prompt_ids is not None else None
    art, session, tok = _open(artifact, backend, tokenizer, threads, chat_template)
    if ids is None:
        if tok is None:
            raise GenerationError(f"{art.path} has no tokenizer (tokenizer.json / tokenizer.model); "
                                  "pass --prompt-ids or --tokenizer")
        ids = _prompt_ids(tok, prompt, chat, system)
    echo = not (no_echo or as_json) and prompt is not None and tok is not None
    if echo:
        click.echo(prompt + ("\n" if chat else ""), nl=False)
    if stream:
        result = _print_stream(stream_gen(session, ids, cfg, tok), tok, as_json, gap_after=ids if echo and not chat else None)
    else:
        result = generate(session, ids, cfg, tok)
    if as_json:
        click.echo(json.dumps({
            "backend": session.backend, "artifact": str(art.path), "prompt_ids": ids,
            "prompt_tokens": result.prompt_tokens, "token_ids": result.token_ids, "text": result.text,
            "finish_reason": result.finish_reason, "stop": result.stop, "prefill_ms": result.prefill_ms,
            "decode_ms": result.decode_ms, "decode_tokens_per_s": result.decode_tokens_per_s,
            "session": session.describe(),
        }))
        return
    if not stream:
        gap = continuation_gap(tok, ids, result.token_ids[0]) if echo and not chat and result.token_ids else ""
        click.echo(gap + result.text if result.text is not None else " ".join(map(str, result.token_ids)))
    click.echo(
        f"[{session.backend}] {len(result.token_ids)} tokens · prefill {result.prefill_ms:.1f} ms · "
        f"decode {result.decode_tokens_per_s:.1f} tok/s · finish: {result.finish_reason}", err=True)


def _print_stream(gen, tok, as_json: bool, gap_after=None):
    """Print a stream's chunks as they come (text, ids without a tokenizer, or JSON lines); its result."""
    from .tokenizer import continuation_gap

    for chunk in gen:
        if as_json:
            click.echo(json.dumps({"token_id": chunk.token_id, "text": chunk.text if tok else None}))
        elif tok is not None:
            if gap_after is not None and chunk.token_id is not None:
                click.echo(continuation_gap(tok, gap_after, chunk.token_id), nl=False)
                gap_after = None
            click.echo(chunk.text, nl=False)
        elif chunk.token_id is not None:
            click.echo(f"{chunk.token_id} ", nl=False)
        sys.stdout.flush()
    if not as_json:
        click.echo()
    return gen.result


@click.command("chat")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--system", default=None, help="System prompt (kept when old messages are dropped).")
@tokenizer_options
@functools.partial(_sampling_options, max_new_tokens=256)
@backend_option()
@click.option("--threads", type=THREADS, default=None, help="CPU threads (default: physical cores).")
@friendly_errors
def chat_command(artifact, system, tokenizer, chat_template, max_new_tokens, temperature, top_k, top_p,
                 repetition_penalty, seed, backend, threads) -> None:
    """Chat with ARTIFACT: type a message, read the streamed reply. The history stays within the
    context (the oldest exchanges are dropped, with a notice); /reset forgets it, /exit or end of
    input quits."""
    from ..errors import GenerationError
    from .chat import Chat
    from .generate import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           repetition_penalty=repetition_penalty, seed=seed)
    art, session, tok = _open(artifact, backend, tokenizer, threads, chat_template)
    if tok is None:
        raise GenerationError(f"{art.path} has no tokenizer (tokenizer.json / tokenizer.model); pass --tokenizer DIR")
    chat = Chat(session, tok, cfg, system=system)
    stdin = click.get_text_stream("stdin")
    click.echo(f"chat with {art.path.name} · context {session.max_context} tokens · /reset forgets the history, "
               "/exit quits", err=True)
    while True:
        if stdin.isatty():
            click.echo("> ", nl=False, err=True)
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        message = line.rstrip("\r\n")
        if line.strip() == "/reset":
            chat.reset()
            click.echo("(history cleared)", err=True)
        elif line.strip().startswith("/"):
            click.echo(f"unknown command {line.strip()}: /reset or /exit", err=True)
        elif message.strip():
            _chat_turn(chat, message)


def _chat_turn(chat, message: str) -> None:
    """One exchange: a notice if old messages were dropped, then the reply as it streams."""
    from ..errors import GenerationError

    try:
        turn = chat.start(message)
    except GenerationError as e:  # too long for the context: say so and keep chatting
        click.echo(f"error: {e}", err=True)
        return
    if turn.dropped_messages:
        click.echo(f"(dropped the {turn.dropped_messages} oldest messages to fit the context of "
                   f"{chat.session.max_context} tokens)", err=True)
    for piece in chat.stream(turn):
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()


@click.command("bench")
@click.argument("artifact", type=click.Path(path_type=Path))
@backend_option()
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1), help="Sequences decoded together.")
@click.option("--prompt-len", default=64, show_default=True, type=click.IntRange(1), help="Prompt tokens per sequence.")
@click.option("--new-tokens", default=32, show_default=True, type=click.IntRange(1), help="Tokens generated per run.")
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1), help="Timed runs (the median is reported).")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0), help="Untimed runs first.")
@click.option("--threads", type=THREADS, default=None, help="CPU threads (default: physical cores).")
@click.option("--bandwidth-gib", default=0.25, show_default=True, type=FiniteFloat(0.0, 64.0),
              help="Least size of the array read to measure memory bandwidth (it is at least 4x the "
                   "last-level cache; 0 = skip).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@friendly_errors
def bench_command(artifact, backend, batch, prompt_len, new_tokens, runs, warmup, threads, bandwidth_gib,
                  as_json) -> None:
    """Time ARTIFACT: median TTFT and decode tokens/s, peak RSS, and the bandwidth limit."""
    from .bench import bench, render_bench

    art, session, _ = _open(artifact, backend, None, threads)
    result = bench(session, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, runs=runs, warmup=warmup,
                   bandwidth_gib=bandwidth_gib or None, artifact=str(art.path))
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        render_bench(result)
