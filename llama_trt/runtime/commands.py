"""``llama-trt run`` and ``llama-trt bench``: parse, call one library function, print.

Imports stay lazy so ``llama-trt --help`` and ONNX runs never pull in torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..cli_support import BACKEND_HELP, FiniteFloat, backend_option, friendly_errors

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


def _open(artifact: Path, backend: str, tokenizer: Path | None, threads: int | None):
    from . import load_tokenizer, open_session, resolve_artifact
    from .tokenizer import TokenizerError

    art = resolve_artifact(artifact)
    from ..validate.certificate import certificate_from_manifest

    if (cert := certificate_from_manifest(art.manifest)) is not None:
        click.echo(cert.summary(), err=True)  # what `validate` verified about this artifact
    session = open_session(art, backend, threads=threads)
    tok = load_tokenizer(tokenizer) if tokenizer else load_tokenizer(art.tokenizer_path())
    if tok is not None and tok.vocab_size > session.config.vocab_size:
        raise TokenizerError(
            f"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary is "
            f"{session.config.vocab_size}: it belongs to another model; pass --prompt-ids or the right --tokenizer"
        )
    return art, session, tok


@click.command("run")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", help="Prompt text (needs a tokenizer next to the artifact or --tokenizer).")
@click.option("--prompt-ids", help="Prompt token ids, comma separated (e.g. 1,2,3); used as given (no BOS added).")
@click.option("--chat", is_flag=True, help="Wrap --prompt as a user message with the tokenizer's chat template.")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="tokenizer.json or SentencePiece .model to use.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1),
              help="Tokens to generate at most (prompt + these must fit the context).")
@click.option("--temperature", default=0.0, show_default=True, type=FiniteFloat(0.0), help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(0), help="0 = off.")
@click.option("--top-p", default=1.0, show_default=True, type=FiniteFloat(0.0, 1.0, min_open=True), help="1 = off.")
@click.option("--repetition-penalty", default=1.0, show_default=True, type=FiniteFloat(0.0, min_open=True),
              help="1 = off (CTRL/HF).")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=None,
              help="Seed of the sampler (reproducible sampling), 0..2**64-1.")
@click.option("--stop", multiple=True, help="Stop string (repeatable; needs a tokenizer).")
@click.option("--stop-id", multiple=True, type=int, help="Stop token id (repeatable).")
@click.option("--ignore-eos", is_flag=True, help="Keep going past the end-of-sequence token.")
@backend_option()
@click.option("--threads", type=THREADS, default=None, help="CPU threads (default: physical cores).")
@click.option("--stream", is_flag=True, help="Print tokens as they are produced.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (with --stream: a JSON line per token first).")
@friendly_errors
def run_command(artifact, prompt, prompt_ids, chat, tokenizer, max_new_tokens, temperature, top_k, top_p,
                repetition_penalty, seed, stop, stop_id, ignore_eos, backend, threads, stream, as_json) -> None:
    """Generate from ARTIFACT: an export folder, an engine folder or a checkpoint."""
    from ..errors import GenerationError
    from . import GenerationConfig, generate
    from . import stream as stream_gen

    if (prompt is None) == (prompt_ids is None):
        raise GenerationError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    if prompt is not None and not prompt:
        raise GenerationError("the prompt is empty; give some text")
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           repetition_penalty=repetition_penalty, seed=seed, stop_strings=tuple(stop),
                           stop_token_ids=tuple(stop_id), ignore_eos=ignore_eos)
    ids = _parse_ids(prompt_ids) if prompt_ids is not None else None
    art, session, tok = _open(artifact, backend, tokenizer, threads)
    if ids is None:
        if tok is None:
            raise GenerationError(f"{art.path} has no tokenizer (tokenizer.json / tokenizer.model); "
                                  "pass --prompt-ids or --tokenizer")
        if chat:
            ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]), add_bos=False)
        else:
            ids = tok.encode(prompt)
    if stream:
        gen = stream_gen(session, ids, cfg, tok)
        for chunk in gen:
            if as_json:
                click.echo(json.dumps({"token_id": chunk.token_id, "text": chunk.text if tok else None}))
            elif tok is not None:
                click.echo(chunk.text, nl=False)
            elif chunk.token_id is not None:
                click.echo(f"{chunk.token_id} ", nl=False)
            sys.stdout.flush()
        if not as_json:
            click.echo()
        result = gen.result
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
        click.echo(result.text if result.text is not None else " ".join(map(str, result.token_ids)))
    click.echo(
        f"[{session.backend}] {len(result.token_ids)} tokens · prefill {result.prefill_ms:.1f} ms · "
        f"decode {result.decode_tokens_per_s:.1f} tok/s · finish: {result.finish_reason}", err=True)


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
    from .generate import GenerationConfig, check_request

    art, session, _ = _open(artifact, backend, None, threads)
    check_request([[1] * prompt_len], GenerationConfig(max_new_tokens=max(new_tokens, 1)), session)
    result = bench(session, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, runs=runs, warmup=warmup,
                   bandwidth_gib=bandwidth_gib or None, artifact=str(art.path))
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        render_bench(result)
