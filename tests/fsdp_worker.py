"""What the FSDP tests run, in one process (the oracle: a plain model) or at 2 gloo ranks (FSDP2).

``ranks(out, rank, world, init)`` is one rank's whole job, four phases in one process group:

train  two training steps of a tiny model, saved to OUT/train/checkpoint (sharded)
dmd    two DMD iterations of tiny (one-block) generator / critic / teacher; their whole weights
       and the EMA to OUT/dmd.safetensors
distill  ``ca2vdm distill`` with ``parallel: fsdp`` (``distill_setup``'s teacher and config): the
       ode-pairs, ode-init and dmd stages into OUT/distill2; the DMD run's whole tensors (networks,
       EMA, optimizer moments) to OUT/distill2.safetensors; the same with ``parallel: ddp`` into
       OUT/distill2ddp
nan    as train (to OUT/nan), but rank 1's loss is NaN at the second step: every rank says why it
       stopped and exits 1. Last, since it ends the processes.

Each rank writes what it prints (and any traceback) to OUT/rank<r>.log: ``rank r done: <phase>``
after each phase, ``rank r stopped: <error>`` when one raises. The tests fork the ranks from the
pytest process (``start``, ``join``); ``torchrun --nproc_per_node 2 fsdp_worker.py OUT`` runs the same.
"""

import datetime
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ca2vdm.training import parallel  # noqa: E402

STEPS = 2
PHASES = ("train", "dmd", "distill", "nan")
DISTILL = """out_dir: {out}
teacher: {teacher}
levels: [1.0, 0.8, 0.45]
teacher_steps: 2
autocast: "off"
samples: 0
parallel: {parallel}
ode_pairs: {{clips: 4, batch_size: 2}}
ode_init: {{steps: 2, batch_size: 2, lr: 0.001, warmup: 1, save_every: 2, eval_every: 0, log_every: 1}}
dmd: {{iterations: 2, batch_size: 2, ratio: 1, log_every: 1, save_every: 2, sample_every: 0, generator_lr: 0.001,
       grad_clip: 0.05, diagnose_every: 0}}
"""


class Clips:
    """Random labelled clips (the data does not matter here; avoids loading the digits' glyphs)."""

    def __init__(self, n=8, frames=5, size=8, classes=10):
        g = torch.Generator().manual_seed(0)
        self.items = [{"video": torch.rand(3, frames, size, size, generator=g) * 2 - 1, "label": i % classes}
                      for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def trainer(out=None, parallel_mode="fsdp", steps=STEPS, **train):
    from test_train import clip_frames, make_trainer, model_config, train_config

    cfg = model_config()
    tc = train_config(parallel=parallel_mode, autocast="off", batch_size=4, grad_accum=2, steps=steps,
                      save_every=0, **train)
    return make_trainer(cfg, tc, dataset=Clips(frames=clip_frames(cfg)), out_dir=out)


def dmd_run(iterations=2):
    """(rows, whole tensors) of ``iterations`` DMD iterations; sharded when a process group is up."""
    from conftest import tiny_model

    from ca2vdm.distill import DMD, DMDConfig, VideoDMD

    kw = dict(dtype=torch.float32, conditioning="class", num_classes=3, prediction="sample", max_context_frames=3,
              depth=1)
    teacher, student, critic = tiny_model(seed=0, **kw), tiny_model(seed=1, **kw).train(), tiny_model(seed=0, **kw)
    teacher.requires_grad_(False)
    critic.train()
    for m in (teacher, student, critic):
        parallel.wrap(m, "fsdp")
    items = [{"label": i % 3, "video": torch.randn(3, 5, 8, 8, generator=torch.Generator().manual_seed(i))}
             for i in range(6)]
    problem = VideoDMD(student, teacher, critic, [1.0, 0.8, 0.45], frames=5, batch=2, items=lambda i: items[i],
                       pool=6, guidance=3.0)
    run = DMD(student, critic, problem.problem(), DMDConfig(ratio=1, generator_lr=1e-3, grad_clip=0.05))
    rows = [run.step() for _ in range(iterations)]
    out = {f"generator.{k}": v for k, v in student.state_dict().items()}
    out |= {f"critic.{k}": v for k, v in critic.state_dict().items()}
    out |= {f"teacher.{k}": v for k, v in teacher.state_dict().items()}
    out |= {f"ema.{k}": v for k, v in run.ema.shadow.items()}
    return rows, parallel.full_state(out)


def distill_setup(out: Path) -> None:
    """The distill phase's teacher (a tiny one-block class model; its data: ``Clips``)."""
    from conftest import tiny_model

    from ca2vdm.checkpoint import save_checkpoint

    teacher = tiny_model(seed=0, dtype=torch.float32, conditioning="class", num_classes=3, prediction="sample",
                         max_context_frames=3, depth=1)
    save_checkpoint(out / "teacher", teacher, {"data": {"dataset": "test-clips"}})


def distill_run(out: Path, run_dir: str, parallel_mode: str, stages=None, *overrides):
    """``distill_from_config`` of ``DISTILL`` (out_dir OUT/run_dir) with ``Clips`` as its data: the
    ``Distillation``; its ``dmd_run`` is the DMD run of the dmd stage."""
    from ca2vdm.distill import STAGES, distill_from_config, load_distill_config
    from ca2vdm.distill import run as run_module

    cfg = out / f"{run_dir}.yaml"
    if parallel.world()[0] == 0:
        cfg.write_text(DISTILL.format(out=out / run_dir, teacher=out / "teacher", parallel=parallel_mode))
    parallel.barrier()
    real = run_module.build_dataset
    run_module.build_dataset = lambda data, frames, split: Clips(frames=frames, classes=3)
    try:
        return distill_from_config(load_distill_config(cfg, list(overrides)), stages or STAGES, log=print)
    finally:
        run_module.build_dataset = real


def dmd_tensors(run) -> dict:
    """The whole tensors of a DMD run (networks, EMA, optimizer moments; every rank calls)."""
    return parallel.full_state(run.live_tensors())


def phases(out: Path, rank: int, say) -> None:
    """The phases in order, in an initialised process group."""
    tr = trainer(out / "train")
    tr.run(say)
    say(f"rank {rank} done: train")
    rows, tensors = dmd_run()
    if rank == 0:
        from safetensors.torch import save_file

        save_file(tensors, str(out / "dmd.safetensors"))
        say(f"rows {rows}")
    say(f"rank {rank} done: dmd")
    for run_dir, mode in (("distill2", "fsdp"), ("distill2ddp", "ddp")):
        tensors = dmd_tensors(distill_run(out, run_dir, mode).dmd_run)
        if rank == 0:
            from safetensors.torch import save_file

            save_file(tensors, str(out / f"{run_dir}.safetensors"))
    say(f"rank {rank} done: distill")
    tr = trainer(out / "nan")
    if rank == 1:
        real = tr.objective.forward
        tr.objective.forward = lambda *a, **k: real(*a, **k) * (float("nan") if tr.step == 1 else 1.0)
    tr.run(say)
    say(f"rank {rank} done: nan")


def ranks(out, rank: int, world: int, init: str, collective_timeout: float = 60.0) -> None:
    """One rank's job (the target of the forked processes): joins the group at ``init``
    (``file://`` or ``env://``), runs ``phases``, logs to OUT/rank<rank>.log, exits 1 on an error.
    ``collective_timeout``: a rank left waiting in a collective raises after this many seconds."""
    out = Path(out)
    log = open(out / f"rank{rank}.log", "w", buffering=1)
    os.dup2(log.fileno(), 1)  # C++ (gloo) messages too
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    torch.set_num_threads(1)
    t0 = time.perf_counter()

    def say(line):
        print(f"{line} ({time.perf_counter() - t0:.1f} s)" if line.startswith(f"rank {rank}") else line, flush=True)

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=collective_timeout))
    try:
        phases(out, rank, say)
    except Exception as e:
        say(f"rank {rank} stopped: {type(e).__name__}: {e}")
        traceback.print_exc()
        log.flush()
        raise SystemExit(1) from None
    finally:
        dist.destroy_process_group()


def start(out, world: int = 2) -> list:
    """Fork ``world`` ranks from this process (no interpreter start, no imports: the modules are
    loaded here already) and return them at once; ``join`` waits."""
    import multiprocessing

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    init = f"file://{out / 'rendezvous'}"
    procs = [multiprocessing.get_context("fork").Process(target=ranks, args=(out, r, world, init), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    return procs


def join(procs, out, timeout: float) -> dict:
    """Wait for the ranks of ``start``, killing any left after ``timeout`` seconds:
    {"exitcodes": [...], "logs": [...], "hung": the ranks killed}."""
    out, deadline, hung = Path(out), time.monotonic() + timeout, []
    for r, p in enumerate(procs):
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            hung.append(r)
    for r in hung:
        procs[r].kill()
        procs[r].join()
    logs = [(out / f"rank{r}.log").read_text() if (out / f"rank{r}.log").exists() else "" for r in range(len(procs))]
    return dict(exitcodes=[p.exitcode for p in procs], logs=logs, hung=hung)


if __name__ == "__main__":  # torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT
    Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
    ranks(sys.argv[1], int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://")
