"""A small word-level tokenizer for the tiny model (vocab 256), with a chat template."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = [
    "the", "a", "cat", "dog", "sat", "on", "mat", "and", "ran", "to", "house", "big", "small", "red", "blue",
    "is", "was", "it", "he", "she", "they", "we", "you", "i", "hello", "world", "story", "once", "upon", "time",
    "there", "lived", "little", "girl", "boy", "who", "loved", "play", "in", "park", "sun", "moon", "tree",
    "bird", "fish", "water", "day", "night", "happy", "sad", "user", "assistant", "system", ":", ".", ",", "!", "?",
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def write_tokenizer(folder: Path, vocab_size: int = 256) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    i = 0
    while len(vocab) < vocab_size:
        vocab.setdefault(f"w{i}", len(vocab))
        i += 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken("<unk>", special=True), AddedToken("<s>", special=True),
                            AddedToken("</s>", special=True)])
    folder = Path(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))


# ---------------------------------------------------------------------------------------
# a real uvicorn server in a background thread, and a session we can slow down or hold
import threading  # noqa: E402
import time  # noqa: E402


from llama_trt.serve.server import BackgroundServer as ServerThread  # noqa: E402,F401
from llama_trt.serve.server import free_port  # noqa: E402,F401


class GatedSession:
    """Wraps a Session: every step waits for ``gate`` and then sleeps ``delay`` seconds."""

    def __init__(self, inner, delay: float = 0.0) -> None:
        self.inner = inner
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()
        self.config = inner.config
        self.max_context = inner.max_context
        self.backend = inner.backend

    def reset(self, batch, capacity=None):
        return self.inner.reset(batch, capacity)

    def step(self, ids, mask, pos, **kw):
        self.gate.wait(30)
        if self.delay:
            time.sleep(self.delay)
        return self.inner.step(ids, mask, pos, **kw)

    def describe(self):
        return self.inner.describe()

    def close(self):
        self.inner.close()


def wait_for(pred, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()
