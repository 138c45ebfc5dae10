"""The PyTorch twin of our model, for side-by-side training speed.

transformers' DeepseekV3ForCausalLM in the shape of our default config (DeepSeekMoE after one dense layer; --dense:
every FFN dense, the config of bench/dense_config.json), trained the way a PyTorch user would: fused AdamW, eager
and torch.compile, with FP32 master weights under BF16 autocast ("fp32") and with BF16 weights ("bf16"). The experts
run through transformers' grouped_mm backend where it has one. Prints one table row per mode: ms per step and
tokens/s for B x T tokens per step; the fastest row is PyTorch's best.

    python3 bench/torch_twin.py [--batch 64] [--seq 512] [--steps 20] [--modes fp32-eager,fp32-compile,...] [--dense]
"""
import argparse
import time

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM


def twin_config(dense):
    return DeepseekV3Config(
        vocab_size=128, hidden_size=384, intermediate_size=1280 if dense else 1024, num_hidden_layers=8,
        num_attention_heads=6, num_key_value_heads=6, q_lora_rank=256, kv_lora_rank=128,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, max_position_embeddings=512,
        first_k_dense_replace=8 if dense else 1, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
        n_group=4, topk_group=2, moe_intermediate_size=256, routed_scaling_factor=2.5, norm_topk_prob=True,
        rope_interleave=True, rms_norm_eps=1e-6, tie_word_embeddings=False)


def time_mode(mode, args):
    weights, how = mode.split("-")
    torch._dynamo.reset()  # each mode compiles afresh, within dynamo's recompile limit
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(twin_config(args.dense)).cuda().train()
    if weights == "bf16":
        model = model.to(torch.bfloat16)
    experts = "default"
    if hasattr(model, "set_experts_implementation") and not args.dense:
        model.set_experts_implementation("grouped_mm")
        experts = "grouped_mm"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    tokens = torch.randint(0, 128, (args.batch, args.seq + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=weights == "fp32"):
            logits = model(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 128), tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if how == "compile":
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
    return ms, args.batch * args.seq / ms * 1e3, experts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--modes", default="fp32-eager,fp32-compile,bf16-eager,bf16-compile")
    parser.add_argument("--dense", action="store_true", help="every FFN dense (bench/dense_config.json's shape)")
    args = parser.parse_args()
    print(f"{'torch ' + ('dense' if args.dense else 'moe'):<8} {'mode':<13} {'ms/step':>8} {'tokens/s':>12}   "
          f"({args.batch} x {args.seq} tokens, {torch.cuda.get_device_name()}, torch {torch.__version__})")
    for mode in args.modes.split(","):
        ms, tps, experts = time_mode(mode, args)
        print(f"{'':<8} {mode:<13} {ms:8.2f} {tps:12,.0f}   experts: {experts}", flush=True)


if __name__ == "__main__":
    main()
