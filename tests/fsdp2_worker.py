"""One process of tests/test_train.py's FSDP2 check (started by torchrun, 2 processes, gloo on the CPU).

Each process loads the tiny gpt-oss with the toolkit's LoRA (attention + experts, low-rank expert path),
shards it with FSDP2 (`fully_shard` per decoder layer and the root, as accelerate's FSDP2 plugin wraps
GptOssDecoderLayer) and takes 3 AdamW steps on its own batch. The same model unsharded takes the same
3 steps on both batches at once; rank 0 prints both loss curves and the sharding as one JSON line.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp2_worker.py TINY_MODEL_DIR
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from toolkit import lora
from toolkit.config import build

STEPS, ROWS, SEQ = 3, 2, 24


def model(base: str):
    cfg = build("train", "tiny-cpu", [f"train.base_model={json.dumps(base)}", "train.lowrank_experts=true",
                                      'train.experts_implementation="grouped_mm"'])
    return lora.attach_lora(lora.load_base(cfg), cfg)  # LoRA weights seeded by cfg.seed: equal on every rank


def batch(rank: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (ROWS, SEQ), generator=torch.Generator().manual_seed(rank))


def train(net, ids: torch.Tensor, reduce: bool) -> list[float]:
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        value = loss.detach().clone()
        if reduce:  # the global batch's loss: mean of the ranks' (equal token counts)
            dist.all_reduce(value)
            value /= dist.get_world_size()
        losses.append(float(value))
    return losses


def main(base: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    reference = model(base)
    vocab = reference.config.vocab_size
    together = torch.cat([batch(r, vocab) for r in range(world)])
    expected = train(reference, together, reduce=False)

    sharded = model(base)
    for layer in sharded.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    trainable = {n: p for n, p in sharded.named_parameters() if p.requires_grad}
    got = train(sharded, batch(rank, vocab), reduce=True)
    if rank == 0:
        print(json.dumps({
            "expected": expected,
            "got": got,
            "trainable": len(trainable),
            "dtensor_trainable": sum(isinstance(p, DTensor) for p in trainable.values()),
            "expert_lora": sorted({n.split(".")[-3] for n in trainable if "experts" in n}),
            "local_share": sum(p.to_local().numel() for p in trainable.values()) / sum(p.numel()
                                                                                 for p in trainable.values()),
        }), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
