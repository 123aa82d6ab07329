"""Triton Inference Server python-backend model: llama-trt's generate semantics on Triton.

``llama-trt package ARTIFACT --triton OUT`` copies this file to ``OUT/<name>_generate/1/model.py``.
It runs the very scheduler of ``llama-trt serve`` (:class:`llama_trt.serve.engine.Engine`:
continuous batching, per-request seeded sampling, stop strings, max_tokens) over
``open_session`` on the artifact named by the ``artifact_dir`` parameter: an ONNX export
copied into ``1/artifact`` (ONNX Runtime) or the engine folder ``OUT/<name>/1`` (TensorRT).
Inputs are parsed by :mod:`llama_trt.serve.triton_request`. Needs ``llama-trt`` importable in
the python backend's interpreter.

Decoupled model: with ``stream`` true every request gets one response per text delta and a
final response (flag COMPLETE_FINAL) carrying ``finish_reason`` and token counts; with
``stream`` false (the default) only the final response with the whole text. Works with
Triton's ``/v2/models/<name>_generate/generate`` and ``generate_stream`` endpoints and gRPC
streaming. Refused requests get Triton's INVALID_ARG (HTTP 400); a full queue UNAVAILABLE.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time

import numpy as np

# Triton's python backend stub embeds Python in isolated mode, which ignores PYTHONPATH;
# honour it, so a llama-trt checkout on PYTHONPATH is the one this model imports.
for _p in reversed([p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]):
    if _p not in sys.path:
        sys.path.insert(0, _p)

try:  # provided by Triton's python backend
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - outside Triton (tests inject a stand-in module)
    pb_utils = None

INPUT_NAMES = ("text_input", "input_ids", "chat", "max_tokens", "temperature", "top_p", "top_k",
               "repetition_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "stream")
CANCEL_POLL_S = 0.5
ADMISSION_POLL_S = 0.002


def _param(cfg: dict, key: str, default: str) -> str:
    v = cfg.get("parameters", {}).get(key)
    if isinstance(v, dict):
        v = v.get("string_value")
    return str(v) if v not in (None, "") else default


def _error(message: str, code_name: str = "INVALID_ARG"):
    code = getattr(pb_utils.TritonError, code_name, None)
    err = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(error=err)


def _response(text: str, ids, finish: str = "", prompt: int = 0, completion: int = 0):
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
        pb_utils.Tensor("output_ids", np.asarray(list(ids), dtype=np.int64)),
        pb_utils.Tensor("finish_reason", np.array([finish.encode("utf-8")], dtype=np.object_)),
        pb_utils.Tensor("prompt_tokens", np.array([prompt], dtype=np.int32)),
        pb_utils.Tensor("completion_tokens", np.array([completion], dtype=np.int32)),
    ])


class TritonPythonModel:
    def initialize(self, args):
        from llama_trt.serve.server import build_engine

        cfg = json.loads(args["model_config"])
        here = os.path.join(args["model_repository"], args["model_version"])
        artifact = _param(cfg, "artifact_dir", _param(cfg, "engine_dir", ""))
        if not os.path.isabs(artifact):
            artifact = os.path.normpath(os.path.join(here, artifact))
        threads = int(_param(cfg, "threads", "0")) or None
        self.engine = build_engine(
            artifact, backend=_param(cfg, "backend", "auto"), max_batch=int(_param(cfg, "max_batch", "8")),
            max_queue=int(_param(cfg, "max_queue", "64")), model_name=cfg.get("name", "llama-trt"),
            **({"threads": threads} if threads else {}),
        ).start()
        self.default_max_tokens = int(_param(cfg, "default_max_tokens", "64"))
        timeout = float(_param(cfg, "request_timeout_s", "0"))
        self.request_timeout_s = timeout if timeout > 0 else None
        self._threads: set[threading.Thread] = set()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                greq, stream = self._submit(request)
            except Exception as e:  # noqa: BLE001 - becomes a Triton error response
                sender.send(_error(*_describe(e)), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            t = threading.Thread(target=self._respond, args=(greq, sender, stream), daemon=True)
            self._threads.add(t)
            t.start()
        self._wait_for_room()
        return None  # decoupled: responses go through the senders

    def _wait_for_room(self) -> None:
        """Return only once the scheduler has taken every submitted request into a batch slot:
        while all slots are busy the next requests wait in *Triton's* queue, so
        ``nv_inference_pending_request_count`` / ``nv_inference_queue_duration_us`` measure the
        load (what the HPA scales on) instead of staying at zero behind our own queue."""
        eng = self.engine
        while eng.queue_depth > 0 and eng.running:
            time.sleep(ADMISSION_POLL_S)

    def _submit(self, request):
        from llama_trt.serve.engine import GenRequest
        from llama_trt.serve.triton_request import parse_generate_inputs

        arrays = {}
        for name in INPUT_NAMES:
            t = pb_utils.get_input_tensor_by_name(request, name)
            if t is not None:
                arrays[name] = t.as_numpy()
        inp = parse_generate_inputs(arrays, self.engine, self.default_max_tokens)
        greq = self.engine.submit(GenRequest(inp.prompt_ids, inp.params, timeout_s=self.request_timeout_s))
        return greq, inp.stream

    def _respond(self, greq, sender, stream: bool) -> None:
        from llama_trt.serve.engine import ErrorEvent, FinishEvent, TokenEvent

        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        no_text = self.engine.tokenizer is None
        pending: list[int] = []  # streamed ids whose text is still held back (partial character, stop string)
        try:
            while True:
                try:
                    ev = greq.events.get(timeout=CANCEL_POLL_S)
                except queue.Empty:
                    if getattr(sender, "is_cancelled", lambda: False)():
                        greq.cancel()  # the client went away: the scheduler frees the slot
                        return
                    continue
                if isinstance(ev, TokenEvent):
                    pending.append(ev.token_id)
                    if stream and (ev.text or no_text):
                        sender.send(_response(ev.text, pending))
                        pending = []
                elif isinstance(ev, FinishEvent):
                    reason = "length" if ev.finish_reason == "length" else "stop"
                    text, ids = (ev.text, pending) if stream else (ev.full_text, ev.token_ids)
                    sender.send(_response(text, ids, reason, ev.prompt_tokens, ev.completion_tokens), flags=final)
                    return
                elif isinstance(ev, ErrorEvent):
                    sender.send(_error(ev.message, "INVALID_ARG" if ev.status < 500 else "UNAVAILABLE"), flags=final)
                    return
        except Exception:  # noqa: BLE001 - the client is gone (sender closed): free the slot
            greq.cancel()
        finally:
            self._threads.discard(threading.current_thread())

    def finalize(self):
        self.engine.close()
        for t in list(self._threads):
            t.join(timeout=5)


def _describe(e: Exception) -> tuple[str, str]:
    """(message, Triton error code name) for a request refused before it reached the scheduler."""
    from llama_trt.errors import LlamaTrtError
    from llama_trt.serve.engine import EngineStoppedError, QueueFullError

    if isinstance(e, (QueueFullError, EngineStoppedError)):
        return str(e), "UNAVAILABLE"
    if isinstance(e, LlamaTrtError):
        return str(e), "INVALID_ARG"
    return f"{type(e).__name__}: {e}", "INTERNAL"
