"""The web app: a page, a small JSON API and one WebSocket per viewer, over one ``Scheduler``.

    GET  /                 the page (ca2vdm/assets/static/index.html)
    GET  /static/<file>    its script and style sheet
    GET  /api/models       [{"name", "steps", "levels", "guidance", "frame_size", "chunk_frames"}, ...]
    GET  /api/status       {"sessions", "max_sessions", "clients", "fps", "chunks", "dropped", "waiting_for_viewer",
                            "prompt_switches", "clip_bytes", "rss_mb", "rss_peak_mb"}
    WS   /ws               the stream protocol (``protocol.py``: JSON commands and uploads in,
                           one binary message per chunk out)

The event loop never runs the model: it validates messages, decodes uploads (in a thread, at most
``upload_workers`` at once), registers streams with the scheduler and sends what lands in each
viewer's outbox. The page plays the chunks on a canvas at ``fps`` frames per second (default 8, the
digits clips' rate), the same rate the scheduler paces every stream to.

What one client can take is bounded: a handshake from a foreign browser page (``Origin``), without
the server's token, or beyond ``max_connections_per_client`` sockets of one address is refused
(HTTP 403); a socket has at most one stream and a client ``max_streams_per_client``; a socket's
messages are rate-limited (``protocol.RateLimit``) and at most ``MAX_UPLOAD_BYTES`` each (the
WebSocket layer closes it with 1009 beyond that); a socket that sends nothing for ``idle_timeout``
seconds while it has no stream is closed. An uploaded clip is kept as uint8 at the models' frame
sizes until the socket closes or the next upload replaces it.

    app = create_app({"digits": "ca2vdm/assets/digits"}, max_sessions=4)
    serve(host="127.0.0.1", port=8000)      # what `ca2vdm serve` runs
"""

import asyncio
import collections
import contextlib
import logging
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import torch

from ..assets import asset_path
from ..checkpoint import load_checkpoint, sampling_for
from . import protocol
from .protocol import ProtocolError, one_line
from .scheduler import Job, Outbox, Scheduler, ServedModel
from .upload import read_upload

log = logging.getLogger(__name__)

DEFAULT_FPS = 8.0
SHIPPED = ("digits", "digits-fast")  # the many-step model and its few-step student
SEND_BUFFER = 256 * 1024            # SO_SNDBUF of every connection (see listening_socket)
IDLE_TIMEOUT = 60.0                 # seconds a socket without a stream may stay silent
MAX_CONNECTIONS_PER_CLIENT = 8      # sockets of one address at once (a browser tab holds one)
MAX_STREAMS_PER_CLIENT = 2          # streams of one address at once
UPLOAD_WORKERS = 2                  # uploads decoded at once (the others wait)


def load_models(models: dict | None = None, device: str = "cpu") -> dict[str, ServedModel]:
    """name -> checkpoint directory, or a Wan pipeline folder as ``DIR`` or ``DIR:WEIGHTS`` (a causal
    checkpoint; ``pipeline.load_pipeline``) (default: the shipped models) -> name -> ``ServedModel``.
    Served models start from a prompt alone: text-conditioned, ``prefix_frames`` = 0."""
    from ..pipeline import is_pipeline_folder, load_pipeline

    if models is None:
        models = {name: asset_path(name) for name in SHIPPED}
    if not models:
        raise ValueError("serve needs at least one model")
    out = {}
    for name, path in models.items():
        folder, _, weights = str(path).partition(":") if not Path(path).exists() else (str(path), "", "")
        if is_pipeline_folder(folder):
            pipe = load_pipeline(folder, weights or None, device=device, verbose=True)
            s = pipe.sampling
            out[name] = ServedModel(name, pipe.model, s["steps"] or len(s["levels"]), s["levels"], s["guidance"],
                                    pipeline=pipe, fps=pipe.fps)
            continue
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
    """An uploaded video or image file -> {(H, W): (F, H, W, 3) uint8 tensor} for each model frame
    size (``upload.read_upload``: bounded before decoding); ProtocolError (one line) when refused."""
    return {size: torch.from_numpy(x) for size, x in read_upload(data, sizes).items()}


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 20


def _rss_peak_mb() -> float | None:
    """The process's largest RSS so far (getrusage; None where it is not there)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10  # bytes on macOS, KiB on Linux


def create_app(models: dict | None = None, max_sessions: int = 4, fps: float | None = None,
               encode_text=None, threads: int | None = None, device: str = "cpu", queue_chunks: int = 4,
               lead_chunks: int = 2, token: str | None = None, allow_origins=(),
               idle_timeout: float = IDLE_TIMEOUT, max_connections_per_client: int = MAX_CONNECTIONS_PER_CLIENT,
               max_streams_per_client: int = MAX_STREAMS_PER_CLIENT,
               messages_per_second: float = protocol.MESSAGES_PER_SECOND, message_burst: int = protocol.MESSAGE_BURST,
               upload_workers: int = UPLOAD_WORKERS):
    """The FastAPI app. models: name -> checkpoint directory (default: ``SHIPPED``); fps: playback and
    pacing rate (default 8); encode_text: list of prompts -> ``Text`` (default: MiniLM); threads: torch
    threads of the worker; queue_chunks: chunks a viewer's outbox holds before dropping the oldest;
    lead_chunks: how far a stream is generated ahead of its viewer's playback clock (and how many of
    its chunks may wait to be written to its socket). token: required as ``/ws?token=`` (None: no
    token); allow_origins: browser origins accepted besides the page's own; idle_timeout: seconds a
    socket without a stream may send nothing; max_connections_per_client / max_streams_per_client:
    per client address; messages_per_second / message_burst: each socket's ``RateLimit``;
    upload_workers: uploads decoded at once."""
    from fastapi import FastAPI, WebSocket
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    served = load_models(models, device)
    fps = DEFAULT_FPS if fps is None else float(fps)
    scheduler = Scheduler(served, encode_text, max_sessions, fps, lead_chunks, threads, max_streams_per_client)
    sizes = sorted({m.frame_size for m in served.values()})
    static = asset_path("static")
    connections = {}                      # outbox -> that socket's state, for every connected viewer
    per_client = collections.Counter()    # client address -> its open sockets
    dropped = {"closed": 0}               # chunks dropped for viewers already gone
    uploads = asyncio.Semaphore(upload_workers)

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
        states = list(connections.values())
        clips = [state["clip"] for state in states if state["clip"] is not None]
        return {**scheduler.status(), "clients": len(states),
                "dropped": dropped["closed"] + sum(o.dropped for o in list(connections)),
                "clip_bytes": sum(x.nbytes for clip in clips for x in clip.values()), "rss_mb": _rss_mb(),
                "rss_peak_mb": _rss_peak_mb()}

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
                source = state["clip"][m.frame_size]
            state["job"] = scheduler.start(Job(msg, loop, outbox, source=source, client=state["client"]))
            cfg = m.model.config
            outbox.put({"type": "started", "model": m.name, **m.sampling(msg["steps"], msg["guidance"]),
                        "frame_size": list(m.frame_size), "chunk_frames": cfg.chunk_frames, "fps": m.fps or fps,
                        "video_to_video": source is not None})

    async def send_loop(socket, outbox: Outbox):
        """Write the outbox to the socket: chunks (bytes), JSON (dicts), and last a close (code, reason)."""
        while True:
            payload = await outbox.get()
            if isinstance(payload, bytes):
                await socket.send_bytes(payload)
                outbox.written += 1
                scheduler.wake()  # a stream held for this viewer may go on
            elif isinstance(payload, tuple):
                await socket.close(*payload)
                return
            else:
                await socket.send_json(payload)

    def refuse(socket: WebSocket, client: str) -> str | None:
        """Why this handshake is refused (``protocol.refuse_handshake``, then the per-client limit)."""
        reason = protocol.refuse_handshake(socket.headers.get("origin"), socket.headers.get("host"),
                                           socket.query_params.get("token"), token, allow_origins)
        if reason is None and per_client[client] >= max_connections_per_client:
            reason = f"{client} already has {max_connections_per_client} connections"
        return reason

    async def receive(socket: WebSocket, state: dict):
        """The next message; None when the socket has sent nothing for ``idle_timeout`` seconds while
        it has no stream (a stream that plays keeps its socket)."""
        quiet_since = time.monotonic()
        while True:
            left = quiet_since + idle_timeout - time.monotonic()
            try:
                return await asyncio.wait_for(socket.receive(), timeout=max(0.0, left))
            except asyncio.TimeoutError:
                if state["job"] is not None and state["job"].active:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since >= idle_timeout:
                    return None

    async def handle(message: dict, state: dict, outbox: Outbox, loop) -> None:
        """One text command or upload; every refusal is an error message on this socket."""
        try:
            if message.get("bytes") is not None:
                async with uploads:
                    state["clip"] = await asyncio.to_thread(decode_upload, message["bytes"], sizes)
                frames = next(iter(state["clip"].values())).shape[0]
                outbox.put({"type": "uploaded", "frames": frames, "bytes": len(message["bytes"])})
            else:
                command(protocol.parse_message(message.get("text") or "", served), state, outbox, loop)
        except ProtocolError as e:
            outbox.put(protocol.error(e))
        except Exception as e:  # a bug, not the client's fault: still an answer, never a silent drop
            log.exception("serve: a message failed")
            outbox.put(protocol.error(f"cannot handle this message: {one_line(e)}"))

    @app.websocket("/ws")
    async def stream(socket: WebSocket):
        client = socket.client.host if socket.client else ""
        reason = refuse(socket, client)
        if reason is not None:
            log.warning("serve: refused a WebSocket from %s: %s", client, reason)
            await socket.close(code=1008, reason=reason[:120])  # before accept: HTTP 403
            return
        per_client[client] += 1  # counted before the first await, so concurrent handshakes see it
        loop, outbox = asyncio.get_running_loop(), Outbox(queue_chunks)
        state = {"job": None, "clip": None, "client": client}
        limit = protocol.RateLimit(messages_per_second, message_burst)
        connections[outbox] = state
        sender, close = None, None  # close: (code, reason) when the server ends the connection
        try:
            await socket.accept()
            sender = asyncio.create_task(send_loop(socket, outbox))
            while True:
                message = await receive(socket, state)
                if message is None:
                    close = (1000, f"idle for {idle_timeout:g} s without a stream")
                    break
                if message["type"] == "websocket.disconnect":
                    break
                if not limit.allow():
                    if limit.abusive:
                        close = (1008, "too many messages")
                        break
                    outbox.put(protocol.error(limit.message()))
                    continue
                await handle(message, state, outbox, loop)
        except Exception:  # a broken connection: fall through and free the session
            pass
        finally:
            scheduler.stop(state["job"])  # the slot is free at once
            del connections[outbox]
            per_client[client] -= 1
            if not per_client[client]:
                del per_client[client]
            dropped["closed"] += outbox.dropped
            if sender is not None:
                if close is not None:  # the replies already queued go out first, then the close
                    outbox.put(close)
                    with contextlib.suppress(BaseException):
                        await asyncio.wait_for(asyncio.shield(sender), timeout=10)
                sender.cancel()
                with contextlib.suppress(BaseException):
                    await sender

    return app


def listening_socket(host: str = "127.0.0.1", port: int = 8000, send_buffer: int = SEND_BUFFER):
    """The server's socket. Its ``send_buffer`` (SO_SNDBUF, inherited by every connection) bounds
    what the kernel holds for a viewer that stops reading (autotuning would grow it to megabytes);
    past it the viewer's stream is held back. 256 KiB is ~10 s of 32x32 video at 8 frames/s."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind((host, port))
    return sock


def make_server(app, log_level: str = "warning"):
    """A ``uvicorn.Server`` for the app. The WebSocket layer refuses a message larger than the upload
    limit from its frame header, before reading it (the socket is closed with code 1009)."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, ws_max_size=protocol.MAX_UPLOAD_BYTES, lifespan="on")
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


def check_host(host: str, token: str | None, public_without_token: bool = False) -> str | None:
    """A warning to print when ``host`` is reachable from other machines (None on loopback);
    ValueError when it is, with neither a token nor ``public_without_token``."""
    if protocol.is_loopback(host):
        return None
    if token is None and not public_without_token:
        raise ValueError(f"--host {host} is reachable from other machines: give --token SECRET (viewers open "
                         f"http://HOST:PORT/?token=SECRET), or --public-without-token to let anyone who can "
                         f"reach it generate video")
    return (f"warning: serving on {host}, reachable from other machines; "
            + ("viewers need the token" if token is not None else "anyone who can reach it can use it (no token)"))


def serve(host: str = "127.0.0.1", port: int = 8000, models: dict | None = None, max_sessions: int = 4,
          fps: float | None = None, threads: int | None = None, log_level: str = "info", token: str | None = None,
          allow_origins=(), public_without_token: bool = False, idle_timeout: float = IDLE_TIMEOUT,
          max_connections_per_client: int = MAX_CONNECTIONS_PER_CLIENT,
          max_streams_per_client: int = MAX_STREAMS_PER_CLIENT) -> None:
    """Run the app with uvicorn until interrupted (``ca2vdm serve``). Binds loopback by default;
    another host needs a token or ``public_without_token`` (``check_host``)."""
    warning = check_host(host, token, public_without_token)
    app = create_app(models, max_sessions=max_sessions, fps=fps, threads=threads, token=token,
                     allow_origins=allow_origins, idle_timeout=idle_timeout,
                     max_connections_per_client=max_connections_per_client,
                     max_streams_per_client=max_streams_per_client)
    sock = listening_socket(host, port)
    if warning:
        print(warning, flush=True)
    query = "" if token is None else "?token=" + urllib.parse.quote(token)
    print(f"ca2vdm serve: http://{host}:{port}/{query}  ({len(app.state.scheduler.models)} models, "
          f"at most {max_sessions} streams, {app.state.scheduler.fps:g} frames/s)", flush=True)
    make_server(app, log_level).run(sockets=[sock])
