"""One worker thread that owns all model work, and the bounded outboxes it feeds.

The event loop (``app.py``) only validates messages and moves bytes; everything that touches a
model (encoding a prompt, building a ``StreamSession``, switching its prompt, generating) runs on
the scheduler's single worker thread, one round at a time::

    loop:
        take the active jobs (a snapshot: jobs join and leave only between rounds)
        new jobs -> StreamSession; pending prompt switches -> session.set_prompt(...)
        due jobs (their viewer will need frames within ``lead_chunks`` chunks at ``fps``)
            grouped by model -> ca2vdm.stream.next_chunks(sessions, sources, strengths)
                                (compatible sessions run as one batched forward)
        each chunk -> uint8 RGB -> loop.call_soon_threadsafe(outbox.put, message)
        nothing due -> sleep until the next job is due, or a command arrives

Pacing: a job is generated only as far as ``lead_chunks`` ahead of its viewer's playback clock, so a
fast model never floods a socket and every stream gets its share of the worker. A viewer that stops
reading never slows the worker: its outbox is bounded and drops its oldest chunk when full.

``start`` / ``stop`` are called from the event loop and take effect at once for the session count
(``len(scheduler)``): ``stop`` removes the job and drops its session (a round already running
finishes it and throws the chunk away).
"""

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from ..conditioning import Text
from ..stream import StreamSession, next_chunks
from ..video import to_uint8
from .protocol import ProtocolError, encode_chunk, error

log = logging.getLogger(__name__)


class Busy(ProtocolError):
    """Every session slot is taken."""


@dataclass
class ServedModel:
    """A loaded checkpoint and how to sample it (``checkpoint.sampling_for``)."""

    name: str
    model: torch.nn.Module
    steps: int
    levels: list | None
    guidance: float

    def sampling(self, steps: int | None = None, guidance: float | None = None) -> dict:
        """StreamSession's {"steps", "levels", "guidance"} for a request: what is given wins, else the
        recommendation. A few-step model keeps its levels unless another step count is asked for."""
        levels = self.levels
        if steps is None or (levels is not None and steps == len(levels)):
            steps = None if levels is not None else self.steps
        else:
            levels = None
        return {"steps": steps, "levels": levels, "guidance": self.guidance if guidance is None else guidance}

    def describe(self) -> dict:
        cfg = self.model.config
        return {"name": self.name, "steps": self.steps, "levels": self.levels, "guidance": self.guidance,
                "frame_size": list(cfg.frame_size), "chunk_frames": cfg.chunk_frames}


class Outbox:
    """A viewer's outgoing messages, used on the event loop only (the worker reaches it through
    ``loop.call_soon_threadsafe``). At most ``max_chunks`` chunks wait; a new one beyond that drops
    the oldest (``dropped`` counts them). Text messages are never dropped for chunks."""

    def __init__(self, max_chunks: int = 4):
        self.items = collections.deque()  # (payload, is_chunk)
        self.max_chunks, self.chunks, self.dropped = max_chunks, 0, 0
        self.ready = None  # asyncio.Event, made on first use inside the loop

    def _event(self) -> asyncio.Event:
        if self.ready is None:
            self.ready = asyncio.Event()
        return self.ready

    def put(self, payload, is_chunk: bool = False) -> None:
        if is_chunk:
            if self.chunks >= self.max_chunks:
                for i, (_, c) in enumerate(self.items):
                    if c:
                        del self.items[i]
                        break
                self.chunks -= 1
                self.dropped += 1
            self.chunks += 1
        elif len(self.items) > 256:  # a client flooding bad messages: keep the newest replies
            self.chunks -= self.items.popleft()[1]
        self.items.append((payload, is_chunk))
        self._event().set()

    async def get(self):
        """The next payload: bytes (a chunk) or a dict (a JSON message)."""
        while not self.items:
            self._event().clear()
            await self._event().wait()
        payload, is_chunk = self.items.popleft()
        self.chunks -= is_chunk
        return payload


@dataclass
class Job:
    """One viewer's stream: its request, its session (built by the worker) and its delivery target."""

    request: dict                 # protocol.parse_message's "start" message
    loop: object                  # the viewer's asyncio loop
    outbox: Outbox
    source: torch.Tensor | None = None   # (C, F, H, W) in [-1, 1] at the model's frame size (video-to-video)
    session: StreamSession | None = None
    active: bool = True
    revision: int = 0             # prompt revision of the chunks being made
    pending: list = field(default_factory=list)  # [(prompt, guidance, revision)] to apply between chunks
    frames_sent: int = 0
    chunks_sent: int = 0
    source_pos: int = 0
    t0: float | None = None       # playback clock origin: frame n is shown at t0 + n / fps
    due: float = 0.0              # when the worker should make the next chunk

    def send(self, payload, is_chunk: bool = False) -> None:
        """Thread-safe hand-off to the viewer's outbox (a closed loop means the viewer is gone)."""
        try:
            self.loop.call_soon_threadsafe(self.outbox.put, payload, is_chunk)
        except RuntimeError:
            self.active = False


class Scheduler:
    """The worker thread and the session table. ``models``: name -> ``ServedModel``; ``encode_text``:
    list of prompts -> ``Text`` (default: the MiniLM encoder, loaded on the worker on first use)."""

    def __init__(self, models: dict, encode_text=None, max_sessions: int = 4, fps: float = 8.0,
                 lead_chunks: int = 2, threads: int | None = None):
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.models, self.max_sessions, self.fps = models, max_sessions, float(fps)
        self.lead_chunks, self.threads = lead_chunks, threads
        self._encode, self._texts = encode_text, collections.OrderedDict()  # prompt -> Text (LRU)
        self.jobs: list[Job] = []
        self.chunks = 0  # chunks generated since start (all streams)
        self._cv = threading.Condition()
        self._wake = False
        self._closed = False
        self._thread = None

    # ---- called from the event loop -------------------------------------------------------
    def __len__(self) -> int:
        return len(self.jobs)

    def start(self, job: Job) -> Job:
        """Add a stream (its session is built by the worker); ``Busy`` when every slot is taken."""
        with self._cv:
            if len(self.jobs) >= self.max_sessions:
                raise Busy(f"server busy: all {self.max_sessions} sessions are in use; try again later")
            self.jobs = self.jobs + [job]
            self._wake = True
            self._cv.notify()
        return job

    def set_prompt(self, job: Job, prompt: str, guidance: float | None) -> int:
        """Queue a prompt switch for the next chunk boundary; returns its revision number."""
        with self._cv:
            revision = (job.pending[-1][2] if job.pending else job.revision) + 1
            job.pending.append((prompt, guidance, revision))
            self._wake = True
            self._cv.notify()
        return revision

    def stop(self, job: Job | None) -> None:
        """Remove a stream now: the slot is free on return; its session is dropped."""
        if job is None:
            return
        with self._cv:
            job.active = False
            self.jobs = [j for j in self.jobs if j is not job]
            job.session = None
            self._wake = True
            self._cv.notify()

    def run_in_thread(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ca2vdm-serve-worker", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- the worker -----------------------------------------------------------------------
    def _text(self, prompt: str) -> Text:
        if prompt not in self._texts:
            if self._encode is None:
                from ..text import get_text_encoder

                enc = get_text_encoder("cpu")
                self._encode = lambda prompts: Text(*enc.encode(prompts))
            self._texts[prompt] = self._encode([prompt])
            while len(self._texts) > 256:
                self._texts.popitem(last=False)
        self._texts.move_to_end(prompt)
        return self._texts[prompt]

    def _fail(self, job: Job, exc: Exception) -> None:
        self.stop(job)
        job.send(error(f"stream stopped: {one_line(exc)}"))
        job.send({"type": "stopped"})

    def _prepare(self, job: Job) -> None:
        """Worker side of start / set_prompt: build the session, apply pending prompt switches."""
        served = self.models[job.request["model"]]
        if job.session is None:
            r = job.request
            session = StreamSession(served.model, prompt=self._text(r["prompt"]), seed=r["seed"],
                                    **served.sampling(r["steps"], r["guidance"]))
            with self._cv:
                if job.active:
                    job.session = session
        while job.pending and job.session is not None:
            prompt, guidance, revision = job.pending[0]
            try:
                job.session.set_prompt(self._text(prompt), guidance=guidance)
                job.revision = revision
            except Exception as e:  # a refused switch keeps the stream on its old prompt
                job.send(error(f"prompt not switched: {one_line(e)}"))
            job.pending.pop(0)

    def _deliver(self, job: Job, chunk: torch.Tensor, seconds: float) -> None:
        frames = to_uint8(chunk[0].float())  # (l, H, W, 3)
        job.chunks_sent += 1
        job.send(encode_chunk(frames, job.chunks_sent, job.revision, seconds * 1000), is_chunk=True)
        now, l = time.monotonic(), frames.shape[0]
        behind = job.t0 is None or (now - job.t0) * self.fps > job.frames_sent + self.lead_chunks * l
        if behind:  # first chunk, or the viewer ran dry: its clock restarts at this chunk
            job.t0 = now - job.frames_sent / self.fps
        job.frames_sent += l
        job.due = job.t0 + (job.frames_sent - self.lead_chunks * l) / self.fps

    def _source(self, job: Job, served: ServedModel):
        """The next l frames of the uploaded clip (1, C, l, H, W), looping; None without one."""
        if job.source is None:
            return None
        l, F = served.model.config.chunk_frames, job.source.shape[1]
        idx = [(job.source_pos + i) % F for i in range(l)]
        job.source_pos = (job.source_pos + l) % F
        return job.source[:, idx][None].to(served.model.device, served.model.dtype)

    def _step(self, name: str, jobs: list[Job]) -> None:
        """One chunk for each job of one model: one ``next_chunks`` call (batched where compatible)."""
        served = self.models[name]
        sessions = [j.session for j in jobs]
        sources = [self._source(j, served) for j in jobs]
        strengths = [j.request["strength"] for j in jobs]
        if all(s is None for s in sources):
            sources = strengths = None
        t = time.perf_counter()
        try:
            chunks = next_chunks(sessions, sources, strengths)
        except Exception:
            if len(jobs) == 1:
                raise
            for j in jobs:  # isolate the failing stream: the others carry on
                try:
                    self._step(name, [j])
                except Exception as e:
                    self._fail(j, e)
            return
        seconds = time.perf_counter() - t
        self.chunks += len(jobs)
        for j, c in zip(jobs, chunks):
            if j.active:
                self._deliver(j, c, seconds)

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while not self._closed:
                try:
                    self._round()
                except Exception:  # a bug must not silence every stream: log it, go on
                    log.exception("serve worker: a round failed")
                    time.sleep(0.1)

    def _round(self) -> None:
        """One round: prepare new jobs and prompt switches, then one chunk for every due job (or sleep)."""
        jobs = self.jobs  # a snapshot: joins and leaves take effect between rounds
        for j in jobs:
            try:
                self._prepare(j)
            except Exception as e:
                self._fail(j, e)
        now = time.monotonic()
        ready = [j for j in jobs if j.active and j.session is not None and j.due <= now]
        if not ready:
            waiting = [j.due for j in jobs if j.active and j.session is not None]
            with self._cv:
                if not self._wake and not self._closed:
                    self._cv.wait(timeout=max(0.0, min(waiting, default=now + 1.0) - now))
                self._wake = False
            return
        groups = collections.defaultdict(list)
        for j in ready:
            groups[j.request["model"]].append(j)
        for name, group in groups.items():
            try:
                self._step(name, group)
            except Exception as e:
                self._fail(group[0], e)

    def status(self) -> dict:
        return {"sessions": len(self.jobs), "max_sessions": self.max_sessions, "fps": self.fps,
                "chunks": self.chunks}


def one_line(exc: Exception) -> str:
    """An exception as one line (PyAV and torch messages can span several)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."

