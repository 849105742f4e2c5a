import msgpack
import pytest
import torch

from lumina import tree
from lumina.model import init


def test_msgpack_round_trip_is_exact_for_every_dtype(tiny_cfg):
    params = init(tiny_cfg, seed=0)
    mixed = tree.unflatten(
        {
            **tree.flatten(params),
            "extra.bf16": torch.randn(3, 5).to(torch.bfloat16),
            "extra.step": torch.tensor(7, dtype=torch.int64),
            "extra.mask": torch.tensor([True, False]),
            "extra.empty": torch.empty(0, 4),
        }
    )
    back = tree.from_bytes(tree.to_bytes(mixed))
    assert set(tree.flatten(back)) == set(tree.flatten(mixed))
    for path, t in tree.flatten(mixed).items():
        assert back.get(tuple(path.split("."))).dtype == t.dtype
        assert torch.equal(tree.flatten(back)[path], t), path


def test_corrupt_or_foreign_bytes_are_rejected():
    with pytest.raises(tree.TreeFormatError):
        tree.from_bytes(b"\x93not msgpack at all")
    with pytest.raises(tree.TreeFormatError, match="unknown format"):
        tree.from_bytes(msgpack.packb({"format": "something-else"}))
    blob = msgpack.packb(
        {"format": "lumina.tree/1", "byteorder": "little", "leaves": {"a": ["float32", [4], b"\x00" * 3]}}
    )
    with pytest.raises(tree.TreeFormatError, match="leaf 'a' is malformed"):
        tree.from_bytes(blob)


def test_count_and_cast(tiny_cfg):
    p = init(tiny_cfg, seed=0)
    assert tree.count(p) == sum(t.numel() for t in p.values(True, True))
    half = tree.cast(p, torch.bfloat16)
    assert {t.dtype for t in half.values(True, True)} == {torch.bfloat16}
