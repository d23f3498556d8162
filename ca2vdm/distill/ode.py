"""ODE initialisation (CausVid, Causal-Forcing): the teacher's sampling trajectories stored at the
student's noise levels (``write_ode_pairs``), and the student's regression from a point on a
trajectory to its clean end (``ode_regression_loss``).

With an autoregressive teacher (Causal-Forcing: the init should come from a causal teacher) each
chunk's trajectory runs in the teacher's own cached loop, its context the teacher's earlier chunks;
a bidirectional teacher (CausVid's asymmetric setting) samples the whole clip on one trajectory.
Its Euler path is piecewise linear in sigma, so the state at a student level sigma between two
teacher steps is read off that path exactly (``states_at_levels``). The regression sees what the
trajectory saw: the teacher's clean clip as context and each chunk at a level of its own, every
chunk in one masked forward (``Backbone.forward_all_chunks``)::

    for every clip:  video, states[k] = teacher trajectory at student level k        (ode-pairs)
    loss = || student_x0(states[j_c] of chunk c | video's earlier chunks) - video ||^2  (ode-init)
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.utils.data import Dataset

from ..backbone import Backbone
from ..checkpoint import load_tensors
from ..conditioning import Condition
from ..safefile import save_safetensors
from ..generate import generate_clip
from ..stream import StreamSession


def states_at_levels(trajectory: list[torch.Tensor], sigmas: list[float], levels: list[float]) -> torch.Tensor:
    """The Euler path through ``trajectory`` (states x_i at noise levels ``sigmas[i]``, decreasing
    to ``sigmas[-1]`` = 0, the clean end) read at each of ``levels``: between two steps the path is
    the straight line x_i + (sigma_i - s) / (sigma_i - sigma_{i+1}) (x_{i+1} - x_i). (K, *x.shape)."""
    if len(trajectory) != len(sigmas):
        raise ValueError(f"{len(trajectory)} states but {len(sigmas)} noise levels")
    out = []
    for s in levels:
        if not sigmas[-1] <= s <= sigmas[0]:
            raise ValueError(f"level {s} lies outside the teacher's trajectory [{sigmas[-1]}, {sigmas[0]}]")
        i = max(j for j in range(len(sigmas) - 1) if sigmas[j] >= s)  # sigma_i >= s >= sigma_{i+1}
        w = (sigmas[i] - s) / (sigmas[i] - sigmas[i + 1])
        out.append(trajectory[i] if w == 0 else trajectory[i] + w * (trajectory[i + 1] - trajectory[i]))
    return torch.stack(out)


def teacher_trajectories(teacher: Backbone, levels: list[float], frames: int, steps: int = 20,
                         guidance: float = 4.0, **session) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's video of ``frames`` frames, as ``generate_video`` makes it, and the state of
    every generated frame at every student level: (B, C, F, H, W), (B, K, C, F - p, H, W).
    ``session``: StreamSession's other arguments (prompt, first_frames, seed, autocast, ...).
    A bidirectional teacher samples the whole clip at once (``generate.generate_clip``): every frame
    shares its trajectory's levels, and the states are read off that one Euler path."""
    cfg = teacher.config
    p, l = cfg.prefix_frames, cfg.chunk_frames
    if teacher.diffusion.objective != "flow":
        raise ValueError("ODE pairs read states off the Euler path of a flow-matching teacher; "
                         f"this teacher's objective is {teacher.diffusion.objective!r}")
    if cfg.temporal == "bidirectional":  # CausVid's asymmetric pairs: one trajectory of the whole clip
        session.pop("first_frames", None)
        trajectory = []
        video = generate_clip(teacher, steps=steps, guidance=guidance, frames=frames, trajectory=trajectory, **session)
        sampler = teacher.diffusion.sampler(steps)
        sigmas = [c[0] for c in sampler.coefs] + [sampler.coefs[-1][1]]
        return video, states_at_levels(trajectory, sigmas, levels).transpose(0, 1).contiguous()
    if frames <= p or (frames - p) % l:
        raise ValueError(f"frames={frames}: the clip must be {p} given frame(s) plus whole chunks of {l}")
    s = StreamSession(teacher, steps=steps, guidance=guidance, **session)
    sigmas = [c[0] for c in s.sampler.coefs] + [s.sampler.coefs[-1][1]]
    chunks, states = [s.next_chunk()] if p else [], []
    n = (frames - p) // l
    for k in range(n):
        trajectory = []
        chunks.append(s.next_chunk(last=k == n - 1, trajectory=trajectory))
        states.append(states_at_levels(trajectory, sigmas, levels))  # (K, B, C, l, H, W)
    return torch.cat(chunks, dim=2), torch.cat(states, dim=3).transpose(0, 1).contiguous()


def write_ode_pairs(teacher: Backbone, out_dir, items, levels: list[float], frames: int, clips: int,
                    batch: int, encode=None, steps: int = 20, guidance: float = 4.0, seed: int = 0,
                    autocast=None, log=print, part: tuple[int, int] = (0, 1)) -> list[Path]:
    """Shards ``pairs_00000.safetensors``, ... of ``batch`` clips each, ``clips`` in all: tensors
    ``video``, ``states``, ``seeds`` (and ``labels``, class teachers); metadata ``captions``, ``levels``, the teacher's sampling.
    ``items(i)``: the i-th conditioning item ({"caption"?, "video"?: the first frames' source}).
    ``encode(captions)``: -> ``Text`` (text teachers). Clip i uses seed + i. A shard that exists is
    kept, so an interrupted run resumes where it stopped (each shard is written atomically).
    ``part`` = (r, n): this process computes and writes shards j with j % n == r only (n ranks share
    the shards; each shard's clips are seeded by their index, so the files are one process's)."""
    out_dir = Path(out_dir)
    cfg, meta_levels = teacher.config, json.dumps([float(s) for s in levels])
    paths = []
    for j, start in enumerate(range(0, clips, batch)):
        path = out_dir / f"pairs_{j:05d}.safetensors"
        paths.append(path)
        if j % part[1] != part[0]:
            continue
        if path.is_file():
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("levels") != meta_levels:
                    raise ValueError(f"{path} holds pairs for other noise levels; use another pairs folder")
            continue
        idx = list(range(start, min(clips, start + batch)))
        rows = [items(i) for i in idx]
        kw = dict(seed=[seed + i for i in idx], autocast=autocast, batch=len(idx))
        captions = [r.get("caption", "") for r in rows]
        if cfg.conditioning == "text":
            kw["prompt"] = encode(captions)
        elif cfg.conditioning == "class":
            kw["labels"] = torch.tensor([int(r["label"]) for r in rows])
        if cfg.prefix_frames:
            kw["first_frames"] = torch.stack([r["video"][:, :cfg.prefix_frames] for r in rows]).to(teacher.device,
                                                                                                   teacher.dtype)
        with torch.no_grad():
            video, states = teacher_trajectories(teacher, levels, frames, steps, guidance, **kw)
        meta = dict(captions=json.dumps(captions), levels=meta_levels, steps=str(steps), guidance=str(guidance))
        tensors = {"video": video, "states": states, "seeds": torch.tensor(kw["seed"])}
        if "labels" in kw:
            tensors["labels"] = kw["labels"]
        save_safetensors(tensors, path, meta)
        log(f"ode-pairs: shard {j + 1}/{-(-clips // batch)} ({idx[-1] + 1}/{clips} clips)")
    return paths


class ODEPairs(Dataset):
    """The shards of ``write_ode_pairs`` in memory: item i = {"video", "states", "caption"} (and
    "label" for a class teacher)."""

    def __init__(self, folder, levels: list[float] | None = None):
        paths = sorted(Path(folder).glob("pairs_*.safetensors"))
        if not paths:
            raise FileNotFoundError(f"no ODE pairs (pairs_*.safetensors) in {folder}: run the ode-pairs stage first")
        videos, states, labels, self.captions, self.levels = [], [], [], [], None
        for path in paths:
            tensors = load_tensors(path)  # a truncated shard is a clear error
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            if "levels" not in meta or "video" not in tensors or "states" not in tensors:
                raise ValueError(f"{path} is not an ODE-pairs shard")
            shard_levels = json.loads(meta["levels"])
            if self.levels is None:
                self.levels = shard_levels
            if shard_levels != self.levels or (levels is not None and shard_levels != [float(s) for s in levels]):
                raise ValueError(f"{path} holds pairs for levels {shard_levels}, expected {levels or self.levels}")
            videos.append(tensors["video"])
            states.append(tensors["states"])
            if "labels" in tensors:
                labels.append(tensors["labels"])
            self.captions += json.loads(meta["captions"])
        self.video, self.states = torch.cat(videos), torch.cat(states)
        self.labels = torch.cat(labels) if labels else None
        if self.labels is not None and len(self.labels) != len(self.video):
            raise ValueError(f"the shards in {folder} mix class-conditioned and unconditioned pairs")

    def __len__(self) -> int:
        return self.video.shape[0]

    def __getitem__(self, i: int) -> dict:
        item = {"video": self.video[i], "states": self.states[i], "caption": self.captions[i]}
        if self.labels is not None:
            item["label"] = int(self.labels[i])
        return item


def ode_regression_loss(student: Backbone, video: torch.Tensor, states: torch.Tensor, levels: list[float],
                        cond: Condition, generator: torch.Generator, rows=None) -> torch.Tensor:
    """The ODE-init loss: each (clip, chunk) at a student level of its own, drawn from ``generator``,
    all chunks in one all-chunks forward with the teacher's clean clip as context; MSE of the x0
    prediction to the clip. video (B, C, F, H, W); states (B, K, C, F - p, H, W). ``rows``
    (``parallel.Rows``): the batch is this rank's rows of a global one, the levels drawn for all of it."""
    cfg = student.config
    B, K, C, Fg = states.shape[:4]
    l = cfg.chunk_frames
    if K != len(levels) or video.shape[2] - cfg.prefix_frames != Fg or Fg % l:
        raise ValueError(f"states {tuple(states.shape)} do not match {len(levels)} levels and video "
                         f"{tuple(video.shape)} in chunks of {l}")
    if rows is None:
        j = torch.randint(K, (B, Fg // l), generator=generator)
    else:
        j = rows.take(torch.randint(K, (rows.total, Fg // l), generator=generator))
    j = j.repeat_interleave(l, dim=1)  # (B, F - p)
    pick = j.to(states.device)[:, None, None, :, None, None].expand(B, 1, C, Fg, *states.shape[4:])
    noisy = torch.take_along_dim(states, pick, dim=1)[:, 0]  # (B, C, F - p, H, W)
    level = torch.tensor(levels, dtype=torch.float64)[j].to(video.device)  # (B, F - p)
    pred = student.forward_all_chunks(video, noisy, student.diffusion.model_time(level), cond, x0=True)
    return F.mse_loss(pred.float(), video[:, :, cfg.prefix_frames:].float())
