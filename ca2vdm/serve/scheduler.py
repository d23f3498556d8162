"""One worker thread that owns all model work, and the bounded outboxes it feeds.

The event loop (``app.py``) only validates messages and moves bytes; everything that touches a
model (encoding a prompt, building a ``StreamSession``, switching its prompt, generating) runs on
the scheduler's single worker thread, one round at a time::

    loop:
        take the active jobs (a snapshot: jobs join and leave only between rounds)
        new jobs -> StreamSession
        due jobs (their viewer will need frames within ``lead_chunks`` chunks at ``fps``, and has
        taken the chunks already made for it)
            its latest prompt switch, if any -> session.set_prompt(...) (one re-cache)
            grouped by model -> ca2vdm.stream.next_chunks(sessions, sources, strengths)
                                (compatible sessions run as one batched forward)
        each chunk -> uint8 RGB -> loop.call_soon_threadsafe(outbox.put, message)
        nothing due -> sleep until the next job is due, or a command arrives

Pacing, by two clocks: a job is generated only as far as ``lead_chunks`` ahead of its viewer's
playback clock at ``fps``, and only while fewer than ``lead_chunks`` of its chunks wait to be written
to the viewer's socket (``Outbox.written``). So a fast model never floods a socket, every stream gets
its share of the worker, and a viewer that stops reading is held back once its socket's buffers are
full: the worker makes nothing for it until it reads again (it is not told; its clock restarts).

Prompt switches: a job holds at most one, the latest (``Job.switch``); one sent before the previous
was applied replaces it (counted as skipped). It is applied just before the job's next chunk, so a
stream is re-cached at most once per chunk however fast its viewer sends switches.

Errors: whatever fails while preparing, generating or delivering one job's chunk stops that job
only, with an error message to its viewer; a batched ``next_chunks`` that fails is run again for
each stream alone, so only the one that fails alone is stopped.

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
from .protocol import ProtocolError, encode_chunk, error, one_line

log = logging.getLogger(__name__)


class Busy(ProtocolError):
    """Every session slot is taken."""


@dataclass
class ServedModel:
    """A loaded checkpoint and how to sample it (``checkpoint.sampling_for``), or a Wan pipeline folder
    (``pipeline``: a ``pipeline.Pipeline``, its chunks decoded to pixels by each stream's own VAE
    caches, at its frame rate ``fps``; None: the server's)."""

    name: str
    model: torch.nn.Module
    steps: int
    levels: list | None
    guidance: float
    pipeline: object = None
    fps: float | None = None

    @property
    def frame_size(self) -> tuple:
        """(H, W) of the frames a viewer gets: the pipeline's pixels, else the model's frames."""
        return tuple(self.pipeline.size) if self.pipeline is not None else tuple(self.model.config.frame_size)

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
                "frame_size": list(self.frame_size), "chunk_frames": cfg.chunk_frames, "fps": self.fps}


class Outbox:
    """A viewer's outgoing messages, used on the event loop only (the worker reaches it through
    ``loop.call_soon_threadsafe``). At most ``max_chunks`` chunks wait; a new one beyond that drops
    the oldest (``dropped`` counts them). Text messages are never dropped for chunks.
    ``written``: chunks the sender has written to the socket (it counts them); the worker reads it,
    with ``dropped``, to hold back a viewer that is not reading (an int read across threads: at worst
    one round late)."""

    def __init__(self, max_chunks: int = 4):
        self.items = collections.deque()  # (payload, is_chunk)
        self.max_chunks, self.chunks, self.dropped, self.written = max_chunks, 0, 0, 0
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
        """The next payload: bytes (a chunk), a dict (a JSON message) or a tuple (code, reason): the
        socket's close, after everything before it."""
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
    source: torch.Tensor | None = None   # (F, H, W, 3) uint8 at the model's frame size (video-to-video)
    client: str = ""              # the viewer's address (streams per client are limited)
    session: StreamSession | None = None
    wan: object = None            # a Wan pipeline's stream (wan_stream.WanStream: its VAE caches); its session is ``session``
    active: bool = True
    revision: int = 0             # prompt revision of the chunks being made
    revisions: int = 0            # the last revision handed out (set_prompt)
    switch: tuple | None = None   # the latest switch not yet applied: (prompt, guidance, revision)
    switches: collections.Counter = field(default_factory=collections.Counter)  # received, applied, skipped
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
                 lead_chunks: int = 2, threads: int | None = None, max_streams_per_client: int | None = None):
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if lead_chunks < 1:
            raise ValueError(f"lead_chunks must be at least 1, got {lead_chunks}")
        self.models, self.max_sessions, self.fps = models, max_sessions, float(fps)
        self.max_per_client = max_sessions if max_streams_per_client is None else max_streams_per_client
        self.lead_chunks, self.threads = lead_chunks, threads
        self._encode, self._texts = encode_text, collections.OrderedDict()  # prompt -> Text (LRU)
        self.jobs: list[Job] = []
        self.chunks = 0  # chunks generated since start (all streams)
        self.switches = collections.Counter()  # prompt switches of all streams: received, applied, skipped
        self._cv = threading.Condition()
        self._wake = False
        self._closed = False
        self._thread = None

    # ---- called from the event loop -------------------------------------------------------
    def __len__(self) -> int:
        return len(self.jobs)

    def start(self, job: Job) -> Job:
        """Add a stream (its session is built by the worker); ``Busy`` when every slot is taken or
        its client already has ``max_streams_per_client`` streams."""
        with self._cv:
            if len(self.jobs) >= self.max_sessions:
                raise Busy(f"server busy: all {self.max_sessions} sessions are in use; try again later")
            if sum(j.client == job.client for j in self.jobs) >= self.max_per_client:
                raise Busy(f"server busy: at most {self.max_per_client} stream(s) per client at once")
            self.jobs = self.jobs + [job]
            self._wake = True
            self._cv.notify()
        return job

    def set_prompt(self, job: Job, prompt: str, guidance: float | None) -> int:
        """Make this the job's prompt from its next chunk on, replacing a switch not yet applied;
        returns its revision number."""
        with self._cv:
            job.revisions += 1
            if job.switch is not None:
                self._count(job, "skipped")
            job.switch = (prompt, guidance, job.revisions)
            self._count(job, "received")
            return job.revisions

    def pending(self, job: Job) -> int:
        """Prompt switches of this job waiting to be applied (0 or 1)."""
        with self._cv:
            return int(job.switch is not None)

    def wake(self) -> None:
        """Have the worker look at its jobs again (a held viewer's socket took a chunk)."""
        with self._cv:
            self._wake = True
            self._cv.notify()

    def stop(self, job: Job | None) -> None:
        """Remove a stream now: the slot is free on return; its session is dropped."""
        if job is None:
            return
        with self._cv:
            job.active = False
            self.jobs = [j for j in self.jobs if j is not job]
            job.session = job.wan = job.source = job.switch = None
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
    def _text(self, prompt: str, served: ServedModel | None = None) -> Text:
        """The prompt's states (LRU-cached): a pipeline's own text encoder, else the server's."""
        key = (served.name if served is not None and served.pipeline is not None else None, prompt)
        if key not in self._texts:
            if key[0] is not None:
                self._texts[key] = served.pipeline.encode_prompt([prompt])
            else:
                if self._encode is None:
                    from ..text import get_text_encoder

                    enc = get_text_encoder("cpu")
                    self._encode = lambda prompts: Text(*enc.encode(prompts))
                self._texts[key] = self._encode([prompt])
            while len(self._texts) > 256:
                self._texts.popitem(last=False)
        self._texts.move_to_end(key)
        return self._texts[key]

    def _count(self, job: Job, what: str) -> None:
        """Count a prompt switch (under the lock)."""
        job.switches[what] += 1
        self.switches[what] += 1

    def _fail(self, job: Job, exc: Exception) -> None:
        """Stop a stream that failed and tell its viewer (not one that was stopped meanwhile)."""
        if not job.active:
            return
        self.stop(job)
        job.send(error(f"stream stopped: {one_line(exc)}"))
        job.send({"type": "stopped"})

    def _prepare(self, job: Job) -> None:
        """Worker side of start: build the session."""
        if job.session is None:
            served, r = self.models[job.request["model"]], job.request
            text, sampling, wan = self._text(r["prompt"], served), served.sampling(r["steps"], r["guidance"]), None
            if served.pipeline is not None:  # its own VAE caches: decoded (and encoded) per stream
                from ..wan_stream import WanStream

                wan = WanStream(served.pipeline, text, seed=r["seed"], **sampling)
                session = wan.session
            else:
                session = StreamSession(served.model, prompt=text, seed=r["seed"], **sampling)
            with self._cv:
                if job.active:
                    job.session, job.wan = session, wan

    def _switch(self, job: Job) -> None:
        """Apply the job's latest prompt switch, if any (one re-cache); a refused one keeps the old prompt."""
        with self._cv:
            switch, job.switch = job.switch, None
        if switch is None or job.session is None:
            return
        prompt, guidance, revision = switch
        try:
            job.session.set_prompt(self._text(prompt, self.models[job.request["model"]]), guidance=guidance)
            job.revision = revision
            with self._cv:  # the counters are shared with set_prompt, on the event loop
                self._count(job, "applied")
        except Exception as e:
            job.send(error(f"prompt not switched: {one_line(e)}"))

    def _waiting_for_viewer(self, job: Job) -> bool:
        """Whether ``lead_chunks`` of the job's chunks still wait to be written to its viewer's socket."""
        return job.chunks_sent - job.outbox.written - job.outbox.dropped >= self.lead_chunks

    def _deliver(self, job: Job, chunk: torch.Tensor, seconds: float) -> None:
        wan = job.wan
        if wan is not None:  # a pipeline's latents -> pixels, by this stream's own VAE caches
            t = time.perf_counter()
            chunk = wan.decode(chunk)  # (1, 3, F, H, W)
            seconds += time.perf_counter() - t
        fps = self.models[job.request["model"]].fps or self.fps
        frames = to_uint8(chunk[0].float())  # (l, H, W, 3)
        job.chunks_sent += 1
        job.send(encode_chunk(frames, job.chunks_sent, job.revision, seconds * 1000), is_chunk=True)
        now, l = time.monotonic(), frames.shape[0]
        behind = job.t0 is None or (now - job.t0) * fps > job.frames_sent + self.lead_chunks * l
        if behind:  # first chunk, or the viewer ran dry: its clock restarts at this chunk
            job.t0 = now - job.frames_sent / fps
        job.frames_sent += l
        job.due = job.t0 + (job.frames_sent - self.lead_chunks * l) / fps

    def _source(self, job: Job, served: ServedModel):
        """The next l frames of the uploaded clip (1, C, l, H, W) in [-1, 1], looping; None without one."""
        source, wan = job.source, job.wan  # stop() may drop them meanwhile
        if source is None:
            return None
        l, F = served.model.config.chunk_frames, source.shape[0]
        n = l if wan is None else served.pipeline.pixel_frames(l) if wan.encoder.calls == 0 else 4 * l
        idx = [(job.source_pos + i) % F for i in range(n)]
        job.source_pos = (job.source_pos + n) % F
        x = source[idx].permute(3, 0, 1, 2).float().div(127.5).sub(1)  # (C, n, H, W)
        if wan is not None:  # pixels -> this stream's l latent frames (groups of 1, 4, 4, ...)
            return wan.encode(x[None])
        return x[None].to(served.model.device, served.model.dtype)

    def _step(self, name: str, jobs: list[Job]) -> None:
        """One chunk for each job of one model: its prompt switch, its source, then one ``next_chunks``
        call (batched where compatible). A job whose switch or source fails is stopped alone."""
        served, batch = self.models[name], []
        for j in jobs:
            try:
                self._switch(j)
                batch.append((j, self._source(j, served)))
            except Exception as e:
                self._fail(j, e)
        self._forward(batch)

    def _forward(self, batch: list) -> None:
        """[(job, source)] -> one ``next_chunks`` call, chunks delivered. When a batched call fails,
        each job is run alone, so only the stream that fails alone is stopped."""
        if not batch:
            return
        jobs = [j for j, _ in batch]
        sources = [s for _, s in batch]
        strengths = [j.request["strength"] for j in jobs]
        if all(s is None for s in sources):
            sources = strengths = None
        t = time.perf_counter()
        try:
            chunks = next_chunks([j.session for j in jobs], sources, strengths)
        except Exception as e:
            if len(batch) == 1:
                self._fail(jobs[0], e)
            else:
                for item in batch:
                    self._forward([item])
            return
        seconds = time.perf_counter() - t
        self.chunks += len(jobs)
        for j, c in zip(jobs, chunks):
            if j.active:
                try:
                    self._deliver(j, c, seconds)
                except Exception as e:
                    self._fail(j, e)

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
        """One round: build new sessions, then one chunk for every due job (or sleep)."""
        jobs = self.jobs  # a snapshot: joins and leaves take effect between rounds
        for j in jobs:
            try:
                self._prepare(j)
            except Exception as e:
                self._fail(j, e)
        now = time.monotonic()
        live = [j for j in jobs if j.active and j.session is not None and not self._waiting_for_viewer(j)]
        ready = [j for j in live if j.due <= now]
        if not ready:  # sleep until one is due; a command or a held viewer's progress wakes us
            with self._cv:
                if not self._wake and not self._closed:
                    self._cv.wait(timeout=max(0.0, min((j.due for j in live), default=now + 1.0) - now))
                self._wake = False
            return
        groups = collections.defaultdict(list)
        for j in ready:
            groups[j.request["model"]].append(j)
        for name, group in groups.items():
            try:
                self._step(name, group)
            except Exception as e:  # not one stream's fault that _step could tell: all of them stop
                for j in group:
                    self._fail(j, RuntimeError(f"a step of {len(group)} streams failed: {one_line(e)}"))

    def status(self) -> dict:
        jobs = self.jobs
        return {"sessions": len(jobs), "max_sessions": self.max_sessions, "fps": self.fps, "chunks": self.chunks,
                "waiting_for_viewer": sum(self._waiting_for_viewer(j) for j in jobs),
                "prompt_switches": dict(self.switches)}

