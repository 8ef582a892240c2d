"""data.batches: training iterators and evaluation passes, checked against direct slicing."""
import numpy as np
import pytest
import torch

from data.batches import (StreamBatches, WindowBatches, count_scored, stream_eval_batches,
                          window_eval_batches)
from data.prepare import DataError


@pytest.fixture
def rng():
    return np.random.default_rng()


def _tokens(rng, n):
    return rng.integers(0, 256, n).astype(np.uint8)


def _memmap(tmp_path, array):
    path = tmp_path / "split.bin"
    array.tofile(path)
    return np.memmap(path, dtype=array.dtype, mode="r")


def test_stream_batches_cover_the_split_in_order_and_wrap(rng, tmp_path):
    batch_size, seq_len = 4, int(rng.integers(3, 9))
    data = _memmap(tmp_path, _tokens(rng, int(rng.integers(200, 400))))
    it = StreamBatches(data, batch_size, seq_len)
    stream_len = len(data) // batch_size
    windows = (stream_len - 1) // seq_len
    seen_inputs = [[] for _ in range(batch_size)]
    for w in range(windows):
        batch = next(it)
        assert batch.inputs.dtype == torch.int64 and batch.inputs.shape == (batch_size, seq_len)
        assert batch.reset == (w == 0)
        assert torch.equal(batch.targets[:, :-1], batch.inputs[:, 1:])
        for s in range(batch_size):
            seen_inputs[s].append(batch.inputs[s].numpy())
            # the target after each window's last input is the next window's first input
            assert batch.targets[s, -1] == data[s * stream_len + (w + 1) * seq_len]
    for s in range(batch_size):
        expected = data[s * stream_len: s * stream_len + windows * seq_len]
        np.testing.assert_array_equal(np.concatenate(seen_inputs[s]), expected)
    wrapped = next(it)
    assert wrapped.reset and it.epoch == 1
    np.testing.assert_array_equal(wrapped.inputs[:, 0].numpy(), data[np.arange(batch_size) * stream_len])


@pytest.mark.parametrize("world_size", [2, 3])
def test_stream_ranks_partition_the_global_batch(rng, world_size):
    data = _tokens(rng, int(rng.integers(500, 900)))
    batch_size = 2 * world_size
    whole = StreamBatches(data, batch_size, 5)
    ranks = [StreamBatches(data, batch_size, 5, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(7):
        reference = next(whole)
        shares = [next(r) for r in ranks]
        assert torch.equal(torch.cat([s.inputs for s in shares]), reference.inputs)
        assert torch.equal(torch.cat([s.targets for s in shares]), reference.targets)
    with pytest.raises(DataError, match="multiple"):
        StreamBatches(data, batch_size + 1, 5, rank=0, world_size=world_size)


def test_window_batches_reproducible_from_seed_and_step(rng):
    data = _tokens(rng, 3000)
    seed = int(rng.integers(1 << 30))
    it = WindowBatches(data, 6, 10, seed)
    sequential = [next(it) for _ in range(5)]
    fresh = WindowBatches(data, 6, 10, seed)
    for step in (3, 0, 4):  # any order, no replay
        assert torch.equal(fresh.batch(step).inputs, sequential[step].inputs)
    assert not torch.equal(sequential[0].inputs, sequential[1].inputs)
    assert not torch.equal(WindowBatches(data, 6, 10, seed + 1).batch(0).inputs, sequential[0].inputs)
    for batch, starts in ((sequential[2], fresh.starts(2)),):
        for row, start in enumerate(starts):
            np.testing.assert_array_equal(batch.inputs[row].numpy(), data[start:start + 10])
            np.testing.assert_array_equal(batch.targets[row].numpy(), data[start + 1:start + 11])


@pytest.mark.parametrize("world_size", [2, 3])
def test_window_ranks_partition_the_global_batch(rng, world_size):
    data = _tokens(rng, 2000)
    batch_size, seed = 4 * world_size, int(rng.integers(1 << 30))
    whole = WindowBatches(data, batch_size, 12, seed)
    for step in rng.integers(0, 10**6, 3).tolist():
        shares = [WindowBatches(data, batch_size, 12, seed, r, world_size).batch(step) for r in range(world_size)]
        assert torch.equal(torch.cat([s.inputs for s in shares]), whole.batch(step).inputs)


@pytest.mark.parametrize("make", [lambda d: StreamBatches(d, 3, 7), lambda d: WindowBatches(d, 3, 7, seed=5)])
def test_iterator_state_round_trips_to_the_exact_next_batch(rng, make):
    data = _tokens(rng, 400)
    original = make(data)
    for _ in range(int(rng.integers(5, 40))):  # crosses StreamBatches' epoch end (18 windows)
        next(original)
    state = original.state_dict()
    resumed = make(data)
    resumed.load_state_dict(state)
    for _ in range(25):
        a, b = next(original), next(resumed)
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets) and a.reset == b.reset
    with pytest.raises(DataError, match="cannot resume"):
        make(_tokens(rng, 401)).load_state_dict(state)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("family", ["stream", "window"])
def test_eval_scores_every_position_after_the_first_exactly_once(rng, world_size, family):
    for _ in range(3):
        n = int(rng.integers(2, 700))
        # Distinct random values, so each scored target tells which position it is.
        data = rng.permutation(n).astype(np.uint16)
        position_of = np.argsort(data)
        batch_size = int(rng.integers(1, 9))
        if family == "stream":
            seq_len = int(rng.integers(1, 40))
            passes = [list(stream_eval_batches(data, batch_size, seq_len, r, world_size)) for r in range(world_size)]
        else:
            context = int(rng.integers(1, 40))
            stride = int(rng.integers(1, context + 1))
            passes = [list(window_eval_batches(data, batch_size, context, stride, r, world_size))
                      for r in range(world_size)]
        # every rank runs the same number of batches of the same shapes
        assert len({tuple(tuple(b.inputs.shape) for b in p) for p in passes}) == 1
        scored = []
        for batch in (b for p in passes for b in p):
            assert batch.mask.shape == batch.inputs.shape == batch.targets.shape
            positions = position_of[batch.targets[batch.mask].numpy()]
            # each scored target is predicted from the token right before it
            np.testing.assert_array_equal(batch.inputs[batch.mask].numpy(), data[positions - 1])
            scored.append(positions)
        scored = np.concatenate(scored)
        assert len(scored) == count_scored(n) == n - 1
        np.testing.assert_array_equal(np.sort(scored), np.arange(1, n))


def test_stream_eval_contexts_are_contiguous_and_reset_once(rng):
    data = np.arange(1000, dtype=np.uint16)
    batches = list(stream_eval_batches(data, 4, 30))
    assert [b.reset for b in batches] == [True] + [False] * (len(batches) - 1)
    rows = torch.cat([b.targets for b in batches], dim=1)
    masks = torch.cat([b.mask for b in batches], dim=1)
    for row, mask in zip(rows, masks):
        scored = row[mask]
        assert torch.equal(scored, torch.arange(int(scored[0]), int(scored[0]) + len(scored)))


def test_window_eval_gives_each_later_target_context_minus_stride_of_context(rng):
    context, stride = 16, 5
    data = np.arange(300, dtype=np.uint16)
    for batch in window_eval_batches(data, 3, context, stride):
        for inputs, mask in zip(batch.inputs, batch.mask):
            first_scored = int(mask.nonzero()[0]) if mask.any() else None
            if first_scored is not None and int(inputs[0]) > 0:
                assert first_scored == context - stride
            elif first_scored is not None:
                assert first_scored == 0


def test_max_tokens_truncates_and_random_content_is_passed_through(rng):
    data = _tokens(rng, 5000)
    limit = int(rng.integers(10, 4000))
    batches = list(stream_eval_batches(data, 3, 17, max_tokens=limit))
    assert sum(int(b.mask.sum()) for b in batches) == limit - 1
    stream = torch.cat([b.targets for b in batches], dim=1)[0]
    mask = torch.cat([b.mask for b in batches], dim=1)[0]
    np.testing.assert_array_equal(stream[mask].numpy(), data[1:1 + int(mask.sum())])
    windows = list(window_eval_batches(data, 2, 64, 32, max_tokens=limit))
    assert sum(int(b.mask.sum()) for b in windows) == limit - 1
    with pytest.raises(DataError, match="stride"):
        window_eval_batches(data, 2, 16, 17)  # at the call, not at the first batch
