"""The web app: a page, a small JSON API and one WebSocket per viewer, over one ``Scheduler``.

    GET  /                 the page (ca2vdm/assets/static/index.html)
    GET  /static/<file>    its script and style sheet
    GET  /api/models       [{"name", "steps", "levels", "guidance", "frame_size", "chunk_frames"}, ...]
    GET  /api/status       {"sessions", "max_sessions", "clients", "fps", "chunks", "dropped", "rss_mb"}
    WS   /ws               the stream protocol (``protocol.py``: JSON commands and uploads in,
                           one binary message per chunk out)

The event loop never runs the model: it validates messages, decodes uploads (in a thread),
registers streams with the scheduler and sends what lands in each viewer's outbox. The page plays
the chunks on a canvas at ``fps`` frames per second (default 8, the digits clips' rate), the same
rate the scheduler paces every stream to.

    app = create_app({"digits": "ca2vdm/assets/digits"}, max_sessions=4)
    serve(host="127.0.0.1", port=8000)      # what `ca2vdm serve` runs
"""

import asyncio
import contextlib
import os
import tempfile
import threading
import time

from ..assets import asset_path
from ..checkpoint import load_checkpoint, sampling_for
from ..video import read_video
from . import protocol
from .protocol import ProtocolError
from .scheduler import Job, Outbox, Scheduler, ServedModel, one_line

DEFAULT_FPS = 8.0
SHIPPED = ("digits", "digits-fast")  # the many-step model and its few-step student
MAX_SOURCE_FRAMES = 256             # an uploaded clip is cut to this many frames (it loops)
SEND_BUFFER = 256 * 1024            # SO_SNDBUF of every connection (see listening_socket)


def load_models(models: dict | None = None, device: str = "cpu") -> dict[str, ServedModel]:
    """name -> checkpoint directory (default: the shipped models) -> name -> ``ServedModel``.
    Served models start from a prompt alone: text-conditioned, ``prefix_frames`` = 0."""
    if models is None:
        models = {name: asset_path(name) for name in SHIPPED}
    if not models:
        raise ValueError("serve needs at least one model")
    out = {}
    for name, path in models.items():
        model = load_checkpoint(path, device=device)
        cfg = model.config
        if cfg.conditioning != "text" or cfg.prefix_frames:
            raise ValueError(f"model {name!r} ({path}) cannot be served: serving streams from a prompt alone, "
                             f"which needs conditioning='text' and prefix_frames=0 (it has "
                             f"{cfg.conditioning!r}, {cfg.prefix_frames})")
        s = sampling_for(path)
        out[name] = ServedModel(name, model, s["steps"], s["levels"], s["guidance"])
    return out


def decode_upload(data: bytes, sizes) -> dict:
    """An uploaded video file -> {(H, W): (C, F, H, W) in [-1, 1]} for each model frame size;
    ProtocolError (one line) when it is too large or PyAV cannot read it."""
    protocol.check_upload(data)
    fd, path = tempfile.mkstemp(prefix="ca2vdm-upload-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return {size: read_video(path, size=size, max_frames=MAX_SOURCE_FRAMES) for size in sizes}
    except Exception as e:
        raise ProtocolError(f"cannot read the upload as a video: {one_line(e)}") from None
    finally:
        os.unlink(path)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 20


def create_app(models: dict | None = None, max_sessions: int = 4, fps: float | None = None,
               encode_text=None, threads: int | None = None, device: str = "cpu", queue_chunks: int = 4,
               lead_chunks: int = 2):
    """The FastAPI app. models: name -> checkpoint directory (default: ``SHIPPED``); fps: playback and
    pacing rate (default 8); encode_text: list of prompts -> ``Text`` (default: MiniLM); threads: torch
    threads of the worker; queue_chunks: chunks a viewer's outbox holds before dropping the oldest;
    lead_chunks: how far a stream is generated ahead of its viewer's playback clock."""
    from fastapi import FastAPI, WebSocket
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    served = load_models(models, device)
    fps = DEFAULT_FPS if fps is None else float(fps)
    scheduler = Scheduler(served, encode_text, max_sessions, fps, lead_chunks, threads)
    sizes = sorted({tuple(m.model.config.frame_size) for m in served.values()})
    static = asset_path("static")
    outboxes = set()            # the connected viewers' outboxes
    dropped = {"closed": 0}     # chunks dropped for viewers already gone

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.run_in_thread()
        yield
        scheduler.close()

    app = FastAPI(title="ca2vdm serve", lifespan=lifespan)
    app.state.scheduler = scheduler
    app.mount("/static", StaticFiles(directory=static), name="static")

    @app.get("/")
    def page():
        return FileResponse(static / "index.html")

    @app.get("/api/models")
    def list_models():
        return {"models": [m.describe() for m in served.values()], "default": next(iter(served)), "fps": fps,
                "limits": {"prompt_chars": protocol.MAX_PROMPT_CHARS, "steps": protocol.STEPS,
                           "guidance": protocol.GUIDANCE, "upload_bytes": protocol.MAX_UPLOAD_BYTES}}

    @app.get("/api/status")
    def status():
        return {**scheduler.status(), "clients": len(outboxes),
                "dropped": dropped["closed"] + sum(o.dropped for o in outboxes), "rss_mb": _rss_mb()}

    def command(msg: dict, state: dict, outbox: Outbox, loop) -> None:
        job = state["job"] if state["job"] is not None and state["job"].active else None
        if msg["type"] == "stop":
            scheduler.stop(job)
            state["job"] = None
            outbox.put({"type": "stopped"})
        elif msg["type"] == "set_prompt":
            if job is None:
                raise ProtocolError("no stream is playing on this socket; send start first")
            revision = scheduler.set_prompt(job, msg["prompt"], msg["guidance"])
            outbox.put({"type": "prompt", "revision": revision, "prompt": msg["prompt"]})
        else:  # start
            if job is not None:
                raise ProtocolError("a stream is already playing on this socket; stop it first")
            m = served[msg["model"]]
            source = None
            if msg["strength"] is not None:
                if state["clip"] is None:
                    raise ProtocolError("video-to-video (strength) needs an uploaded clip: send the file first")
                source = state["clip"][tuple(m.model.config.frame_size)]
            state["job"] = scheduler.start(Job(msg, loop, outbox, source=source))
            cfg = m.model.config
            outbox.put({"type": "started", "model": m.name, **m.sampling(msg["steps"], msg["guidance"]),
                        "frame_size": list(cfg.frame_size), "chunk_frames": cfg.chunk_frames, "fps": fps,
                        "video_to_video": source is not None})

    async def send_loop(socket, outbox: Outbox):
        while True:
            payload = await outbox.get()
            if isinstance(payload, bytes):
                await socket.send_bytes(payload)
            else:
                await socket.send_json(payload)

    @app.websocket("/ws")
    async def stream(socket: WebSocket):
        await socket.accept()
        loop, outbox = asyncio.get_running_loop(), Outbox(queue_chunks)
        state = {"job": None, "clip": None}
        sender = asyncio.create_task(send_loop(socket, outbox))
        outboxes.add(outbox)
        try:
            while True:
                message = await socket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                try:
                    if message.get("bytes") is not None:
                        state["clip"] = await asyncio.to_thread(decode_upload, message["bytes"], sizes)
                        frames = next(iter(state["clip"].values())).shape[1]
                        outbox.put({"type": "uploaded", "frames": frames, "bytes": len(message["bytes"])})
                    else:
                        command(protocol.parse_message(message.get("text") or "", served), state, outbox, loop)
                except ProtocolError as e:
                    outbox.put(protocol.error(e))
        except Exception:  # a broken connection: fall through and free the session
            pass
        finally:
            scheduler.stop(state["job"])  # the slot is free at once
            outboxes.discard(outbox)
            dropped["closed"] += outbox.dropped
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender

    return app


def listening_socket(host: str = "127.0.0.1", port: int = 8000, send_buffer: int = SEND_BUFFER):
    """The server's socket. Its ``send_buffer`` (SO_SNDBUF, inherited by every connection) bounds
    what the kernel holds for a viewer that stops reading (autotuning would grow it to megabytes);
    past it the viewer's outbox drops chunks. 256 KiB is ~10 s of 32x32 video at 8 frames/s."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind((host, port))
    return sock


def make_server(app, log_level: str = "warning"):
    """A ``uvicorn.Server`` for the app; WebSocket messages up to twice the upload limit reach the
    protocol (which answers an oversized upload with an error rather than a closed socket)."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, ws_max_size=2 * protocol.MAX_UPLOAD_BYTES, lifespan="on")
    return uvicorn.Server(config)


def run_in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0):
    """Start the app on a background thread (tests, the load script); port 0: an ephemeral one.
    Returns (server, url); stop with ``server.should_exit = True`` and ``server.thread.join()``."""
    sock = listening_socket(host, port)
    server = make_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    t = time.monotonic()
    while not server.started:
        if not thread.is_alive() or time.monotonic() - t > timeout:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    server.thread = thread
    return server, f"http://{host}:{sock.getsockname()[1]}"


def serve(host: str = "127.0.0.1", port: int = 8000, models: dict | None = None, max_sessions: int = 4,
          fps: float | None = None, threads: int | None = None, log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted (``ca2vdm serve``). Binds loopback by default."""
    app = create_app(models, max_sessions=max_sessions, fps=fps, threads=threads)
    sock = listening_socket(host, port)
    print(f"ca2vdm serve: http://{host}:{port}/  ({len(app.state.scheduler.models)} models, "
          f"at most {max_sessions} streams, {app.state.scheduler.fps:g} frames/s)", flush=True)
    make_server(app, log_level).run(sockets=[sock])
