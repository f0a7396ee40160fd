"""TRL's SFTTrainer on a swapped model: padding-free packing (positions that restart, no
attention mask) trains each document as a sequence of its own."""

import pytest
import torch
import torch.nn.functional as F

import longswap
from longswap.data import byte_tokenizer
from longswap.patterns import block_topk, sliding_window

from ..swap.conftest import make_model

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

PATTERN = sliding_window(window=12, sinks=2) | block_topk(block_size=8, top_k=2)


def _trainer(tmp_path, model):
    texts = [("longswap packs documents " * 9)[: 17 + 13 * i] for i in range(12)]
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        packing=True,
        packing_strategy="bfd",
        max_length=96,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )
    data = datasets.Dataset.from_dict({"text": texts})
    return trl.SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=byte_tokenizer()
    )


def test_sft_trainer_packed_batches_equal_their_documents_alone(tmp_path):
    model = make_model("llama", vocab_size=257, max_position_embeddings=128)
    longswap.swap_attention(model, PATTERN, backend="blocks", block_size=8)
    trainer = _trainer(tmp_path, model)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch  # padding-free: documents only in the positions
    ids, positions, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
    starts = (positions[0] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
    assert len(starts) > 2  # several documents in the row
    with torch.no_grad():
        packed = model(ids, position_ids=positions).logits.float()
        packed_loss = F.cross_entropy(packed[0, :-1], labels[0, 1:], reduction="sum")
        alone_loss = sum(
            F.cross_entropy(
                model(ids[:, a:b]).logits.float()[0, :-1], ids[0, a + 1 : b], reduction="sum"
            )
            for a, b in zip(starts[:-1], starts[1:], strict=True)
        )
    torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-5, atol=1e-4)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
