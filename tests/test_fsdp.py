"""FSDP2 (``train.parallel: fsdp``) on the CPU: 2 gloo processes under torchrun against one process
with a plain model (the oracle, computed here, sharing nothing with the workers), sharded
checkpoints (atomic, resumable at another number of ranks, pickle-free), a NaN on one rank.

The bound: FSDP reduce-scatters the two ranks' gradients, a float32 sum in another order than one
process's backward over the whole batch; after two AdamW steps (whose m / sqrt(v) turns a relative
gradient error into a weight error of the same order where gradients are small) every weight is
within 2e-5 of the largest weight's magnitude (measured: 6e-6 per tensor, 1e-9 for the EMA export).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fsdp_worker
from ca2vdm.checkpoint import load_checkpoint
from ca2vdm.training import parallel

pytestmark = pytest.mark.usefixtures("one_thread")
WORKER = Path(fsdp_worker.__file__)
BOUND = 2e-5


def torchrun(mode, out, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(WORKER.parent.parent))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), mode, str(out)], capture_output=True, text=True, timeout=timeout, env=env)


def close(a: dict, b: dict, keys=None):
    keys = keys or list(a)
    wa = torch.cat([a[k].double().flatten() for k in keys])
    wb = torch.cat([b[k].double().flatten() for k in keys])
    return (wa - wb).abs().max().item() <= BOUND * wa.abs().max().item()


def whole(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Two FSDP training steps at 2 ranks, saved (sharded) to ``ckpt``."""
    out = tmp_path_factory.mktemp("fsdp")
    done = torchrun("train", out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "checkpoint"


@pytest.fixture(scope="module")
def oracle():
    """One process, a plain model: 2 steps, then 2 more (the trainer object is kept at step 2)."""
    tr = fsdp_worker.trainer(parallel_mode="ddp", steps=2 * fsdp_worker.STEPS)
    for _ in range(fsdp_worker.STEPS):
        tr.train_step()
    at2 = (whole(tr), {k: v.clone() for k, v in tr.ema.shadow.items()})
    for _ in range(fsdp_worker.STEPS):
        tr.train_step()
    return at2, (whole(tr), tr.ema.shadow)


def test_fsdp_training_steps_equal_one_process(two_ranks, oracle):
    """Two FSDP steps (micro-batches accumulated, gradients clipped over the sharded norm) give one
    process's weights, EMA and exported model to ``BOUND``. The shards are pickle-free safetensors,
    one per rank, and the export is the EMA that ``generate`` loads.
    Breakage tried: every micro-batch without gradient sync (``grad_sync`` always off) fails here."""
    (weights, ema), _ = oracle
    assert sorted(p.name for p in (two_ranks / "sharded").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    assert not list(two_ranks.rglob("*.metadata")) and not list(two_ranks.rglob("*.pt"))
    resumed = fsdp_worker.trainer(steps=2 * fsdp_worker.STEPS)  # one process reads both ranks' shards
    resumed.resume(two_ranks)
    assert resumed.step == fsdp_worker.STEPS
    assert close(weights, whole(resumed)) and not close(weights, whole(fsdp_worker.trainer()))
    assert close(ema, resumed.ema.shadow)
    exported = load_checkpoint(two_ranks).state_dict()
    assert close(ema, exported, [k for k in exported if k in ema])


def test_saved_at_two_ranks_resumes_at_one_rank(two_ranks, oracle):
    """The 2-rank checkpoint, resumed by one process (weights, EMA, AdamW moments and step counters
    from the shards), trains on to the weights of a run that never stopped.
    Breakage tried: resuming without the optimizer state (``opt.*`` left out of ``state_tensors``)
    fails here."""
    _, (weights, ema) = oracle
    tr = fsdp_worker.trainer(steps=2 * fsdp_worker.STEPS)
    tr.resume(two_ranks)
    while tr.step < tr.tc.steps:
        tr.train_step()
    assert close(weights, whole(tr)) and close(ema, tr.ema.shadow)


def test_an_interrupted_sharded_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """An exception after the shards, the export and config.json are written but before the marker
    and the rename: the previous checkpoint loads, at its step, with its weights.
    Breakage tried: writing into the checkpoint itself (no temporary directory, no rename) fails here."""
    tr = fsdp_worker.trainer(steps=4)
    tr.train_step()
    tr.save(tmp_path / "ckpt")
    at1 = whole(tr)
    tr.train_step()

    def crash():
        raise KeyboardInterrupt("killed mid-save")

    real = parallel.save_sharded
    monkeypatch.setattr(parallel, "save_sharded", lambda *a, **k: real(*a, **k, fail_after_write=crash))
    with pytest.raises(KeyboardInterrupt):
        tr.save(tmp_path / "ckpt")
    back = fsdp_worker.trainer(steps=4)
    back.resume(tmp_path / "ckpt")
    assert back.step == 1 and all(torch.equal(at1[k], v) for k, v in whole(back).items())
    assert not torch.equal(load_checkpoint(tmp_path / "ckpt").final_proj.weight, tr.ema_model().final_proj.weight)


def test_a_truncated_shard_is_a_checkpoint_error(two_ranks, tmp_path):
    import shutil

    from ca2vdm.checkpoint import CheckpointError

    ckpt = tmp_path / "ckpt"
    shutil.copytree(two_ranks, ckpt)
    shard = next((ckpt / "sharded").iterdir())
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read the sharded checkpoint"):
        fsdp_worker.trainer().resume(ckpt)
    (ckpt / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="save did not finish"):
        fsdp_worker.trainer().resume(ckpt)


def test_a_nan_on_one_rank_stops_every_rank(tmp_path):
    """Rank 1's loss is NaN at step 2: both ranks raise the NaN error (the loss is all-reduced
    before the check), none waits in a collective (the run ends well within the timeout).
    Breakage tried: checking each rank's own loss before the all-reduce fails here (rank 0 goes on
    and dies of the lost peer instead)."""
    done = torchrun("nan", tmp_path, timeout=90)
    assert done.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank} stopped: FloatingPointError: loss is nan at step 2" in done.stdout, done.stdout[-2000:]
    assert not (tmp_path / "checkpoint").exists()


def test_a_dmd_iteration_under_fsdp_equals_one_process(tmp_path):
    """Two DMD iterations (generator and critic updates, the teacher's guided score, the EMA) with
    generator, critic and frozen teacher sharded at 2 ranks equal one process's with plain models.
    Every rank runs the whole batch (FSDP shards memory here; DMD's batch is not split).
    Breakage tried: clipping each rank's shard by its own norm (``to_local`` gradients) fails here
    (at the critic's weights)."""
    done = torchrun("dmd", tmp_path / "dmd")
    assert done.returncode == 0, done.stderr[-3000:]
    got = load_file(str(tmp_path / "dmd.safetensors"))
    rows, want = fsdp_worker.dmd_run()
    assert all("generator_loss" in r for r in rows) and set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want if k.startswith("teacher."))
    for part in ("generator.", "critic.", "ema."):
        keys = [k for k in want if k.startswith(part)]
        assert close(want, got, keys), part
    moved = [k for k in want if k.startswith("generator.")]
    assert not close(want, {k: fsdp_worker.dmd_run(0)[1][k] for k in moved}, moved)
