"""The PyTorch twin of our model, for side-by-side training speed.

transformers' DeepseekV3ForCausalLM in the same shape as our default config (dense SwiGLU in every layer), trained
the way a PyTorch user would: FP32 master weights with BF16 autocast and fused AdamW, eager and torch.compile.
Prints one table row per mode: ms per step and tokens/s for B x T tokens per step.

    python3 bench/torch_twin.py [--batch 64] [--seq 512] [--steps 20] [--modes eager,compile]
"""
import argparse
import time

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM


def twin_config(layers):
    return DeepseekV3Config(
        vocab_size=128, hidden_size=384, intermediate_size=1024, num_hidden_layers=layers,
        num_attention_heads=6, num_key_value_heads=6, q_lora_rank=256, kv_lora_rank=128,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, max_position_embeddings=512,
        first_k_dense_replace=layers, rope_interleave=True, rms_norm_eps=1e-6, tie_word_embeddings=False)


def time_mode(mode, args):
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(twin_config(args.layers)).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    tokens = torch.randint(0, 128, (args.batch, args.seq + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 128), tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if mode == "compile":
        step = torch.compile(step)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    ms = sorted(times)[len(times) // 2] * 1e3
    return ms, args.batch * args.seq / ms * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--modes", default="eager,compile")
    args = parser.parse_args()
    print(f"{'mode':<10} {'ms/step':>9} {'tokens/s':>12}   ({args.batch} x {args.seq} tokens, {torch.cuda.get_device_name()})")
    for mode in args.modes.split(","):
        ms, tps = time_mode(mode, args)
        print(f"{mode:<10} {ms:9.1f} {tps:12,.0f}")


if __name__ == "__main__":
    main()
