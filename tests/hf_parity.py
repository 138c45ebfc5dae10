"""Parity with transformers: load one of our checkpoints in DeepseekV3ForCausalLM and compare logits.

    ./build/train logits --init CKPT --text "..." --out DIR [--precision fp32|bf16]
    python3 tests/hf_parity.py CKPT DIR/logits.bin [--dtype float32|bfloat16] [--tol 1e-3] [--text "..."]
    python3 tests/hf_parity.py CKPT --bias-shift 1.0 --text "..."

Compares the logits at every position (max |difference|), and checks that the tokenizer.json of the checkpoint,
loaded by the tokenizers library, encodes the same text to the same ids. Exits 1 when the difference exceeds --tol.

For a MoE checkpoint it counts the routing decisions where the masking of dropped expert groups matters: tokens
whose kept groups hold fewer than top_k experts with a positive biased score (s + b). There a mask of 0.0 (older
transformers) and one of -inf (V3's release, and our router) choose differently. --bias-shift X makes such tokens
common: it lowers the router biases of every expert by X (of the odd ones by 2X) in a copy of the checkpoint, runs
`train logits` on the copy (--train names the binary) and compares that.

Needs torch and transformers (present on the GPU machine); nothing else in the project does.
"""
import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np
import torch
from transformers import DeepseekV3ForCausalLM, PreTrainedTokenizerFast


def read_logits(path):
    with open(path, "rb") as f:
        n, vocab = struct.unpack("<ii", f.read(8))
        tokens = np.frombuffer(f.read(4 * n), dtype=np.int32)
        logits = np.frombuffer(f.read(4 * n * vocab), dtype=np.float32).reshape(n, vocab)
    return tokens, logits


def shifted_copy(checkpoint, shift, train, text, precision):
    """A copy of the checkpoint with the router biases lowered by shift (the odd experts' by twice that), and our
    logits on it."""
    from safetensors.torch import load_file, save_file
    folder = tempfile.mkdtemp(prefix="hf_parity_")
    copy = os.path.join(folder, "checkpoint")
    shutil.copytree(checkpoint, copy)
    weights = os.path.join(copy, "model.safetensors")
    tensors = load_file(weights)
    for name, tensor in tensors.items():
        if name.endswith("e_score_correction_bias"):
            tensor -= shift
            tensor[1::2] -= shift
    save_file(tensors, weights, metadata={"format": "pt"})
    out = os.path.join(folder, "logits")
    subprocess.run([train, "logits", "--init", copy, "--text", text, "--out", out, "--precision", precision],
                   check=True, stdout=subprocess.DEVNULL)
    return copy, os.path.join(out, "logits.bin")


def count_masking_decisions(model, tokens):
    """Tokens (per MoE layer, summed) whose kept groups have fewer than top_k experts with s + b > 0."""
    counted = []

    def hook(gate, inputs, output):
        logits = output[0].float()
        biased = logits.sigmoid() + gate.e_score_correction_bias
        groups = biased.view(-1, gate.num_group, gate.num_experts // gate.num_group)
        group_scores = groups.topk(2, dim=-1)[0].sum(dim=-1)
        kept = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(gate.topk_group, dim=-1)[1], 1.0)
        positive = ((groups > 0) & (kept.unsqueeze(-1) > 0)).flatten(1).sum(dim=-1)
        counted.append(int((positive < gate.top_k).sum()))

    handles = [m.register_forward_hook(hook) for n, m in model.named_modules() if n.endswith("mlp.gate")]
    with torch.no_grad():
        model(torch.tensor(tokens, dtype=torch.long)[None].cuda())
    for h in handles:
        h.remove()
    return sum(counted), len(handles)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("logits", nargs="?", help="our logits.bin (not with --bias-shift, which makes its own)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--text", help="the text given to `train logits`, to check the tokenizer too")
    parser.add_argument("--bias-shift", type=float, help="compare on a copy whose router biases are lowered")
    parser.add_argument("--train", default="./build/train", help="our binary, for --bias-shift")
    args = parser.parse_args()
    if args.bias_shift is not None:
        if args.text is None:
            parser.error("--bias-shift needs --text")
        precision = "fp32" if args.dtype == "float32" else "bf16"
        args.checkpoint, args.logits = shifted_copy(args.checkpoint, args.bias_shift, args.train, args.text,
                                                    precision)
    elif args.logits is None:
        parser.error("the logits.bin of `train logits` is needed (or --bias-shift)")

    tokens, ours = read_logits(args.logits)
    dtype = getattr(torch, args.dtype)
    model = DeepseekV3ForCausalLM.from_pretrained(args.checkpoint, dtype=dtype, attn_implementation="eager")
    model = model.cuda().eval()
    with torch.no_grad():
        theirs = model(torch.tensor(tokens, dtype=torch.long)[None].cuda()).logits[0].float().cpu().numpy()

    diff = np.abs(theirs - ours)
    print(f"{args.dtype}: {len(tokens)} positions x {ours.shape[1]} logits, max |ours - transformers| = "
          f"{diff.max():.3e} (mean {diff.mean():.3e}, max |logit| {np.abs(theirs).max():.2f})")
    decisions, layers = count_masking_decisions(model, tokens)
    if layers:
        print(f"{layers} MoE layers: {decisions} of {layers * len(tokens)} token routings have fewer than top_k "
              f"positive biased scores in their kept groups (where a 0.0 mask and a -inf mask differ)")
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
