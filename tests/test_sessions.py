"""Sessions that keep their decode state between requests (platform/serve/sessions.py): a turn
that extends the conversation reads only its new tokens, from the device, host memory or storage
(also after the replica that held it is gone), with the logits of a conversation never moved."""

import pytest
import torch

from ttte2e.model.decode import decode_step, prefill
from ttte2e.platform.serve.sessions import (
    SessionBusy,
    SessionConflict,
    SessionNotFound,
    SessionStore,
)

from conftest import decode_model


@pytest.fixture(scope="module")
def model():
    return decode_model()


def _turn(model, store, session, prompt, strict=False):
    """One request: resume, read the new tokens, save; the logits after the prompt."""
    got = store.resume(session, prompt, strict=strict)
    if got.state is None:
        state, _ = prefill(model, torch.tensor([prompt]))
    else:
        state = got.state
        for t in got.unread:
            decode_step(model, state, torch.tensor([t]))
    written = store.save(session, state, prompt)
    if written is not None:
        written.result()  # acknowledged once durable, as the server does
    return got, state.last_logits.clone()


def _never_moved(model, prompt):
    state, _ = prefill(model, torch.tensor([prompt[:21]]))
    for t in prompt[21:]:
        decode_step(model, state, torch.tensor([t]))
    return state.last_logits


def test_turns_continue_exactly_from_the_device_host_and_storage(model, tmp_path):
    g = torch.Generator().manual_seed(3)
    conversation = torch.randint(2, 512, (90,), generator=g).tolist()
    a, b, c, d = conversation[:21], conversation[:40], conversation[:61], conversation[:90]
    store = SessionStore(model, max_on_device=1, max_host_bytes=1 << 30, storage=str(tmp_path))
    first, _ = _turn(model, store, "s1", a)
    assert (first.source, first.cached, first.restarted) == ("none", 0, False)
    _turn(model, store, "other", conversation[5:30])  # s1 leaves the device for host memory
    assert store.stats()["in_host"] == 1
    got, logits = _turn(model, store, "s1", b)
    assert (got.source, got.cached, len(got.unread)) == ("host", 21, 19)
    torch.testing.assert_close(logits, _never_moved(model, b), rtol=0, atol=0)

    store.max_host_bytes = 0  # host memory full: s1 lives only in storage
    _turn(model, store, "other", conversation[5:31])
    assert store.stats()["in_host"] == 0
    got, logits = _turn(model, store, "s1", c)
    assert (got.source, got.cached) == ("storage", 40)
    torch.testing.assert_close(logits, _never_moved(model, c), rtol=0, atol=0)

    # the replica is gone: a new one (nothing in memory) resumes from the last completed turn
    successor = SessionStore(model, storage=str(tmp_path))
    got, logits = _turn(model, successor, "s1", d)
    assert (got.source, got.cached) == ("storage", 61)
    torch.testing.assert_close(logits, _never_moved(model, d), rtol=0, atol=0)
    # the first store still holds turn 3 in memory; storage's turn 4 is newer and wins
    got = store.resume("s1", conversation)
    assert (got.source, got.cached) == ("storage", 90)


def test_a_prompt_that_does_not_extend_the_history_is_never_mixed_in(model):
    store = SessionStore(model)
    prompt = list(range(2, 30))
    _turn(model, store, "s", prompt)
    edited = prompt[:10] + [7] + prompt[11:] + [5, 6]
    with pytest.raises(SessionConflict, match="does not extend"):
        store.resume("s", edited, strict=True)
    with pytest.raises(SessionNotFound, match="no state here"):
        store.resume("never-created", prompt, strict=True)
    with pytest.raises(SessionConflict):  # a text prompt never extends a token history
        store.resume("s", "some text", strict=True)
    got, logits = _turn(model, store, "s", edited)  # not strict: started over, said so
    assert got.restarted and got.cached == 0 and got.state is None
    state, _ = prefill(model, torch.tensor([edited]))
    torch.testing.assert_close(logits, state.last_logits, rtol=0, atol=0)


def test_busy_sessions_bad_ids_and_a_failed_request(model, tmp_path):
    store = SessionStore(model, storage=str(tmp_path))
    _turn(model, store, "s", list(range(2, 20)))
    store.resume("s", list(range(2, 25)))
    with pytest.raises(SessionBusy, match="busy"):
        store.resume("s", list(range(2, 26)))
    store.release("s")  # the request failed: the last completed turn (in storage) stays
    got = store.resume("s", list(range(2, 26)))
    assert (got.source, got.cached) == ("storage", 18)
    for bad in ("", "../x", "a b", "x" * 129):
        with pytest.raises(ValueError, match="session id"):
            store.resume(bad, [2, 3])


def test_a_sessions_state_does_not_grow_with_the_conversation(model):
    from ttte2e.model.decode_snapshot import snapshot

    store = SessionStore(model, max_on_device=1, max_host_bytes=1 << 30)
    conversation, sizes = list(range(2, 12)), []
    for turn in range(1, 51):  # 50 turns of 3 tokens: 12 TTT steps
        conversation += [(7 * turn + k) % 500 + 2 for k in range(3)]
        _turn(model, store, "s", conversation)
        if turn in (1, 10, 50):
            state = store._records["s"].state
            sizes.append((state.nbytes(), len(snapshot(model, state))))
    assert len(set(sizes)) == 1, sizes
