"""Learned selection in training: the warm-up distils dense attention into the selectors,
the joint stage trains model and selectors together, and both resume exactly."""

import copy
import math

import pytest
import torch

import longswap
from longswap.patterns import learned_topk, sliding_window
from longswap.selectors import (
    SELECTOR_ATTR,
    BlockGate,
    captured_mass,
    dense_block_mass,
    selector_kl,
)
from longswap.selectors.distill import top_blocks
from longswap.swap import observe
from longswap.train import FinetuneConfig, finetune
from longswap.train.data import PackedDataset
from longswap.train.signals import SelectorDistillation, step_generator
from longswap.train.teacher import RowSamples, SelectorStudent

from ..swap.conftest import make_model
from .test_finetune import base, run  # noqa: F401  (the module-scoped pre-trained base)

PATTERN = "learned_topk(block_size=8, top_k=2)"


@pytest.mark.parametrize("q_len", [50, 13])  # a prompt; queries after 37 cached keys
def test_dense_block_mass_pools_the_oracle_in_chunks(q_len):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, q_len, 8, generator=g), torch.randn(2, 2, 50, 8, generator=g)
    mass = dense_block_mass(q, k, block_size=8, chunk=7)  # chunks that straddle blocks
    scores = (q.reshape(2, 2, 2, q_len, 8) @ k[:, :, None].transpose(-1, -2)) / 8**0.5
    causal = torch.ones(50, 50, dtype=torch.bool).tril()[50 - q_len :]
    p = scores.masked_fill(~causal, float("-inf")).softmax(-1)  # (B, Hkv, group, Lq, L)
    expected = p[..., :48].unflatten(-1, (6, 8)).sum(-1).amax(2)
    torch.testing.assert_close(mass, expected, atol=1e-6, rtol=1e-6)
    per_head = dense_block_mass(q, k, block_size=8, chunk=7, per_head=True)
    torch.testing.assert_close(per_head, p[..., :48].unflatten(-1, (6, 8)).sum(-1).flatten(1, 2))
    # Keys shown anyway (a window of 10 and 2 sinks) are left out of the blocks' mass.
    shown = torch.ones(50, 50, dtype=torch.bool).tril().triu(-9)[50 - q_len :]
    shown[:, :2] = True
    static = sliding_window(window=10, sinks=2)
    mass = dense_block_mass(q, k, block_size=8, chunk=7, static=static)
    p = p.masked_fill(shown, 0)
    torch.testing.assert_close(mass, p[..., :48].unflatten(-1, (6, 8)).sum(-1).amax(2))
    # Some rows only (the joint stage's sample): those rows of the whole, per group and head.
    picked = torch.tensor([0, 3, 4, 11, q_len - 1])
    for per_head in (False, True):
        whole = dense_block_mass(q, k, 8, chunk=7, static=static, per_head=per_head)
        some = dense_block_mass(q, k, 8, chunk=2, static=static, per_head=per_head, picked=picked)
        torch.testing.assert_close(some, whole[:, :, picked], atol=1e-6, rtol=1e-6)


def test_captured_mass_and_its_log_equal_the_dense_attention_on_the_keys_seen():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 4, 40, 8, generator=g) * 2, torch.randn(1, 2, 40, 8, generator=g)
    pattern = sliding_window(window=6, sinks=1) | learned_topk(8, 1)
    selected = torch.rand(1, 2, 40, 5, generator=g) > 0.5
    shares = captured_mass(q, k, pattern, selected, 8, chunk=7, oracle_top_k=1)
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 8**0.5
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    p = scores.masked_fill(~causal, float("-inf")).softmax(-1)  # (1, 4, 40, 40)
    seen = pattern.dense_mask(40, 40)[None, None] | (
        selected.repeat_interleave(2, 1).repeat_interleave(8, -1) & causal
    )
    kept = (p * seen).sum(-1)  # (1, 4, 40)
    assert shares.kept == pytest.approx(float(kept.mean()), abs=1e-6)
    assert shares.kept_nats == pytest.approx(float(-kept.log().mean()), abs=1e-5)
    # The oracle keeps at least as much in every row, so its mean -log is no larger.
    assert shares.oracle >= shares.kept and shares.oracle_nats <= shares.kept_nats
    assert captured_mass(q, k, pattern, selected, 8).oracle is None


def test_selector_kl_is_zero_at_the_target_and_counts_only_candidates():
    target = torch.tensor([[[[0.5, 0.3, 0.2, 0.0]]]])
    candidates = torch.tensor([[True, True, False, False]])
    exact = torch.log(torch.tensor([[[[5.0, 3.0, 1.0, 1.0]]]]))
    assert float(selector_kl(exact, target, candidates)) == pytest.approx(0.0, abs=1e-6)
    flat = torch.zeros(1, 1, 1, 4, requires_grad=True)
    loss = selector_kl(flat, target, candidates)
    assert loss.item() > 0.01
    loss.backward()
    assert flat.grad[..., 2:].abs().max() == 0  # non-candidates get no gradient


def test_selector_kl_without_a_candidate_is_a_finite_zero_with_a_gradient():
    scores = torch.tensor([[[[float("-inf"), 0.3, float("-inf"), 1.0]]]], requires_grad=True)
    loss = selector_kl(scores, torch.rand(1, 1, 1, 4), torch.zeros(1, 4, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert bool(torch.isfinite(scores.grad).all())


@pytest.mark.parametrize("method", ["selector", "full"])
def test_a_selector_with_no_block_to_select_is_refused_first(base, tmp_path, method):  # noqa: F811
    union = "sliding_window(window=128, sinks=4) | learned_topk(block_size=16, top_k=2)"
    with pytest.raises(ValueError, match=r"at 128 tokens \(--seq-len\).*: it skips nothing"):
        run(base, tmp_path / "out", pattern=union, method=method)
    # A model swapped to it carries the pattern: refused the same, for its selector.
    swapped = tmp_path / "swapped"
    model = longswap.load(base / "base")
    longswap.swap_attention(model, union)
    longswap.save(model, swapped)
    with pytest.raises(ValueError, match=r"at 128 tokens.*selector would train on nothing"):
        run(base, tmp_path / "out", model=str(swapped), method=method)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("per_head", [False, True])
def test_warm_up_distils_dense_attention_into_the_selectors(per_head):
    model = make_model("llama")
    pattern = f"learned_topk(block_size=4, top_k=2, per_head={per_head})"
    longswap.swap_attention(model, pattern, backend="blocks")
    model.requires_grad_(False)
    ids = torch.randint(1, 97, (3, 48), generator=torch.Generator().manual_seed(0))
    sequences = PackedDataset(ids)
    student = SelectorStudent(model, sequences, sequences).requires_grad_(True)
    # The teacher reads the dense model (its logits are the unswapped model's), and its
    # targets are dense attention's block mass of that model's own q and k.
    seen = []
    with observe(model, seen.append, dense=True), torch.no_grad():
        logits = model(ids[1:2]).logits
    dense = copy.deepcopy(model)
    longswap.restore(dense)
    torch.testing.assert_close(logits, dense(ids[1:2]).logits)
    assert all(c.block_scores is None for c in seen)
    cached = student.teachers["train"](1)
    assert [t.layer for t in cached] == [c.layer for c in seen] == [0, 1]
    for t, call in zip(cached, seen, strict=True):
        # The own block's keys get no target; per head, each head has its own.
        expected = dense_block_mass(
            call.query, call.key, 4, call.scale, static=call.pattern, per_head=per_head
        )
        assert expected.shape[1] == call.query.shape[1] if per_head else call.key.shape[1]
        torch.testing.assert_close(t.target, expected)
    # Steps: sequence-major (each sequence read once), rows from the seed and step alone.
    steps = list(RowSamples(3, 48, rows=16, reuse=20, steps=60, seed=0))
    assert [int(s["sequence"]) for s in steps] == [0] * 20 + [1] * 20 + [2] * 20
    again = list(RowSamples(3, 48, rows=16, reuse=20, steps=60, seed=0))
    assert all(torch.equal(a["rows"], b["rows"]) for a, b in zip(steps, again, strict=True))
    assert not torch.equal(steps[0]["rows"], steps[1]["rows"])
    # The loss of a step: the mean over layers of the KL on the step's rows; it trains
    # every selector.
    rows = steps[25]["rows"]
    loss = student(torch.tensor([1]), rows[None])["loss"]
    expected = [
        selector_kl(gate(t.query[:, :, rows], t.key), t.target[:, :, rows], t.candidates[rows])
        for t, gate in zip(cached, student.selectors.values(), strict=True)
    ]
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    student(torch.tensor([2]), rows[None])
    assert list(student.teachers["train"].kept) == [1, 2]  # the last two sequences are kept


@pytest.mark.parametrize("rows", [6, 48])  # a sample of the rows; all of them
def test_joint_distillation_scores_the_selected_blocks_of_sampled_rows(rows):
    model = make_model("llama")
    pattern = sliding_window(window=6, sinks=1) | learned_topk(4, 2)
    longswap.swap_attention(model, pattern, backend="blocks")
    ids = torch.randint(1, 97, (2, 48), generator=torch.Generator().manual_seed(0))
    seen = []
    distill = SelectorDistillation(rows, step_generator(seed=3, step=7))
    with observe(model, lambda call: (seen.append(call), distill(call))):
        model(ids)
    candidates = pattern.candidates(48, 48)
    eligible = candidates.any(-1).nonzero().flatten()  # rows with a block to select
    assert 6 < len(eligible) < 48
    picked_by_layer = []
    sampler = step_generator(seed=3, step=7)  # the same draws, layer after layer
    expected = []
    for call in seen:
        picked = torch.arange(48)
        if rows < len(eligible):
            picked = eligible[torch.randperm(len(eligible), generator=sampler)[:rows]].sort()[0]
            assert candidates[picked].any(-1).all()
        picked_by_layer.append(picked)
        scores = call.block_scores[:, :, picked]
        target = dense_block_mass(call.query, call.key, 4, call.scale, static=pattern)
        selected = top_blocks(scores.detach(), candidates[picked], 2)
        expected.append(selector_kl(scores, target[:, :, picked], candidates[picked], selected))
    assert len(seen) == 2 and len(picked_by_layer[0]) == min(rows, 48)
    if rows < 48:  # each layer draws its own rows
        assert not torch.equal(picked_by_layer[0], picked_by_layer[1])
    loss = distill.loss()
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    loss.backward()
    gates = [p for n, p in model.named_parameters() if SELECTOR_ATTR in n]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates)


def test_distillation_finds_the_blocks_mean_pooling_misses():
    """Needle keys hidden in noisy blocks: dense attention finds them, MoBA's mean key (the
    gate's start) often does not; distilled, the gate keeps the oracle's share of the mass."""
    g = torch.Generator().manual_seed(0)
    length, dim, block = 256, 16, 16
    k = torch.randn(1, 1, length, dim, generator=g)
    for i, s in enumerate(torch.randperm(length // 2, generator=g)[:8]):
        k[0, 0, s] = 0.0
        k[0, 0, s, i] = 6.0  # needle i in direction i
    which = torch.randint(0, 8, (length,), generator=g)
    q = 4.0 * torch.nn.functional.one_hot(which, dim).float()[None, None]
    q = q + 0.1 * torch.randn(1, 1, length, dim, generator=g)
    pattern = learned_topk(block, 1)
    candidates = pattern.candidates(length, length)
    target = dense_block_mass(q, k, block)
    gate = BlockGate(dim, 1, block)

    def share(scores):
        return captured_mass(q, k, pattern, top_blocks(scores, candidates, 1), block)[0]

    oracle = share(target)
    with torch.no_grad():
        untrained = share(gate(q, k))
    optimizer = torch.optim.Adam(gate.parameters(), lr=3e-2)
    for _ in range(100):
        selector_kl(gate(q, k), target, candidates).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        trained = share(gate(q, k))
    assert untrained < oracle - 0.05  # mean pooling misses needles
    assert trained > oracle - 0.005  # the distilled gate keeps what dense attention keeps


def test_selector_method_trains_only_the_selectors_and_resumes(base, tmp_path):  # noqa: F811
    record = run(base, tmp_path / "warm", pattern=PATTERN, method="selector", steps=4)
    model = longswap.load(tmp_path / "warm")
    gates = sum(p.numel() for n, p in model.named_parameters() if SELECTOR_ATTR in n)
    assert record["trainable_parameters"] == gates > 0
    assert record["final_loss"] < record["first_loss"] or record["final_loss"] < 1.0
    with pytest.raises(ValueError, match="method 'selector' trains learned selectors"):
        run(base, tmp_path / "none", pattern="sliding_window(window=16)", method="selector")
    # The joint stage: LoRA+ on the warmed-up model, selectors saved with the adapter.
    joint = finetune(
        FinetuneConfig(
            model=str(tmp_path / "warm"),
            data=[str(base / "data")],
            seq_len=128,
            steps=3,
            batch_size=2,
            eval_steps=3,
            warmup_steps=1,
            learning_rate=1e-3,
            out=str(tmp_path / "joint"),
        )
    )
    assert joint["final_loss"] is not None
    reloaded = longswap.load(tmp_path / "joint").get_base_model()
    wrapper = reloaded.model.layers[0].self_attn.longswap_selector  # PEFT modules_to_save
    tuned = wrapper.modules_to_save["default"].query_map
    warmed = model.model.layers[0].self_attn.longswap_selector.query_map
    assert not torch.equal(tuned, warmed)  # trained on, by its KL on the selected blocks


def test_selector_warm_up_resumes_exactly(base, tmp_path):  # noqa: F811
    import shutil

    out = tmp_path / "warm"
    run(base, out, pattern=PATTERN, method="selector", steps=4, eval_steps=2)
    whole = {n: p for n, p in longswap.load(out).named_parameters() if SELECTOR_ATTR in n}
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")  # as if killed after step 2's save
    run(base, out, pattern=PATTERN, method="selector", steps=4, eval_steps=2, resume=True)
    resumed = dict(longswap.load(out).named_parameters())
    assert whole
    for name, p in whole.items():
        torch.testing.assert_close(resumed[name], p, atol=1e-6, rtol=1e-5, msg=name)


def test_joint_stage_resumes_exactly(base, tmp_path):  # noqa: F811
    """Model and selectors trained together, the selectors' targets on 16 sampled rows of
    128: a run killed after step 2's save and resumed ends where the whole run ends."""
    import shutil

    out = tmp_path / "joint"
    settings = dict(pattern=PATTERN, method="full", steps=4, eval_steps=2, selector_rows=16)
    run(base, out, **settings)
    whole = dict(longswap.load(out).named_parameters())
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    run(base, out, **settings, resume=True)
    resumed = dict(longswap.load(out).named_parameters())
    assert any(SELECTOR_ATTR in name for name in whole)
    for name, p in whole.items():
        torch.testing.assert_close(resumed[name], p, atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="started with selector_rows=16, not 24"):
        run(base, out, **(settings | {"selector_rows": 24}), resume=True)
    # Other rows train the selectors to other values: the sample is what the steps used.
    other = tmp_path / "other"
    run(base, other, **(settings | {"selector_rows": 24}))
    gates = dict(longswap.load(other).named_parameters())
    assert any(not torch.equal(gates[n], p) for n, p in whole.items() if SELECTOR_ATTR in n)


def test_resume_refuses_a_different_run(base, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    run(base, out, pattern=PATTERN, method="selector", steps=2, eval_steps=2)
    with pytest.raises(ValueError, match="started with pattern='learned_topk.*not 'sliding"):
        run(base, out, pattern="sliding_window(window=16)", method="selector", resume=True)


def test_resume_passes_over_a_damaged_last_checkpoint(base, tmp_path):  # noqa: F811
    out = tmp_path / "warm"
    run(base, out, pattern=PATTERN, method="selector", steps=4, eval_steps=2)
    (out / "checkpoints" / "checkpoint-4" / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.warns(UserWarning, match="checkpoint-4 is incomplete or damaged"):
        record = run(
            base, out, pattern=PATTERN, method="selector", steps=4, eval_steps=2, resume=True
        )
    assert record["final_loss"] is not None


@pytest.mark.parametrize("method", ["selector", "lora-plus"])
def test_training_signals_survive_activation_checkpointing(base, tmp_path, method):  # noqa: F811
    # Each layer's forward runs again in the backward pass, without the observer: the
    # observer must not add saved tensors inside the attention call (it once did).
    union = "sliding_window(window=16, sinks=2) | learned_topk(block_size=8, top_k=2)"
    record = run(
        base, tmp_path / method, pattern=union, method=method, steps=2, gradient_checkpointing=True
    )
    assert math.isfinite(record["final_loss"])


def test_each_accumulated_forward_draws_its_own_rows(tmp_path, monkeypatch):
    """With gradient accumulation, the forwards of one step draw different rows, from the
    seed, the step and the forward alone; forwards before training (the budget probe) do
    not shift them."""
    from longswap.train import runner

    drawn = []

    class Recording(runner.SelectorDistillation):
        def __init__(self, rows, generator):
            super().__init__(rows, generator)
            drawn.append(generator.initial_seed())

    monkeypatch.setattr(runner, "SelectorDistillation", Recording)
    model = make_model("llama")
    longswap.swap_attention(model, PATTERN, backend="blocks")
    ids = torch.randint(1, 97, (8, 32), generator=torch.Generator().manual_seed(0))
    sequences = PackedDataset(ids)
    config = FinetuneConfig(seq_len=32, steps=2, batch_size=1, eval_steps=2, warmup_steps=1, seed=5)
    runner.train(
        model,
        sequences,
        sequences,
        config,
        tmp_path,
        selectors=runner.Joint(8),
        gradient_accumulation_steps=2,
    )
    seeds = [step_generator(5, step, micro).initial_seed() for step in (0, 1) for micro in (0, 1)]
    assert drawn[-4:] == seeds and len(set(seeds)) == 4
    assert len(drawn) > 4  # the probe drew before training


def test_the_warm_up_reads_each_packed_document_alone():
    """With restarting positions, each document's dense targets are its own: one view per
    document, starting where it starts, keys only from it."""
    from longswap.train.teacher import Teacher

    model = make_model("llama", max_position_embeddings=256)
    longswap.swap_attention(model, learned_topk(block_size=8, top_k=2), backend="blocks")
    ids = torch.randint(1, 97, (2, 60), generator=torch.Generator().manual_seed(3))
    positions = torch.cat([torch.arange(25), torch.arange(35)]).expand(2, 60)
    views = Teacher(model, PackedDataset(ids, positions))(0)
    layers = model.config.num_hidden_layers
    assert [(v.start, v.key.shape[2]) for v in views] == [(0, 25), (25, 35)] * layers
    alone = Teacher(model, PackedDataset(ids[:, 25:]))(0)
    torch.testing.assert_close(views[1].target, alone[0].target)
    picked = torch.tensor([3, 24, 25, 59])
    assert views[0].rows(picked).tolist() == [3, 24] and views[1].rows(picked).tolist() == [0, 34]


def test_the_warm_up_trains_on_packed_documents(base, tmp_path):  # noqa: F811
    record = run(
        base,
        tmp_path / "warm",
        pattern=PATTERN,
        method="selector",
        steps=2,
        separate_documents=True,
    )
    assert math.isfinite(record["final_loss"])
