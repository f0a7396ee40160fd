"""Run under ``torchrun --nproc_per_node 2 ulysses_check.py KV_HEADS``: for every pattern
kind, a swapped model's logits and gradients with the sequence split over the processes by
DeepSpeed Ulysses equal those of one process over the whole sequence (computed in eval
mode, where the Ulysses wrapper steps aside). Prints one JSON line per case (rank 0).

Not a test module itself: ``test_sequence_parallel.py`` launches it.
"""

import json
import sys

import deepspeed.comm as dist
import torch
import torch.distributed as tdist
from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
from transformers import LlamaConfig, LlamaForCausalLM

import longswap
from longswap.swap import shard_heads

PATTERNS = [
    "full()",
    "sliding_window(window=24, sinks=2)",
    "dilated(window=32, dilation=2)",
    "local_global(window=12, global_tokens=(0, 33))",
    "bigbird(block_size=16, seed=1)",
    "shifted_groups(group_size=32)",
    "sliding_window(window=40) & shifted_groups(group_size=16)",
    "block_topk(block_size=16, top_k=2)",
    "sliding_window(window=16, sinks=2) | block_topk(block_size=16, top_k=2)",
    "sliding_window(window=16, sinks=2) | learned_topk(block_size=16, top_k=2)",
    "learned_topk(block_size=16, top_k=2, per_head=True, sub_block=4)",
]
LENGTH = 96


def model_for(kv_heads, pattern):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config)
    longswap.swap_attention(model, pattern, block_size=16)
    return model


def one_process(model, ids, positions):
    model.eval()  # Ulysses steps aside in eval mode (disable_in_eval): the whole sequence here
    out = model(input_ids=ids, position_ids=positions, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.train()
    return out.logits.detach(), grads


def split(model, ids, positions, rank, world):
    """The sequence's share of this process; the loss summed here, averaged over all."""
    share = slice(rank * LENGTH // world, (rank + 1) * LENGTH // world)
    with shard_heads(model, rank, world):
        logits = model(input_ids=ids[:, share], position_ids=positions[:, share]).logits
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1)[:, share]
    loss = torch.nn.functional.cross_entropy(logits[0], targets[0], reduction="sum")
    (loss / (LENGTH - 1)).backward()
    for p in model.parameters():
        if p.grad is not None:
            tdist.all_reduce(p.grad)
    return share, logits.detach()


def main():
    kv_heads = int(sys.argv[1])  # 1: fewer KV heads than processes, copied by Ulysses
    dist.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ids = torch.randint(0, 97, (1, LENGTH), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(LENGTH)[None].clone()
    positions[:, 40:] -= 40  # two packed documents: positions restart at 40
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_for(kv_heads, "full()"),
        core_attn_implementation="longswap",
        sequence_parallel_size=world,
        micro_batch_size=1,
        seq_length=LENGTH,
        disable_in_eval=True,
    )
    for pattern in PATTERNS if kv_heads > 1 else PATTERNS[:8]:
        model = model_for(kv_heads, pattern)
        logits, grads = one_process(model, ids, positions)
        share, local = split(model, ids, positions, rank, world)
        case = {
            "pattern": pattern,
            "kv_heads": kv_heads,
            "processes": mpu.get_sequence_parallel_world_size(),
            "logits": (local - logits[:, share]).abs().max().item(),
            "grads": max(
                (model.get_parameter(n).grad - g).abs().max().item() for n, g in grads.items()
            ),
            "scale": max(g.abs().max().item() for g in grads.values()),
        }
        if rank == 0:
            print(json.dumps(case), flush=True)
    # Leave the process groups before exit: without it, gloo's threads are sometimes torn
    # down mid-flight at interpreter exit ("terminate called without an active exception").
    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
