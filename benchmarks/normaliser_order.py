"""How far a float32 normaliser moves a teacher's logprobs when its vocabulary is permuted, and the float64 one.

    python benchmarks/normaliser_order.py                        # SmolLM2-135M-Instruct, prepared as `make demo` does
    python benchmarks/normaliser_order.py --model models/smollm2

The model and a copy with its vocabulary permuted (`opd models prepare --permute-vocab`, the same function under
other ids) score one text. Printed: whether the logits are the same bits under the new ids, and the largest gap
between the two models' logprobs with torch's float32 log_softmax (what vLLM computes) and with opd's float64
normaliser (services/common/hf.py choice 3, the teachers' since cbe3385).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

TEXT = ("What is the capital of Thailand? The capital of Thailand is Bangkok, a city of temples, canals and markets "
        "on the Chao Phraya river.")


def main() -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.common.hf import float64_log_softmax
    from opd.common.models import prepare
    from opd.common.vocab_variants import permuted_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model folder (default: SmolLM2-135M-Instruct, prepared)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="normaliser-") as folder:
        model = Path(args.model) if args.model else prepare("smollm2-135m-instruct", Path(folder) / "plain")
        other = permuted_model(Path(model), Path(folder) / "permuted", seed=1)
        plain_tok, other_tok = AutoTokenizer.from_pretrained(model), AutoTokenizer.from_pretrained(other)
        other_vocab = other_tok.get_vocab()
        perm = torch.tensor([other_vocab[t] for t, _ in sorted(plain_tok.get_vocab().items(), key=lambda x: x[1])])
        ids = plain_tok(TEXT)["input_ids"]
        with torch.inference_mode():
            logits = [AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(
                torch.tensor([seq])).logits[0] for path, seq in ((model, ids), (other, perm[ids].tolist()))]
    plain, permuted = logits[0], logits[1][:, perm]  # the permuted model's logits in the plain ids
    print(f"{len(ids)} tokens, vocabulary {plain.shape[-1]}: logits the same bits under the new ids: "
          f"{torch.equal(plain, permuted)} (largest gap {(plain - permuted).abs().max().item():.1e})")
    f32 = (torch.log_softmax(logits[0], -1) - torch.log_softmax(logits[1], -1)[:, perm]).abs().max().item()
    f64 = (float64_log_softmax(logits[0]) - float64_log_softmax(logits[1])[:, perm]).abs().max().item()
    print(f"largest logprob gap, float32 log_softmax: {f32:.1e}; float64 normaliser: {f64:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
