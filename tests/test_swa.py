"""WeightAverage: the running mean equals the mean of the snapshots; state round-trips."""
import copy

import pytest
import torch

from lm.swa import WeightAverage


def snapshots(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g).half(),
             "steps": torch.tensor([i])} for i in range(n)]


def test_average_equals_hand_computed_mean():
    snaps = snapshots(5)
    avg = WeightAverage()
    for s in snaps:
        avg.update(s)
    out = avg.average()
    assert avg.count == 5
    w = sum(s["w"].double() for s in snaps) / 5
    torch.testing.assert_close(out["w"], w.float(), rtol=0, atol=0)
    assert out["b"].dtype == torch.float16
    torch.testing.assert_close(out["b"], (sum(s["b"].double() for s in snaps) / 5).half(), rtol=0, atol=0)
    assert out["steps"].item() == 4  # non-float tensors: the latest value


def test_snapshots_are_copied_not_aliased():
    s = snapshots(1)[0]
    avg = WeightAverage()
    avg.update(s)
    expected = s["w"].clone()
    s["w"].add_(1.0)
    torch.testing.assert_close(avg.average()["w"], expected)


def test_state_dict_round_trip_continues_identically():
    snaps = snapshots(4, seed=1)
    straight, first = WeightAverage(), WeightAverage()
    for s in snaps:
        straight.update(s)
    for s in snaps[:2]:
        first.update(s)
    resumed = WeightAverage()
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    for s in snaps[2:]:
        resumed.update(s)
    assert resumed.count == 4
    for k, v in straight.average().items():
        assert torch.equal(v, resumed.average()[k])


def test_errors():
    with pytest.raises(ValueError, match="no snapshots"):
        WeightAverage().average()
    avg = WeightAverage()
    avg.update({"w": torch.randn(2)})
    with pytest.raises(ValueError, match="keys differ"):
        avg.update({"v": torch.randn(2)})
