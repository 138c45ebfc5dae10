"""Parity with transformers: load one of our checkpoints in DeepseekV3ForCausalLM and compare logits.

    ./build/train logits --init CKPT --text "..." --out DIR [--precision fp32|bf16]
    python3 tests/hf_parity.py CKPT DIR/logits.bin [--dtype float32|bfloat16] [--tol 1e-3]

Compares the logits at every position (max |difference|), and checks that the tokenizer.json of the checkpoint,
loaded by the tokenizers library, encodes the same text to the same ids. Exits 1 when the difference exceeds --tol.
Needs torch and transformers (present on the GPU machine); nothing else in the project does.
"""
import argparse
import struct
import sys

import numpy as np
import torch
from transformers import DeepseekV3ForCausalLM, PreTrainedTokenizerFast


def read_logits(path):
    with open(path, "rb") as f:
        n, vocab = struct.unpack("<ii", f.read(8))
        tokens = np.frombuffer(f.read(4 * n), dtype=np.int32)
        logits = np.frombuffer(f.read(4 * n * vocab), dtype=np.float32).reshape(n, vocab)
    return tokens, logits


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("logits")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--text", help="the text given to `train logits`, to check the tokenizer too")
    args = parser.parse_args()

    tokens, ours = read_logits(args.logits)
    dtype = getattr(torch, args.dtype)
    model = DeepseekV3ForCausalLM.from_pretrained(args.checkpoint, dtype=dtype, attn_implementation="eager")
    model = model.cuda().eval()
    with torch.no_grad():
        theirs = model(torch.tensor(tokens, dtype=torch.long)[None].cuda()).logits[0].float().cpu().numpy()

    diff = np.abs(theirs - ours)
    print(f"{args.dtype}: {len(tokens)} positions x {ours.shape[1]} logits, max |ours - transformers| = "
          f"{diff.max():.3e} (mean {diff.mean():.3e}, max |logit| {np.abs(theirs).max():.2f})")
    ok = diff.max() <= args.tol

    if args.text is not None:
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=f"{args.checkpoint}/tokenizer.json")
        ids = tokenizer(args.text, add_special_tokens=False)["input_ids"]
        same = list(ids) == tokens.tolist()
        print(f"tokenizer.json encodes the text {'to the same ids' if same else 'DIFFERENTLY'}")
        ok = ok and same
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
