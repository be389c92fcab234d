"""toolkit.packing: packed gpt-oss examples see only themselves (eager attention on the CPU; flex on the GPU
is checked by bench/train_speed.py --check-packing); toolkit.memory: the embedding table kept off the GPU."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype="float32", attn_implementation="eager").eval()


def _packed_vs_separate(model) -> list[float]:
    import torch

    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    # longer than the tiny model's sliding window, so the sliding layers' masks matter too
    window = model.config.sliding_window or 4
    seqs = [torch.randint(0, vocab, (n,), generator=gen) for n in (window + 3, 2 * window + 1, 5)]
    with torch.no_grad():
        separate = [model(input_ids=s[None]).logits[0] for s in seqs]
        ids = torch.cat(seqs)[None]
        pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
        packed = model(input_ids=ids, position_ids=pos).logits[0]
    diffs, start = [], 0
    for s, ref in zip(seqs, separate, strict=True):
        diffs.append((packed[start:start + len(s)] - ref).abs().max().item())
        start += len(s)
    return diffs


def test_packed_examples_attend_only_to_themselves(model):
    from toolkit import packing

    before = _packed_vs_separate(model)
    assert before[0] < 1e-5 and max(before[1:]) > 1e-3  # transformers alone: later examples see earlier ones
    assert packing.mask_packed_examples(model) and packing.mask_packed_examples(model)  # idempotent
    after = _packed_vs_separate(model)
    assert max(after) < 1e-4, after


def test_unpacked_batches_are_untouched(model):
    import torch

    from toolkit import packing

    packing.mask_packed_examples(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        hooked = model(input_ids=ids, attention_mask=mask).logits
        handles = model.model._forward_pre_hooks
        saved = dict(handles)
        handles.clear()
        try:
            plain = model(input_ids=ids, attention_mask=mask).logits
        finally:
            handles.update(saved)
    assert torch.equal(hooked, plain)


def test_other_architectures_need_no_hook():
    import torch

    from toolkit import packing

    assert packing.mask_packed_examples(torch.nn.Linear(2, 2)) is False


def test_embedding_table_kept_off_the_accelerator(model):
    """toolkit.memory: lookups from a table the Trainer's model.to() does not move (CPU stands in for both)."""
    import copy

    import torch

    from toolkit import memory

    m = copy.deepcopy(model)
    ids = torch.randint(0, m.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = m(input_ids=ids).logits
    assert memory.offload_input_embeddings(m) == 0  # already on the CPU: nothing to do
    embedding = m.get_input_embeddings()
    size = embedding.weight.numel() * embedding.weight.element_size()
    assert memory.keep_table_on(embedding, "cpu", "cpu") == size
    assert "model.embed_tokens.weight" not in m.state_dict() and isinstance(embedding.weight, torch.Tensor)
    m.to(torch.float64)  # what the Trainer's placement does to the rest; the table stays as it was
    assert embedding.weight.dtype == torch.float32
    m.to(torch.float32)
    with torch.no_grad():
        after = m(input_ids=ids).logits
    assert torch.equal(before, after)
