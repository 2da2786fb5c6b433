"""Inference: prefill = the training forward, teacher-forced decoding = prefill (with the TTT step
every b tokens), baselines from the same code, generation, the decode state's bounded size."""

import numpy as np
import pytest
import torch

from ttte2e.model import TTTModel, preset
from ttte2e.model.decode import (
    decode_step,
    extend,
    generate,
    prefill,
    prefill_prompts,
    sample_next,
    stream_generate,
)

from conftest import DECODE_SMALL, case_params, decode_model, load_case, reference_cases

SMALL = DECODE_SMALL


@pytest.fixture(scope="module")
def model():
    return decode_model()


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(1)
    t = torch.randint(2, 512, (2, 129), generator=g)
    t[1, 40] = 1  # a BOS inside: masked target, as in training
    return t


def teacher_forced(model, tokens, prompt_len, mode="ttt"):
    state, nll = prefill(model, tokens[:, :prompt_len], mode)
    parts, logits = [nll], state.last_logits
    for t in range(prompt_len, tokens.shape[1]):
        parts.append(-torch.log_softmax(logits.float(), -1).gather(1, tokens[:, t : t + 1]))
        if t + 1 < tokens.shape[1]:
            logits = decode_step(model, state, tokens[:, t])
    return torch.cat(parts, 1), state


def test_prefill_nll_is_the_meta_loss_nll(model, tokens):
    with torch.no_grad():
        expected = model.meta_loss(tokens).token_nll
        plain = model.meta_loss(tokens, eta=0.0).token_nll
    state, nll = prefill(model, tokens)
    assert torch.equal(nll, expected)
    assert (expected - plain).abs().max() > 1e-2  # TTT matters in this model
    assert state.chunks_done.tolist() == [128 // 16] * 2 and state.pending_count.tolist() == [1, 1]


@pytest.mark.parametrize("prompt_len", [1, 17, 64])
def test_teacher_forced_decoding_equals_prefill(model, tokens, prompt_len):
    with torch.no_grad():
        expected = model.meta_loss(tokens).token_nll
    got, state = teacher_forced(model, tokens, prompt_len)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 1e-5
    assert state.chunks_done.tolist() == [7, 7]  # the last chunk waits for the token after it


@pytest.mark.parametrize("mode", ["ttt", "swa", "full"])
def test_extend_feeds_many_tokens_as_decode_steps_do(model, tokens, mode):
    """Runs inside a chunk, across chunk ends (TTT steps) and longer than the window (32)."""
    row = tokens[1:, :129]
    one_by_one, _ = prefill(model, row[:, :10], mode)
    for t in row[0, 10:]:
        decode_step(model, one_by_one, t[None])
    at_once, _ = prefill(model, row[:, :10], mode)
    for a, b in [(10, 13), (13, 16), (16, 60), (60, 61), (61, 129)]:
        logits = extend(model, at_once, row[:, a:b])
    assert (logits - one_by_one.last_logits).abs().max() < 1e-5
    for name in ("positions", "pending_count", "chunks_done"):
        assert torch.equal(getattr(at_once, name), getattr(one_by_one, name)), name
    after = [decode_step(model, s, torch.tensor([7])) for s in (at_once, one_by_one)]
    assert (after[0] - after[1]).abs().max() < 1e-5  # the states continue alike
    with pytest.raises(ValueError, match="one sequence"):
        extend(model, prefill(model, tokens[:, :5], mode)[0], tokens[:, 5:9])


def test_baselines_swa_and_full_attention(model, tokens):
    with torch.no_grad():
        swa = model.meta_loss(tokens, eta=0.0).token_nll
        full_model = TTTModel(model.config.replace(attention="full"))
        full_model.load_state_dict(model.state_dict())
        full = full_model.lm_loss(tokens).token_nll
    got, _ = teacher_forced(model, tokens, 9, mode="swa")
    assert (got - swa).abs().max() < 1e-5
    got, state = teacher_forced(model, tokens, 9, mode="full")
    assert (got - full).abs().max() < 1e-5
    assert state.kv[0].keys.shape[2] >= 128  # the full-attention buffer grows with the context
    assert int((state.kv[0].positions >= 0).sum()) == 2 * 128


def test_a_model_trained_with_full_attention_decodes_as_it_trained(model, tokens):
    """attention='full' runs TTT in meta_loss (keys of the whole training length): prefill and
    teacher-forced decoding give its training NLLs, not the no-TTT pass."""
    full_model = TTTModel(model.config.replace(attention="full"))
    full_model.load_state_dict(model.state_dict())
    full_model.eval()
    with torch.no_grad():
        expected = full_model.meta_loss(tokens).token_nll
        no_ttt = full_model.meta_loss(tokens, eta=0.0).token_nll
    assert (expected - no_ttt).abs().max() > 1e-2  # TTT matters in this model
    state, nll = prefill(full_model, tokens)
    assert torch.equal(nll, expected)
    got, state = teacher_forced(full_model, tokens, 17)
    assert (got - expected).abs().max() < 1e-5
    assert state.chunks_done.tolist() == [7, 7]


def test_decode_state_size_is_fixed_for_ttt_and_grows_for_full_attention(model):
    sizes, storages = {}, {}
    for mode in ("ttt", "full"):
        state, _ = prefill(model, torch.randint(2, 512, (1, 20)), mode)
        storages[mode] = [b.keys.data_ptr() for b in state.kv]
        seen = []
        for _ in range(120):
            decode_step(model, state, torch.randint(2, 512, (1,)))
            seen.append(state.nbytes())
        sizes[mode] = seen
        if mode == "ttt":  # the ring buffers are written in place, never reallocated
            assert [b.keys.data_ptr() for b in state.kv] == storages[mode]
    cfg = model.config
    assert min(sizes["ttt"]) == max(sizes["ttt"])  # preallocated: nothing grows with the context
    # full attention: every token's keys and values in every block, the buffer grown by doubling
    held = 140 * cfg.n_layers * 2 * cfg.d_model * 4
    assert held <= sizes["full"][-1] - sizes["full"][0] + 20 * cfg.n_layers * 2 * cfg.d_model * 4
    assert sizes["full"][-1] < sizes["ttt"][0] + 2 * held
    # with the decode budget reserved up front the full-attention buffer never grows either
    state, _ = prefill(model, torch.randint(2, 512, (1, 20)), "full", reserve=120)
    before = state.nbytes()
    for _ in range(120):
        decode_step(model, state, torch.randint(2, 512, (1,)))
    assert state.nbytes() == before


def test_each_key_is_rotated_once(model, monkeypatch):
    """A decode step rotates the new token's query and key in each block, not the cache."""
    import ttte2e.model.decode as decode

    state, _ = prefill(model, torch.randint(2, 512, (2, 70)))
    rotated = []
    real = decode.apply_rope
    monkeypatch.setattr(decode, "apply_rope", lambda x, r: rotated.append(x.numel()) or real(x, r))
    for _ in range(3):
        decode_step(model, state, torch.randint(2, 512, (2,)))
    assert sum(rotated) == 3 * model.config.n_layers * 2 * 2 * model.config.d_model


def test_the_ttt_step_records_a_graph_over_the_fast_weights_only(model, tokens, monkeypatch):
    """The inner gradient's graph holds no node for a slow weight (nothing is computed or saved
    for their gradients); the check itself finds them in an unfrozen chunk step."""
    import ttte2e.model.decode as decode
    import ttte2e.model.inner_loop as inner_loop

    params = {id(p) for p in model.parameters()}

    def slow_leaves(output):
        found, stack, seen = set(), [output.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            variable = getattr(node, "variable", None)
            if variable is not None and id(variable) in params:
                found.add(id(variable))
            stack += [n for n, _ in node.next_functions]
        return found

    leaves = []
    real_grad = torch.autograd.grad

    def grad(outputs, inputs, *args, **kwargs):
        leaves.append(slow_leaves(outputs))
        return real_grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(inner_loop.torch.autograd, "grad", grad)
    state, _ = prefill(model, tokens[:, :40])  # two chunks stepped in prefill
    for t in range(40, 60):  # one TTT step in decode (after token 48)
        decode_step(model, state, tokens[:, t])
    assert len(leaves) == 3 and all(not found for found in leaves)
    assert all(p.requires_grad for p in model.parameters())  # restored afterwards
    # the same chunk step without the freeze records the slow weights' nodes
    ctx = decode.ChunkContext.build(model, tokens[:, 1:17], 0.1, model.config.attn_window)
    carry = decode.Carry.initial(model, 2, state.pending_inputs, model.config.attn_window)
    with torch.enable_grad():
        decode.chunk_step(model, ctx, 0, carry, state.pending_inputs, False)
    assert len(leaves[-1]) > 10


def test_prompts_of_different_lengths_decode_together_as_one_by_one(model, tokens):
    """Rows at their own positions, pending chunks and TTT steps (at different times and chunk
    indices) give each row's one-by-one logits."""
    lengths = [5, 37, 16]  # chunk 16, window 32: first_valid differs, steps at different tokens
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    seqs = [tokens[i % 2, i : i + 80] for i in range(3)]
    state = prefill_prompts(model, [s[:n].tolist() for s, n in zip(seqs, lengths)])
    alone = [prefill(model, s[None, :n])[0] for s, n in zip(seqs, lengths)]
    assert state.positions.tolist() == lengths
    for step in range(40):
        together = decode_step(
            model, state, torch.stack([s[n + step] for s, n in zip(seqs, lengths)])
        )
        for i, (s, n) in enumerate(zip(seqs, lengths)):
            one = decode_step(model, alone[i], s[None, n + step])
            assert (together[i] - one[0]).abs().max() < 1e-5, (i, step)
    assert state.chunks_done.tolist() == [a.chunks_done.item() for a in alone] == [2, 4, 3]
    # the TTT steps updated the states' copies of theta, never the model's theta_0
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    # generation: one call with all prompts = one call per prompt (greedy and seeded sampling
    # draw per step for the whole batch, so only greedy is compared)
    prompts = [s[:n].tolist() for s, n in zip(seqs, lengths)]
    for mode in ("ttt", "swa", "full"):
        assert generate(model, prompts, 30, mode) == [
            generate(model, [p], 30, mode)[0] for p in prompts
        ]


@pytest.mark.parametrize(
    "case", case_params(reference_cases()), ids=lambda p: p.stem if p else "none"
)
def test_prefill_reproduces_the_official_nll(case):
    data, model = load_case(case)
    _, nll = prefill(model, torch.from_numpy(data["tokens"]).long())
    np.testing.assert_allclose(nll.numpy(), data["nll_ttt"], rtol=0, atol=1e-5)


def test_generate_greedy_sampling_stops_streaming_and_batches(model):
    prompt = torch.randint(2, 512, (2, 20), generator=torch.Generator().manual_seed(3))
    greedy = generate(model, prompt, max_new_tokens=12)
    assert [len(g) for g in greedy] == [12, 12]
    # greedy = argmax of the teacher-forced logits along its own output
    state, _ = prefill(model, prompt[:1])
    logits = state.last_logits
    for token in greedy[0]:
        assert int(logits.argmax()) == token
        logits = decode_step(model, state, torch.tensor([token]))
    # streaming yields the same tokens, one step at a time
    streamed = [t.tolist() for t in stream_generate(model, prompt, max_new_tokens=12)]
    assert [list(col) for col in zip(*streamed)] == greedy
    # a stop token ends a sequence (and is included)
    stop = greedy[0][3]
    stopped = generate(model, prompt[:1], max_new_tokens=12, stop_tokens=(stop,))
    assert stopped[0][-1] == stop and len(stopped[0]) == greedy[0].index(stop) + 1
    # sampling: seeded = reproducible; prompts of different lengths in one call
    a = generate(
        model, [[5, 6, 7], [8, 9, 10, 11, 12]], max_new_tokens=6, temperature=0.8, top_p=0.9, seed=0
    )
    b = generate(
        model, [[5, 6, 7], [8, 9, 10, 11, 12]], max_new_tokens=6, temperature=0.8, top_p=0.9, seed=0
    )
    assert a == b and [len(x) for x in a] == [6, 6]
    seen = []
    generate(model, [[5, 6, 7]], max_new_tokens=4, on_token=lambda t: seen.append(t.tolist()))
    assert len(seen) == 4


def test_sampling_rules():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    assert sample_next(logits, None).item() == 0
    # repetition penalty: a seen positive logit is divided, a seen negative one multiplied
    assert sample_next(logits, torch.tensor([[0]]), repetition_penalty=4.0).item() == 1
    # top_p keeps the smallest set reaching p: here only the top token
    g = torch.Generator().manual_seed(0)
    picks = {
        sample_next(
            torch.tensor([[10.0, 0.0, 0.0, 0.0]]), None, temperature=1.0, top_p=0.5, generator=g
        ).item()
        for _ in range(50)
    }
    assert picks == {0}


def test_bad_input_is_refused(model):
    with pytest.raises(ValueError, match="empty"):
        prefill(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        prefill(model, torch.tensor([[3, 600]]))
    with pytest.raises(ValueError, match="unknown decode mode"):
        prefill(model, torch.tensor([[3, 4]]), mode="beam")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[3], []])
    with pytest.raises(ValueError, match="exceeds max_context"):
        list(stream_generate(model, torch.tensor([[3, 4]]), max_new_tokens=10, max_context=8))
    state, _ = prefill(model, torch.tensor([[3, 4]]))
    with pytest.raises(ValueError, match="one token per sequence"):
        decode_step(model, state, torch.tensor([3, 4]))


@pytest.mark.parametrize("mode", ["ttt", "full"])
def test_a_restored_snapshot_continues_exactly_and_ttt_snapshots_do_not_grow(model, mode):
    """snapshot -> bytes -> restore in the middle of a conversation (a pending chunk half full,
    TTT steps behind it): the next tokens' logits equal those of the state never snapshotted,
    through further TTT steps; a 'ttt' snapshot has the same size after any number of tokens."""
    from ttte2e.model.decode_snapshot import restore, snapshot

    g = torch.Generator().manual_seed(5)
    prompt, more = (
        torch.randint(2, 512, (1, 37), generator=g),
        torch.randint(2, 512, (60,), generator=g),
    )
    state, _ = prefill(model, prompt, mode)
    for t in more[:10]:
        decode_step(model, state, t[None])
    blob = snapshot(model, state)
    restored = restore(model, blob)
    assert int(restored.chunks_done) == int(state.chunks_done) == (2 if mode == "ttt" else 0)
    torch.testing.assert_close(restored.last_logits, state.last_logits, rtol=0, atol=0)
    sizes = [len(blob)]
    for t in more[10:]:  # 50 more tokens: three more TTT steps in 'ttt'
        a, b = decode_step(model, state, t[None]), decode_step(model, restored, t[None])
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        sizes.append(len(snapshot(model, restored)) if len(sizes) < 3 else sizes[-1])
    sizes.append(len(snapshot(model, restored)))
    if mode == "ttt":
        assert len(set(sizes)) == 1, sizes
    else:
        assert sizes[-1] > sizes[0]  # the baseline's keys grow with the conversation


def test_a_snapshot_of_another_model_or_version_is_refused(model):
    from ttte2e.model.decode_snapshot import restore, snapshot

    state, _ = prefill(model, torch.randint(2, 512, (1, 20)))
    blob = snapshot(model, state)
    other = TTTModel(preset("tiny", **dict(SMALL, chunk_size=8)))
    with pytest.raises(ValueError, match="another model"):
        restore(other, blob)
    with pytest.raises(ValueError, match="version '1'.*reads version 2"):
        import ttte2e.model.decode_snapshot as snap

        previous, snap.SNAPSHOT_VERSION = snap.SNAPSHOT_VERSION, 2
        try:
            restore(model, blob)
        finally:
            snap.SNAPSHOT_VERSION = previous
    with pytest.raises(ValueError, match="not a decode snapshot"):
        restore(model, b"\x05\x00")
