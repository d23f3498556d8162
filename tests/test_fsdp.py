"""FSDP2 (``train.parallel: fsdp``) on the CPU: 2 gloo processes against one process with a plain
model (the oracle, computed here, sharing nothing with the ranks), sharded checkpoints (atomic,
resumable at another number of ranks, pickle-free), a NaN on one rank.

The 2 ranks are forked once from this process (``fsdp_worker.start``) and run, in one gloo process
group, the training steps and their save, the DMD iterations, ``ca2vdm distill``'s three stages
(``parallel: fsdp``), then the NaN run, which ends them;
each rank logs to its own file and the tests read the logs, the checkpoint and the DMD tensors.
Forking starts no interpreter and imports nothing (the modules are imported here first): a bare
2-rank init + barrier took 0.25 s forked against 16-21 s for torchrun, two subprocesses or
``torch.multiprocessing`` spawn (2 cores at load 5-7), where the imports were most of the time.
The oracle is computed here after the fork, while the ranks run. Resuming at 1 rank and the
interrupted save run here, in one process.

The bound: FSDP reduce-scatters the two ranks' gradients, a float32 sum in another order than one
process's backward over the whole batch; after two AdamW steps (whose m / sqrt(v) turns a relative
gradient error into a weight error of the same order where gradients are small) every weight is
within 2e-5 of the largest weight's magnitude (measured: 8e-8 of it for weights and EMA export,
4.6e-6 of its own tensor's largest for the worst tensor; DMD 2.6e-7).
"""

import csv

import pytest
import torch
from safetensors.torch import load_file

import fsdp_worker
from ca2vdm.checkpoint import load_checkpoint
from ca2vdm.training import parallel

pytestmark = pytest.mark.usefixtures("one_thread")
BOUND = 2e-5
NAN = "FloatingPointError: loss is nan at step 2"


def close(a: dict, b: dict, keys=None):
    keys = keys or list(a)
    wa = torch.cat([a[k].double().flatten() for k in keys])
    wb = torch.cat([b[k].double().flatten() for k in keys])
    return (wa - wb).abs().max().item() <= BOUND * wa.abs().max().item()


def whole(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """The 2 ranks, forked before any oracle is computed (the modules they use imported first:
    torch._dynamo is what an optimizer's first step imports)."""
    import torch._dynamo  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.tensor  # noqa: F401

    import ca2vdm.distill  # noqa: F401
    import test_train  # noqa: F401

    out = tmp_path_factory.mktemp("fsdp")
    fsdp_worker.distill_setup(out)
    procs = fsdp_worker.start(out)
    yield procs, out
    for p in procs:  # a test that failed before joining them
        if p.is_alive():
            p.kill()


@pytest.fixture(scope="module")
def oracle(started):
    """One process, plain models, while the ranks run: 2 training steps, then 2 more (the trainer
    object is kept at step 2); 2 DMD iterations, and none. One thread, like the ranks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tr = fsdp_worker.trainer(parallel_mode="ddp", steps=2 * fsdp_worker.STEPS)
    for _ in range(fsdp_worker.STEPS):
        tr.train_step()
    at2 = (whole(tr), {k: v.clone() for k, v in tr.ema.shadow.items()})
    for _ in range(fsdp_worker.STEPS):
        tr.train_step()
    got = dict(at2=at2, at4=(whole(tr), tr.ema.shadow), dmd=fsdp_worker.dmd_run(), dmd0=fsdp_worker.dmd_run(0)[1],
               untrained=whole(fsdp_worker.trainer()))
    out = started[1]  # ca2vdm distill in one process (parallel: ddp, plain models), 2 DMD iterations, then 3
    got["distill"] = fsdp_worker.dmd_tensors(fsdp_worker.distill_run(out, "distill1", "ddp").dmd_run)
    got["exports"] = {stage: load_file(str(out / "distill1" / stage / "checkpoint" / "model.safetensors"))
                      for stage in ("ode_init", "dmd")}  # before the third iteration replaces dmd's
    got["distill3"] = fsdp_worker.dmd_tensors(
        fsdp_worker.distill_run(out, "distill1", "ddp", ("dmd",), "dmd.iterations=3").dmd_run)
    torch.set_num_threads(threads)
    return got


@pytest.fixture(scope="module")
def ranks(started, oracle):
    """The ranks' results: every phase but the last ended on both (the last, the NaN run, is
    checked by its own test)."""
    procs, out = started
    done = fsdp_worker.join(procs, out, timeout=240)
    done["out"] = out
    for r, log in enumerate(done["logs"]):
        assert f"rank {r} done: distill" in log, f"rank {r}, exit code {done['exitcodes'][r]}:\n{log[-3000:]}"
    return done


@pytest.fixture(scope="module")
def two_ranks(ranks):
    """Two FSDP training steps at 2 ranks, saved (sharded)."""
    return ranks["out"] / "train" / "checkpoint"


def test_fsdp_training_steps_equal_one_process(two_ranks, oracle):
    """Two FSDP steps (micro-batches accumulated, gradients clipped over the sharded norm) give one
    process's weights, EMA and exported model to ``BOUND``. The shards are pickle-free safetensors,
    one per rank, and the export is the EMA that ``generate`` loads.
    Breakage tried: every micro-batch without gradient sync (``grad_sync`` always off) fails here
    (tried again with the single forked launch)."""
    weights, ema = oracle["at2"]
    assert sorted(p.name for p in (two_ranks / "sharded").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    assert not list(two_ranks.rglob("*.metadata")) and not list(two_ranks.rglob("*.pt"))
    resumed = fsdp_worker.trainer(steps=2 * fsdp_worker.STEPS)  # one process reads both ranks' shards
    resumed.resume(two_ranks)
    assert resumed.step == fsdp_worker.STEPS
    assert close(weights, whole(resumed)) and not close(weights, oracle["untrained"])
    assert close(ema, resumed.ema.shadow)
    exported = load_checkpoint(two_ranks).state_dict()
    assert close(ema, exported, [k for k in exported if k in ema])


def test_saved_at_two_ranks_resumes_at_one_rank(two_ranks, oracle):
    """The 2-rank checkpoint, resumed by one process (weights, EMA, AdamW moments and step counters
    from the shards), trains on to the weights of a run that never stopped.
    Breakage tried: resuming without the optimizer state (``opt.*`` left out of ``state_tensors``)
    fails here."""
    weights, ema = oracle["at4"]
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


def test_a_nan_on_one_rank_stops_every_rank(ranks):
    """Rank 1's loss is NaN at step 2: both ranks raise the NaN error (the loss is all-reduced
    before the check) and exit; none waits in a collective (a rank left waiting there raises
    another error after 60 s; a hang is killed at the launch's timeout).
    Breakage tried: checking each rank's own loss before the all-reduce fails here (rank 0 goes on
    and dies of the lost peer instead; tried again with the single forked launch)."""
    assert ranks["hung"] == [] and ranks["exitcodes"] == [1, 1], ranks
    for rank, log in enumerate(ranks["logs"]):
        assert f"rank {rank} stopped: {NAN}" in log, log[-2000:]
        assert "done: nan" not in log
    assert not (ranks["out"] / "nan" / "checkpoint").exists()


def test_a_dmd_iteration_under_fsdp_equals_one_process(ranks, oracle):
    """Two DMD iterations (generator and critic updates, the teacher's guided score, the EMA) with
    generator, critic and frozen teacher sharded at 2 ranks equal one process's with plain models.
    Every rank runs the whole batch (a problem without ``rows``: FSDP shards memory, the batch is not
    split; ``ca2vdm distill`` splits it, see the distill test below).
    Breakage tried: clipping each rank's shard by its own norm (``to_local`` gradients) fails here
    (at the critic's weights; tried again with one-block models and the single forked launch)."""
    got = load_file(str(ranks["out"] / "dmd.safetensors"))
    rows, want = oracle["dmd"]
    assert all("generator_loss" in r for r in rows) and set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want if k.startswith("teacher."))
    for part in ("generator.", "critic.", "ema."):
        keys = [k for k in want if k.startswith(part)]
        assert close(want, got, keys), part
    moved = [k for k in want if k.startswith("generator.")]
    assert not close(want, oracle["dmd0"], moved)


def test_distill_stages_under_fsdp_equal_one_process(ranks, oracle):
    """``ca2vdm distill`` with ``parallel: fsdp`` at 2 ranks, every stage: the ode-pairs shards (one
    per rank) are one process's bit for bit; ode-init (2 steps) and dmd (2 iterations) split each
    batch of 2 over the ranks, student / generator, critic and frozen teacher sharded, and give one
    process's exported students and DMD state (networks, EMA, optimizer moments) to ``BOUND``. Rank
    0 alone writes metrics.csv and logs.
    Breakage tried: drawing the DMD noise for this rank's rows only (``_noised`` without ``rows``:
    rank 1 gets sample 0's noise) fails here (at the exported DMD student)."""
    out = ranks["out"]
    two, one = out / "distill2", out / "distill1"
    for name in ("pairs_00000.safetensors", "pairs_00001.safetensors"):
        a, b = load_file(str(two / "pairs" / name)), load_file(str(one / "pairs" / name))
        assert all(torch.equal(a[k], b[k]) for k in b), name
    for stage in ("ode_init", "dmd"):
        a = load_file(str(two / stage / "checkpoint" / "model.safetensors"))
        b = oracle["exports"][stage]
        assert set(a) == set(b) and close(b, a), stage
        assert parallel.is_current_sharded(two / stage / "checkpoint")
        assert len(list(csv.DictReader(open(two / stage / "metrics.csv")))) == 2
    got, want = load_file(str(out / "distill2.safetensors")), oracle["distill"]
    assert set(got) == set(want)
    for part in ("generator.", "critic.", "ema.", "opt_g.", "opt_c."):
        keys = [k for k in want if k.startswith(part) and want[k].dim()]
        assert close(want, got, keys), part
    assert "2 ranks, parallel: fsdp" in ranks["logs"][0] and "dmd iteration" not in ranks["logs"][1]
    assert not (two / "dmd" / "state.safetensors").exists()


def test_a_distill_stage_saved_at_two_ranks_resumes_at_one_rank(ranks, oracle, tmp_path):
    """The dmd stage's sharded checkpoint of 2 ranks, resumed by one process (``parallel: fsdp``, plain
    models), runs a third iteration to one process's uninterrupted weights, EMA and optimizer state;
    its export loads with ``load_checkpoint`` (what ``generate`` uses).
    Breakage tried: resuming without the optimizer moments (``DMD.load`` leaving ``opt_*`` out of the
    sharded read) fails here (at the generator)."""
    import shutil

    shutil.copytree(ranks["out"] / "distill2", ranks["out"] / "distill2r")
    run = fsdp_worker.distill_run(ranks["out"], "distill2r", "fsdp", ("dmd",), "dmd.iterations=3").dmd_run
    assert run.iteration == 3
    got, want = fsdp_worker.dmd_tensors(run), oracle["distill3"]
    for part in ("generator.", "critic.", "ema.", "opt_g.", "opt_c."):
        keys = [k for k in want if k.startswith(part) and want[k].dim()]
        assert close(want, got, keys), part
    exported = load_checkpoint(ranks["out"] / "distill2r" / "dmd" / "checkpoint").state_dict()
    assert close({k: want[f"ema.{k}"] for k in exported}, exported)


def test_distill_under_ddp_equals_one_process(ranks, oracle):
    """``ca2vdm distill`` with ``parallel: ddp`` at 2 ranks (networks whole on each rank, the batch
    split, gradients all-reduced after each backward) gives one process's DMD state.
    Breakage tried: no gradient all-reduce (``average_gradients`` a no-op) fails here."""
    got, want = load_file(str(ranks["out"] / "distill2ddp.safetensors")), oracle["distill"]
    for part in ("generator.", "critic.", "ema.", "opt_g.", "opt_c."):
        keys = [k for k in want if k.startswith(part) and want[k].dim()]
        assert close(want, got, keys), part


def test_distill_parallel_settings_that_contradict_themselves_are_refused():
    """``parallel`` / ``mixed_precision`` / ``grad_checkpointing`` are top-level distill keys (one
    setting for every stage): in a section, an unknown scheme, bf16 without fsdp, a batch that does
    not split over the ranks are one-line errors."""
    from ca2vdm.distill import DistillConfig

    base = {"teacher": "t"}
    assert DistillConfig.from_dict(base | {"parallel": "fsdp", "mixed_precision": "bf16"}).parallel == "fsdp"
    for bad, message in (({"ode_init": {"parallel": "fsdp"}}, "set it at the top level"),
                         ({"dmd": {"grad_checkpointing": True}}, "set it at the top level"),
                         ({"parallel": "zero3"}, "must be one of ddp, fsdp"),
                         ({"mixed_precision": "bf16"}, "needs parallel='fsdp'")):
        with pytest.raises(ValueError, match=message):
            DistillConfig.from_dict(base | bad)
    with pytest.raises(ValueError, match="does not split evenly over 2 ranks"):
        parallel.Rows(3, rank=0, size=2)
    rows = [parallel.Rows(4, rank=r, size=2) for r in range(2)]
    assert [r.take(list(range(4))) for r in rows] == [[0, 1], [2, 3]]
