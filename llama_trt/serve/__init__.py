"""Pipeline stage: serve — an OpenAI-compatible HTTP server over the runtime, and Triton packaging.

``create_app(engine, settings)`` builds the FastAPI app; :class:`Engine` is the bounded queue +
continuous-batching scheduler over any runtime ``Session``; ``build_engine`` opens an artifact;
``package_triton`` writes a Triton model repository. fastapi/uvicorn are imported only by the
app/server modules (``pip install llama-trt[serve]``).
"""

from .engine import Engine, GenRequest, InvalidRequestError, QueueFullError
from .settings import ServeSettings


def create_app(engine, settings=None):
    """See :func:`llama_trt.serve.app.create_app` (imported lazily: needs fastapi)."""
    from .app import create_app as _create_app

    return _create_app(engine, settings)


__all__ = ["Engine", "GenRequest", "InvalidRequestError", "QueueFullError", "ServeSettings", "create_app"]
