import pickle
from pathlib import Path

import msgpack
import numpy as np
import pytest
import safetensors.torch
import torch
from tensordict import TensorDict

from lumina import checkpoint, shards, tree
from lumina.checkpoint import CheckpointError, latest, load_checkpoint, save_checkpoint
from lumina.config import MoDConfig, ModelConfig, MoEConfig, RunConfig, TrainConfig, to_dict
from lumina.data.mix import DataMix, MixState
from lumina.data.text import PackedText
from lumina.optim import default_hp, lr_at
from lumina.step import init_train_state, train_step

PAD = 10_000


def setup():
    model = ModelConfig(
        vocab_size=61,
        d_model=16,
        n_layers=2,
        n_heads=2,
        ffn_multiple_of=16,
        max_seq_len=32,
        moe=MoEConfig(num_experts=3, top_k=2, d_expert=16, router_jitter=0.2, expert_dropout=0.3),
        mod=MoDConfig(enabled=True, capacity=0.5, every_n=2),
    )
    cfg = RunConfig(
        model=model,
        train=TrainConfig(
            steps=6, batch_size=4, micro_batch_size=2, seq_len=12, lr=1e-2, warmup_steps=2, compile=False
        ),
    )
    tokens = np.random.default_rng(0).integers(0, 61, 3000).astype(np.uint32)
    mix = DataMix("base_only", PackedText(tokens, seq_len=12, seed=1), None, batch_size=2, seed=1)
    return cfg, mix


def run(cfg, mix, state, data_state, steps):
    hp, metrics = default_hp(cfg.train), []
    for _ in range(steps):
        xs, ys = [], []
        for _ in range(cfg.train.grad_accum):
            x, y, _, data_state = mix.next_batch(data_state)
            xs.append(x)
            ys.append(y)
        hp["lr"] = torch.tensor(lr_at(int(state["step"]), cfg.train))
        state, m = train_step(
            state,
            TensorDict({"inputs": torch.cat(xs), "targets": torch.cat(ys)}, []),
            hp,
            cfg=cfg,
            pad_id=PAD,
        )
        metrics.append(m)
    return state, data_state, metrics


def test_exact_resume_is_bit_identical(tmp_path):
    cfg, mix = setup()
    straight, _, straight_metrics = run(cfg, mix, init_train_state(cfg), MixState(), 6)
    half, data_state, _ = run(cfg, mix, init_train_state(cfg), MixState(), 3)
    path = save_checkpoint(tmp_path, half, step=3, config=to_dict(cfg), data=data_state.to_dict())
    # A fresh process would rebuild everything from the checkpoint alone:
    state, meta = load_checkpoint(path)
    # every tensor in a fresh allocation, on the 64-byte boundary a running step's tensors start on:
    # some CPU kernels round by where their operands start (shards.owned), and safetensors' own
    # tensors point into the file wherever the format put them
    assert all(t.data_ptr() % 64 == 0 for t in tree.flatten(state).values() if t.numel())
    cfg2, mix2 = setup()
    resumed, _, resumed_metrics = run(cfg2, mix2, state, MixState.from_dict(meta["data"]), 3)
    assert meta["step"] == 3 and meta["config"] == to_dict(cfg)
    for key, value in tree.flatten(straight).items():
        assert torch.equal(tree.flatten(resumed)[key], value), key
    for a, b in zip(straight_metrics[3:], resumed_metrics, strict=True):
        fa, fb = tree.flatten(a), tree.flatten(b)
        assert fa.keys() == fb.keys()
        for key, value in fa.items():
            assert torch.equal(fb[key], value), (key, value, fb[key])


def test_atomic_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    cfg, _ = setup()
    state = init_train_state(cfg)
    monkeypatch.setattr(
        shards.safetensors.torch, "save_file", lambda *a: (_ for _ in ()).throw(OSError("disk full"))
    )
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, state, step=1, config={}, data={})
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_retention_and_latest(tmp_path):
    state = TensorDict({"w": torch.ones(2)}, [])
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        latest(tmp_path)
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, state, step=step, config={}, data={}, keep_last=2)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step_00000030", "step_00000040"]
    assert latest(tmp_path).name == "step_00000040"


class _Payload:
    marker = None

    def __reduce__(self):  # what an attacker's pickle would run on load
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("target", ["meta.msgpack", "shard_00000.safetensors"])
def test_pickle_payloads_are_refused_and_never_run(tmp_path, target):
    path = save_checkpoint(tmp_path, TensorDict({"w": torch.ones(2)}, []), step=1, config={}, data={})
    marker = tmp_path / "pwned"
    _Payload.marker = marker
    (path / target).write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(path / target) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_foreign_or_broken_checkpoints(tmp_path):
    path = save_checkpoint(tmp_path, TensorDict({"w": torch.ones(2)}, []), step=1, config={}, data={})
    (path / "meta.msgpack").write_bytes(msgpack.packb({"format": "someone-else/3"}))
    with pytest.raises(CheckpointError, match="format 'someone-else/3'"):
        load_checkpoint(path)
    path = save_checkpoint(tmp_path, TensorDict({"w": torch.ones(2)}, []), step=2, config={}, data={})
    (path / "shard_00000.safetensors").write_bytes((path / "shard_00000.safetensors").read_bytes()[:-5])
    with pytest.raises(CheckpointError, match="shard_00000.safetensors"):
        load_checkpoint(path)
    (path / "shard_00000.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard_00000.safetensors: missing"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "nope")


# ------------------------------------------------------------------ crash safety (issue 13, 1-2)


class _Crash(BaseException):
    """What a kill -9 looks like to the code that was running: nothing after it happens."""


def _crash_after_first_unlink(monkeypatch):
    """Make the next folder deletion stop after removing one file, as a kill -9 would."""
    real = checkpoint.shutil.rmtree

    def half_rmtree(path, *a, **kw):
        if not Path(path).exists():  # (a no-op clean-up of a temporary folder)
            return real(path, *a, **kw)
        files = sorted(p for p in Path(path).iterdir() if p.is_file())
        if files:
            files[0].unlink()
        monkeypatch.setattr(checkpoint.shutil, "rmtree", real)
        raise _Crash

    monkeypatch.setattr(checkpoint.shutil, "rmtree", half_rmtree)


def test_retention_interrupted_mid_delete_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    state = TensorDict({"w": torch.ones(2)}, [])
    for step in (10, 20):
        save_checkpoint(tmp_path, state, step=step, config={}, data={}, keep_last=2)
    _crash_after_first_unlink(monkeypatch)
    with pytest.raises(_Crash):  # retention deletes step 10 and "dies" half-way
        save_checkpoint(tmp_path, state, step=30, config={}, data={}, keep_last=2)
    step_dirs = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert step_dirs == ["step_00000020", "step_00000030"]  # step 10 is gone or hidden, never torn
    for p in checkpoint.checkpoints(tmp_path):
        load_checkpoint(p)
    assert checkpoint.clean(tmp_path) and not [
        p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")
    ]


def test_checkpoints_and_latest_ignore_incomplete_folders_and_order_by_step(tmp_path):
    """A torn folder (from a deletion interrupted by an older lumina, or by hand) is never picked,
    whatever its modification time."""
    state = TensorDict({"w": torch.ones(2)}, [])
    for step in (10, 20):
        save_checkpoint(tmp_path, state, step=step, config={}, data={}, keep_last=5)
    torn = tmp_path / "checkpoints" / "step_00000005"
    torn.mkdir()
    (torn / "meta.msgpack").write_bytes(b"")
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step_00000010", "step_00000020"]
    older = tmp_path / "checkpoints" / "step_00000010"
    (older / "shard_00000.safetensors").unlink()  # now torn, and the most recently touched folder
    assert latest(tmp_path).name == "step_00000020"
    assert sorted(checkpoint.clean(tmp_path)) == [
        "step_00000005 (an incomplete checkpoint)",
        "step_00000010 (an incomplete checkpoint)",
    ]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000020"]


def test_best_is_never_absent_while_it_is_replaced(tmp_path, monkeypatch):
    state = TensorDict({"w": torch.ones(2)}, [])
    save_checkpoint(tmp_path, state, step=10, config={}, data={}, name="best")
    best = tmp_path / "checkpoints" / "best"
    assert load_checkpoint(best)[1]["step"] == 10
    real_replace = checkpoint.os.replace
    seen = []

    def replace_and_check(src, dst):  # at every rename, a loadable best must exist
        seen.append(load_checkpoint(best)[1]["step"])
        real_replace(src, dst)
        seen.append(load_checkpoint(best)[1]["step"])

    monkeypatch.setattr(checkpoint.os, "replace", replace_and_check)
    save_checkpoint(tmp_path, TensorDict({"w": torch.zeros(2)}, []), step=20, config={}, data={}, name="best")
    assert seen and seen[-1] == 20 and set(seen) <= {10, 20}
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    # a crash while the new best is being written: the old one is still there and loads
    _crash_after_first_unlink(monkeypatch)
    with pytest.raises(_Crash):  # dies deleting the replaced best
        save_checkpoint(tmp_path, state, step=30, config={}, data={}, name="best")
    assert load_checkpoint(best)[1]["step"] == 30
    save_checkpoint(tmp_path, state, step=30, config={}, data={}, name="best")  # the same step again
    assert load_checkpoint(best)[1]["step"] == 30
    checkpoint.clean(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best", best.resolve().name]


def test_leftover_temporary_folders_are_cleaned(tmp_path):
    """A kill -9 between writing a checkpoint and renaming it leaves its temporary folder (33 MB
    for the debug preset); the next run's start removes it."""
    state = TensorDict({"w": torch.ones(2)}, [])
    save_checkpoint(tmp_path, state, step=10, config={}, data={})
    tmp = tmp_path / "checkpoints" / ".tmp-step_00000020-4242"
    tmp.mkdir()
    (tmp / "shard_00000.safetensors").write_bytes(b"partial")
    assert checkpoint.clean(tmp_path) == [".tmp-step_00000020-4242 (an interrupted save)"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000010"]


def test_format_2_checkpoints_still_load(tmp_path):
    """Checkpoints written before the sharded format: one state.safetensors, format /2."""
    path = tmp_path / "checkpoints" / "step_00000005"
    path.mkdir(parents=True)
    state = {"params.w": torch.arange(6.0).reshape(2, 3), "step": torch.tensor(5)}
    (path / "state.safetensors").write_bytes(safetensors.torch.save(state))
    meta = {"format": "lumina.checkpoint/2", "step": 5, "config": {}, "data": {}, "extra": {}}
    (path / "meta.msgpack").write_bytes(msgpack.packb(meta))
    assert checkpoint.latest(tmp_path) == path
    loaded, got = load_checkpoint(path)
    assert torch.equal(loaded["params", "w"], state["params.w"]) and int(loaded["step"]) == 5
    assert all(t.data_ptr() % 64 == 0 for t in tree.flatten(loaded).values())
    assert got["format"] == "lumina.checkpoint/2"


def test_chunks_that_do_not_tile_a_tensor_are_refused(tmp_path):
    path = save_checkpoint(tmp_path, TensorDict({"w": torch.ones(2, 3)}, []), step=1, config={}, data={})
    meta = msgpack.unpackb((path / "meta.msgpack").read_bytes())
    meta["tensors"]["w"]["shape"] = [3, 3]  # 9 elements indexed, 6 stored
    (path / "meta.msgpack").write_bytes(msgpack.packb(meta))
    with pytest.raises(CheckpointError, match="w: its chunks hold 6 elements"):
        load_checkpoint(path)
    meta["tensors"]["w"]["chunks"][0]["file"] = "../../elsewhere.safetensors"
    (path / "meta.msgpack").write_bytes(msgpack.packb(meta))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load_checkpoint(path)
