"""What the FSDP tests run, in one process (the oracle: a plain model) or under
``torchrun --nproc_per_node 2`` (gloo, FSDP2): ``python fsdp_worker.py train|nan|dmd OUT``.

train  two training steps of a tiny model, saved to OUT (sharded with ``parallel='fsdp'``)
nan    as train, but rank 1's loss is NaN at the second step: every rank prints why it stopped
dmd    two DMD iterations of tiny generator / critic / teacher; their whole weights and the EMA to
       OUT.safetensors
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ca2vdm.training import parallel  # noqa: E402

STEPS = 2


def trainer(out=None, parallel_mode="fsdp", steps=STEPS, **train):
    from test_train import make_trainer, model_config, train_config

    tc = train_config(parallel=parallel_mode, autocast="off", batch_size=4, grad_accum=2, steps=steps,
                      save_every=0, **train)
    return make_trainer(model_config(), tc, out_dir=out)


def dmd_run(iterations=2):
    """(rows, whole tensors) of ``iterations`` DMD iterations; sharded when a process group is up."""
    from conftest import tiny_model

    from ca2vdm.distill import DMD, DMDConfig, VideoDMD

    kw = dict(dtype=torch.float32, conditioning="class", num_classes=3, prediction="sample", max_context_frames=3)
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


def main(mode, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        if mode in ("train", "nan"):
            tr = trainer(out)
            if mode == "nan" and rank == 1:
                real = tr.objective.forward
                tr.objective.forward = lambda *a, **k: real(*a, **k) * (float("nan") if tr.step == 1 else 1.0)
            tr.run(print)
        else:
            rows, tensors = dmd_run()
            if rank == 0:
                from safetensors.torch import save_file

                save_file(tensors, out + ".safetensors")
                print("rows", rows)
    except Exception as e:
        print(f"rank {rank} stopped: {type(e).__name__}: {e}", flush=True)
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
