"""SIGTERM as an exception in the main thread, so ``finally`` blocks remove temporary folders,
and a check at every commit point for the SIGTERM whose exception Python swallowed.

Python runs a signal handler between two bytecodes of the main thread. When those bytecodes
belong to a weakref callback or a ``__del__`` (importlib's module-lock callback is one), an
exception the handler raises is printed as "Exception ignored" and dropped, and the command
runs on to the end. :class:`SigtermHandler` therefore also remembers that the signal came;
:func:`raise_if_terminated` (called by :func:`llama_trt.outputs.move_into_place` before it
publishes a folder, and by the CLI when a command returns) raises it again.

The handler's state lives in the handler object that the ``signal`` module holds for the
process (what :func:`install` put there), not in a global of ours. Imports nothing heavy.
"""

from __future__ import annotations

import signal

EXIT_CODE = 128 + signal.SIGTERM


class Terminated(SystemExit):
    """SIGTERM, raised in the main thread so ``finally`` blocks clean up temporary folders."""

    def __init__(self) -> None:
        super().__init__(EXIT_CODE)


class SigtermHandler:
    """The SIGTERM handler the CLI installs: records the signal, then raises :class:`Terminated`."""

    def __init__(self) -> None:
        self.received = False

    def __call__(self, signum, frame) -> None:
        self.received = True
        raise Terminated()


def install() -> tuple[SigtermHandler, object] | None:
    """Install a fresh :class:`SigtermHandler`; returns it and the handler it replaced, or
    ``None`` off the main thread (where Python refuses signal handlers)."""
    handler = SigtermHandler()
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None
    return handler, previous


def raise_if_terminated() -> None:
    """Raise :class:`Terminated` if the installed handler saw SIGTERM (its own raise was swallowed)."""
    handler = signal.getsignal(signal.SIGTERM)
    if isinstance(handler, SigtermHandler) and handler.received:
        raise Terminated()


__all__ = ["EXIT_CODE", "SigtermHandler", "Terminated", "install", "raise_if_terminated"]
