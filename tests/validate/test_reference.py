"""A shared torch reference (validate/reference.py): the same certificate and report, the torch side run once."""

from __future__ import annotations

import pytest

from llama_trt.errors import ValidationError
from llama_trt.validate import validate
from llama_trt.validate import teacher_forced as TF
from llama_trt.validate.reference import TorchReference
from llama_trt.validate.teacher_forced import certify


def _timeless(d: dict) -> dict:
    """A report or certificate dict without its wall-clock fields (all that may differ between runs)."""
    out = {k: v for k, v in d.items() if k != "seconds"}
    if isinstance(out.get("certificate"), dict):
        out["certificate"] = _timeless(out["certificate"])
    return out


@pytest.fixture
def counted_torch_passes(monkeypatch) -> list[tuple]:
    """Every batch the fp32 torch model runs for the certificate, as its ids' shape."""
    calls: list[tuple] = []
    real = TF.torch_logits_fn

    def counting(model):
        run = real(model)

        def wrapped(ids):
            calls.append(tuple(ids.shape))
            return run(ids)

        return wrapped

    monkeypatch.setattr(TF, "torch_logits_fn", counting)
    return calls


def test_shared_reference_gives_the_same_certificates_and_runs_torch_once(tiny_fp16, tiny_fp32, tiny_ckpt,
                                                                         counted_torch_passes):
    alone = [certify(art, tiny_ckpt) for art in (tiny_fp16, tiny_fp32)]
    passes_alone = len(counted_torch_passes)
    assert passes_alone >= 2  # one certificate ran at least one batch through torch

    ref = TorchReference(tiny_ckpt)
    shared = [certify(art, tiny_ckpt, reference=ref) for art in (tiny_fp16, tiny_fp32)]
    assert [_timeless(c.to_dict()) for c in shared] == [_timeless(c.to_dict()) for c in alone]
    assert shared[0].kl != shared[1].kl  # two different artifacts, not one result served twice
    # the second certificate's torch side came from the first's: half the passes of two alone
    assert len(counted_torch_passes) - passes_alone == passes_alone // 2


def test_shared_reference_gives_the_same_validation_report(tiny_fp16, tiny_ckpt):
    kw = dict(steps=6, write_certificate=False)
    alone = validate(tiny_fp16, tiny_ckpt, **kw)
    ref = TorchReference(tiny_ckpt)
    first = validate(tiny_fp16, tiny_ckpt, reference=ref, **kw)
    again = validate(tiny_fp16, str(tiny_ckpt), reference=ref, **kw)  # everything torch computes now comes kept
    assert alone.passed and first.passed
    assert _timeless(first.to_dict()) == _timeless(alone.to_dict()) == _timeless(again.to_dict())


def test_reference_of_another_checkpoint_is_refused(tiny_fp16, tiny_ckpt, tmp_path):
    from llama_trt.checkpoint import create_tiny_checkpoint

    other = TorchReference(create_tiny_checkpoint(tmp_path / "other", seed=1))
    with pytest.raises(ValidationError, match="shared torch reference was built from"):
        certify(tiny_fp16, tiny_ckpt, reference=other)
    with pytest.raises(ValidationError, match="shared torch reference was built from"):
        validate(tiny_fp16, tiny_ckpt, reference=other, steps=4, write_certificate=False)
