"""Triton Inference Server python-backend model: llama-trt's generate semantics on Triton.

``llama-trt package ENGINE_DIR --triton OUT`` copies this file to
``OUT/<name>_generate/1/model.py``. It runs the very scheduler of ``llama-trt serve``
(:class:`llama_trt.serve.engine.Engine`: continuous batching, per-request seeded
sampling, stop strings, max_tokens) over ``open_session`` on the engine folder
``OUT/<name>/1`` (model.plan + manifest.json + tokenizer files), so a Triton deployment
answers exactly what the OpenAI server answers. Needs ``llama-trt`` (and TensorRT)
importable in Triton's python-backend environment.

Decoupled model: every request gets one response per text delta and a final response
(flag COMPLETE_FINAL) carrying ``finish_reason`` and token counts; with ``stream`` false
it gets only the final response with the whole text. Works with Triton's
``/v2/models/<name>_generate/generate`` and ``generate_stream`` endpoints.
"""

from __future__ import annotations

import json
import os
import threading

import numpy as np

try:  # provided by Triton's python backend
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - outside Triton (tests inject a stand-in module)
    pb_utils = None


def _param(cfg: dict, key: str, default: str) -> str:
    v = cfg.get("parameters", {}).get(key)
    if isinstance(v, dict):
        v = v.get("string_value")
    return str(v) if v not in (None, "") else default


def _scalar(request, name: str, default=None):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return default
    a = t.as_numpy().reshape(-1)
    if a.size == 0:
        return default
    v = a[0]
    return v.decode("utf-8") if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v


def _strings(request, name: str) -> tuple[str, ...]:
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return ()
    return tuple(v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in t.as_numpy().reshape(-1) if v)


class TritonPythonModel:
    def initialize(self, args):
        from llama_trt.serve.engine import Engine  # noqa: F401 - fail early if llama-trt is missing
        from llama_trt.serve.server import build_engine

        cfg = json.loads(args["model_config"])
        here = os.path.join(args["model_repository"], args["model_version"])
        engine_dir = _param(cfg, "engine_dir", "")
        if not os.path.isabs(engine_dir):
            engine_dir = os.path.normpath(os.path.join(here, engine_dir))
        self.engine = build_engine(
            engine_dir, backend=_param(cfg, "backend", "auto"), max_batch=int(_param(cfg, "max_batch", "8")),
            max_queue=int(_param(cfg, "max_queue", "64")), model_name=cfg.get("name", "llama-trt"),
        ).start()
        self.default_max_tokens = int(_param(cfg, "default_max_tokens", "64"))
        self._threads: set[threading.Thread] = set()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                greq, stream = self._submit(request)
            except Exception as e:  # noqa: BLE001 - becomes a Triton error response
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            t = threading.Thread(target=self._respond, args=(greq, sender, stream), daemon=True)
            self._threads.add(t)
            t.start()
        return None  # decoupled: responses go through the senders

    def _submit(self, request):
        from llama_trt.serve.engine import GenRequest, request_config

        eng = self.engine
        text = _scalar(request, "text_input")
        if not text:
            raise ValueError("text_input is empty")
        ids = eng.tokenizer.encode(text) if eng.tokenizer is not None else [int(x) for x in text.split(",")]
        max_tokens = _scalar(request, "max_tokens", None)
        max_tokens = eng.check(ids, int(max_tokens) if max_tokens is not None else None)
        if _scalar(request, "max_tokens", None) is None:
            max_tokens = min(max_tokens, self.default_max_tokens)
        seed = _scalar(request, "seed", None)
        params = request_config(
            max_tokens, temperature=float(_scalar(request, "temperature", 0.0)),
            top_k=int(_scalar(request, "top_k", 0)), top_p=float(_scalar(request, "top_p", 1.0)),
            repetition_penalty=float(_scalar(request, "repetition_penalty", 1.0)),
            seed=int(seed) if seed is not None else None, stop_strings=_strings(request, "stop"))
        greq = eng.submit(GenRequest(ids, params))
        return greq, bool(_scalar(request, "stream", True))

    def _respond(self, greq, sender, stream: bool) -> None:
        from llama_trt.serve.engine import ErrorEvent, FinishEvent, TokenEvent

        def out(text: str, finish: str = "", prompt: int = 0, completion: int = 0):
            return pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
                pb_utils.Tensor("finish_reason", np.array([finish.encode("utf-8")], dtype=np.object_)),
                pb_utils.Tensor("prompt_tokens", np.array([prompt], dtype=np.int32)),
                pb_utils.Tensor("completion_tokens", np.array([completion], dtype=np.int32)),
            ])

        try:
            while True:
                ev = greq.events.get()
                if isinstance(ev, TokenEvent):
                    if stream and ev.text:
                        sender.send(out(ev.text))
                elif isinstance(ev, FinishEvent):
                    text = ev.text if stream else ev.full_text
                    sender.send(out(text, "length" if ev.finish_reason == "length" else "stop", ev.prompt_tokens,
                                    ev.completion_tokens), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    return
                elif isinstance(ev, ErrorEvent):
                    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(ev.message)),
                                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    return
        except Exception:  # noqa: BLE001 - the client is gone (sender closed): free the slot
            greq.cancel()
        finally:
            self._threads.discard(threading.current_thread())

    def finalize(self):
        self.engine.close()
        for t in list(self._threads):
            t.join(timeout=5)
