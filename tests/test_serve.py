"""``ca2vdm serve``: the WebSocket protocol against a real uvicorn on an ephemeral loopback port.

A tiny text-conditioned checkpoint (64x64 frames in 16 patches of 16x16, so chunks are big enough
to fill a stalled socket's buffers, yet each costs milliseconds) and a fake text encoder (a prompt's
hash seeds its token states) keep every stream fast; the server paces streams at 40 frames/s.
"""

import base64
import hashlib
import json
import os
import socket
import struct
import time
import urllib.request

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from websockets.sync.client import connect  # noqa: E402

from ca2vdm.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from ca2vdm.conditioning import Text  # noqa: E402
from ca2vdm.serve import protocol  # noqa: E402
from ca2vdm.serve.app import create_app, run_in_thread  # noqa: E402
from ca2vdm.stream import StreamSession  # noqa: E402
from ca2vdm.video import VideoWriter, read_video, to_uint8  # noqa: E402

from conftest import tiny_model  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),  # the references: tiny tensors, busy cores
              # recent websockets wants its sync client in a `with` block; these clients are closed by the tests
              pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")]

FPS, MAX_SESSIONS, TEXT_DIM = 40.0, 2, 16
START = {"type": "start", "prompt": "a 3 moving down", "steps": 2, "guidance": 2.0, "seed": 5}


def encode(prompts):
    """A stand-in for MiniLM: (1, 4, 16) token states seeded by the prompt's hash."""
    seed = int(hashlib.sha256(prompts[0].encode()).hexdigest()[:8], 16)
    return Text(torch.randn(1, 4, TEXT_DIM, generator=torch.Generator().manual_seed(seed)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "tiny"
    save_checkpoint(path, tiny_model(dtype=torch.float32, prefix_frames=0, conditioning="text", text_dim=TEXT_DIM,
                                     frame_size=64, patch=16, max_context_frames=6))
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    app = create_app({"tiny": checkpoint}, max_sessions=MAX_SESSIONS, fps=FPS, encode_text=encode, threads=1)
    srv, url = run_in_thread(app)
    yield url
    srv.should_exit = True
    srv.thread.join(timeout=10)


@pytest.fixture(autouse=True)
def _sessions_back_to_zero(request):
    yield
    if "server" in request.fixturenames:  # every test leaves no session behind
        url = request.getfixturevalue("server")
        assert _wait(lambda: status(url)["sessions"] == 0, 3), "a session outlived its client"


def status(url):
    with urllib.request.urlopen(url + "/api/status", timeout=10) as r:
        return json.loads(r.read())


def _wait(cond, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


class Client:
    """A viewer: JSON commands and uploads out; replies and decoded chunks in."""

    def __init__(self, url):
        self.ws = connect(url.replace("http", "ws", 1) + "/ws", open_timeout=10, max_size=None)

    def send(self, message):
        self.ws.send(json.dumps(message) if isinstance(message, dict) else message)

    def next(self, timeout=10):
        m = self.ws.recv(timeout=timeout)
        return {"type": "chunk", **protocol.decode_chunk(m)} if isinstance(m, bytes) else json.loads(m)

    def json(self, kind, timeout=10):
        """The next JSON message (chunks in between are skipped); it must be of this kind."""
        end = time.monotonic() + timeout
        while True:
            m = self.next(max(0.01, end - time.monotonic()))
            if m["type"] != "chunk":
                assert m["type"] == kind, f"expected a {kind!r} message, got {m}"
                return m

    def chunks(self, n, timeout=10):
        out, end = [], time.monotonic() + timeout
        while len(out) < n:
            m = self.next(max(0.01, end - time.monotonic()))
            if m["type"] == "chunk":
                out.append(m)
            else:
                assert m["type"] != "error", m
        return out

    def start(self, **overrides):
        self.send({**START, **overrides})
        return self.json("started")

    def close(self):
        self.ws.close()


def reference(checkpoint, prompt, chunks, steps=2, guidance=2.0, seed=5):
    """What one StreamSession alone makes: chunks as (l, H, W, 3) uint8."""
    s = StreamSession(load_checkpoint(checkpoint), prompt=encode([prompt]), steps=steps, guidance=guidance, seed=seed)
    with torch.no_grad():
        return [to_uint8(s.next_chunk()[0]) for _ in range(chunks)]


def _close(a, b):
    return np.abs(a.astype(int) - b.astype(int)).max() <= 1  # uint8 rounding across thread counts


# ---------------------------------------------------------------------------------------------
def test_a_stream_sends_the_sessions_chunks_in_order(server, checkpoint):
    c = Client(server)
    started = c.start()
    assert started["frame_size"] == [64, 64] and started["chunk_frames"] == 2 and started["fps"] == FPS
    assert started["steps"] == 2 and started["guidance"] == 2.0
    got = c.chunks(5)
    c.close()
    assert [g["chunk"] for g in got] == [1, 2, 3, 4, 5]
    want = reference(checkpoint, START["prompt"], 5)
    for g, w in zip(got, want):
        assert g["frames"].shape == (2, 64, 64, 3) and g["revision"] == 0
        assert _close(g["frames"], w), "the streamed chunk is not the session's chunk"
    assert not _close(got[0]["frames"], got[1]["frames"])


def test_concurrent_streams_are_batched_and_each_is_its_own(server, checkpoint, monkeypatch):
    from ca2vdm.serve import scheduler

    calls = []

    def recording(sessions, sources=None, strengths=None):
        calls.append(len(sessions))
        time.sleep(1.5 * 2 / FPS)  # slower than the pace (2-frame chunks): from b's start both are always due
        return scheduler.stream_next_chunks(sessions, sources, strengths)

    monkeypatch.setattr(scheduler, "stream_next_chunks", scheduler.next_chunks, raising=False)
    monkeypatch.setattr(scheduler, "next_chunks", recording)
    a, b = Client(server), Client(server)
    a.start()
    b.start(prompt="a 9 moving up", seed=11, guidance=3.0)
    got_a, got_b = [], []
    for _ in range(6):  # both viewers keep reading, so neither stream is held back for a slow reader
        got_a += a.chunks(1)
        got_b += b.chunks(1)
    a.close()
    b.close()
    assert 2 in calls, f"the two streams never ran as one next_chunks call: {calls}"
    for got, want in ((got_a, reference(checkpoint, START["prompt"], 6)),
                      (got_b, reference(checkpoint, "a 9 moving up", 6, guidance=3.0, seed=11))):
        assert all(_close(g["frames"], w) for g, w in zip(got, want))


def test_paced_at_fps_and_page_served(server):
    with urllib.request.urlopen(server + "/", timeout=10) as r:
        assert b"<canvas" in r.read()
    with urllib.request.urlopen(server + "/static/app.js", timeout=10) as r:
        assert b"new WebSocket" in r.read()
    with urllib.request.urlopen(server + "/api/models", timeout=10) as r:
        info = json.loads(r.read())
    assert info["models"][0]["name"] == "tiny" and info["fps"] == FPS
    c = Client(server)
    c.start()
    c.chunks(3)  # past the lead
    t = time.monotonic()
    c.chunks(20)  # 40 frames: 1 s at 40 frames/s, neither much faster (unpaced) nor much slower
    dt = time.monotonic() - t
    c.close()
    assert 0.7 < dt < 2.5, f"40 frames took {dt:.2f} s at {FPS} frames/s"


def test_set_prompt_switches_between_chunks(server, checkpoint):
    c = Client(server)
    c.start()
    got = c.chunks(3)
    c.send({"type": "set_prompt", "prompt": "a 7 moving left"})
    got += c.chunks(1)  # chunks already queued may arrive before the reply
    got += c.chunks(12)
    c.send({"type": "stop"})
    c.close()
    revisions = [g["revision"] for g in got]
    assert revisions == sorted(revisions) and set(revisions) == {0, 1}, revisions
    want = reference(checkpoint, START["prompt"], len(got))
    for g, w in zip(got, want):
        same = _close(g["frames"], w)
        assert same if g["revision"] == 0 else not same, f"chunk {g['chunk']} (revision {g['revision']})"


def test_stop_frees_the_session_at_once(server):
    c = Client(server)
    c.start()
    c.chunks(1)
    assert status(server)["sessions"] == 1
    c.send({"type": "stop"})
    c.json("stopped")
    assert status(server)["sessions"] == 0
    c.start()  # the socket can start again
    assert c.chunks(1)[0]["chunk"] == 1
    c.send({"type": "stop"})
    c.json("stopped")
    c.close()


def test_client_beyond_max_sessions_is_told_busy(server):
    a, b, c = Client(server), Client(server), Client(server)
    a.start()
    b.start()
    c.send(START)
    assert "busy" in c.json("error")["message"]
    assert status(server)["sessions"] == MAX_SESSIONS
    b.chunks(2)  # the others are unaffected
    a.send({"type": "stop"})
    a.json("stopped")
    c.start()  # a slot is free again
    c.chunks(1)
    for x in (a, b, c):
        x.close()


def test_disconnect_frees_the_session_at_once(server):
    c = Client(server)
    c.start()
    c.chunks(1)
    assert status(server)["sessions"] == 1
    c.close()
    assert _wait(lambda: status(server)["sessions"] == 0, 0.5)


def _stalled_viewer(url, message):
    """A viewer that starts a stream and never reads: a raw socket with a 4 KiB receive buffer."""
    host, port = url.split("//")[1].split(":")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    reply = b""
    while not reply.endswith(b"\r\n\r\n"):
        reply += s.recv(1)
    assert b" 101 " in reply.split(b"\r\n")[0]
    payload, mask = json.dumps(message).encode(), os.urandom(4)
    assert len(payload) < 126
    s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(x ^ mask[i % 4] for i, x in enumerate(payload)))
    return s


def test_a_viewer_that_stops_reading_does_not_stall_another(server):
    stalled = _stalled_viewer(server, START)
    c = Client(server)
    c.start()
    c.chunks(3)
    t, times = time.monotonic(), []
    while time.monotonic() - t < 3.0:
        c.chunks(1)
        times.append(time.monotonic())
    frames = 2 * sum(1 for x in times if x - t > 1.0)  # the last 2 s, once the stalled socket is full
    gap = max(np.diff(times))
    s = status(server)
    assert s["sessions"] == 2
    assert s["dropped"] > 0, "the stalled viewer's socket never filled: the test proves nothing"
    assert frames >= 0.7 * FPS * 2 and gap < 0.5, f"{frames} frames in 2 s, longest gap {gap:.2f} s"
    stalled.close()
    c.close()


# ---------------------------------------------------------------------------------------------
# Malformed input: an error on that socket, the server keeps serving everyone else
BAD = {
    "prompt too long": ({**START, "prompt": "x" * 201}, "at most 200"),
    "prompt empty": ({**START, "prompt": "   "}, "non-empty"),
    "steps 0": ({**START, "steps": 0}, "steps must be in [1, 50]"),
    "steps 51": ({**START, "steps": 51}, "steps must be in [1, 50]"),
    "steps 2.5": ({**START, "steps": 2.5}, "steps must be an integer"),
    "guidance 0.5": ({**START, "guidance": 0.5}, "guidance must be in [1, 20]"),
    "guidance 21": ({**START, "guidance": 21}, "guidance must be in [1, 20]"),
    "guidance text": ({**START, "guidance": "4"}, "guidance must be a number"),
    "strength 0": ({**START, "strength": 0}, "strength must be in (0, 1]"),
    "strength 1.5": ({**START, "strength": 1.5}, "strength must be in (0, 1]"),
    "non-JSON": ("{this is not json", "not valid JSON"),
    "JSON not an object": ("[1, 2]", "JSON object"),
    "unknown type": ({"type": "dance"}, "unknown message type"),
    "unknown model": ({**START, "model": "nope"}, "unknown model"),
    "oversized message": ({**START, "padding": "x" * 5000}, "larger than 4096 bytes"),
    "set_prompt before start": ({"type": "set_prompt", "prompt": "a 1"}, "no stream is playing"),
    "strength without upload": ({**START, "strength": 0.5}, "needs an uploaded clip"),
    "upload not a video": (b"this is not a video file" * 100, "cannot read the upload as a video"),
    "upload too large": (b"\0" * (protocol.MAX_UPLOAD_BYTES + 1), "at most 8 MiB"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_malformed_input_gets_an_error_and_others_keep_streaming(server, kind):
    message, expected = BAD[kind]
    viewer, offender = Client(server), Client(server)
    viewer.start()
    viewer.chunks(1)
    offender.send(message)
    reply = offender.json("error")
    assert expected in reply["message"], reply
    assert "\n" not in reply["message"]
    assert status(server)["sessions"] == 1  # the bad message started nothing
    before = viewer.chunks(1)[0]["chunk"]
    assert [c["chunk"] for c in viewer.chunks(2)] == [before + 1, before + 2]
    offender.send({"type": "stop"})  # the offender's socket still works
    offender.json("stopped")
    viewer.close()
    offender.close()


def test_upload_then_video_to_video(server, checkpoint, tmp_path):
    clip = tmp_path / "clip.mp4"
    with VideoWriter(clip, fps=8) as w:
        w.write(torch.linspace(-1, 1, 6 * 3 * 32 * 32).reshape(3, 6, 32, 32))
    c = Client(server)
    c.send(clip.read_bytes())
    assert c.json("uploaded")["frames"] == 6
    assert c.start(strength=0.5)["video_to_video"] is True
    got = c.chunks(4)  # 8 frames: the 6-frame clip loops
    c.close()
    source = read_video(clip, size=(64, 64))  # (C, 6, 64, 64)
    s = StreamSession(load_checkpoint(checkpoint), prompt=encode([START["prompt"]]), steps=2, guidance=2.0, seed=5)
    plain = reference(checkpoint, START["prompt"], 4)
    for k, g in enumerate(got):
        idx = [(2 * k + i) % 6 for i in range(2)]
        with torch.no_grad():
            want = to_uint8(s.next_chunk(source=source[:, idx][None], strength=0.5)[0])
        assert _close(g["frames"], want), f"chunk {k + 1} is not the session's video-to-video chunk"
        assert not _close(g["frames"], plain[k]), "the source changed nothing"


def test_protocol_limits_without_a_server():
    ok = protocol.parse_message(json.dumps({**START, "strength": 1}), ["tiny"])
    assert ok == {"type": "start", "prompt": START["prompt"], "guidance": 2.0, "model": "tiny", "steps": 2,
                  "seed": 5, "strength": 1.0}
    with pytest.raises(protocol.ProtocolError, match="must be an integer"):
        protocol.parse_message(json.dumps({**START, "steps": True}), ["tiny"])
    with pytest.raises(protocol.ProtocolError, match="must be in"):
        protocol.parse_message(json.dumps({**START, "guidance": float("nan")}), ["tiny"])
    frames = np.arange(2 * 3 * 5 * 3, dtype=np.uint8).reshape(2, 3, 5, 3)
    data = protocol.encode_chunk(frames, 7, 2, 12.4)
    assert len(data) == 16 + frames.size and struct.unpack_from("<IHH", data) == (2, 3, 5)
    back = protocol.decode_chunk(data)
    assert np.array_equal(back["frames"], frames) and (back["chunk"], back["revision"], back["compute_ms"]) == (7, 2, 12)


def test_cli_serve_dispatches_its_options(monkeypatch):
    from ca2vdm import cli
    from ca2vdm.serve import app

    seen = {}
    monkeypatch.setattr(app, "serve", lambda **kw: seen.update(kw))
    cli.main(["serve", "--model", "a=/x", "--model", "b=/y", "--max-sessions", "3", "--fps", "12", "--threads", "2"])
    assert seen == {"host": "127.0.0.1", "port": 8000, "models": {"a": "/x", "b": "/y"}, "max_sessions": 3,
                    "fps": 12.0, "threads": 2}
    cli.main(["serve"])
    assert seen["models"] is None and seen["max_sessions"] == 4 and seen["fps"] is None  # the shipped models, 8 fps
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--model", "no-equals-sign"])


def test_models_that_need_given_frames_are_refused(tmp_path):
    save_checkpoint(tmp_path / "p1", tiny_model(dtype=torch.float32, prefix_frames=1, conditioning="text",
                                                text_dim=TEXT_DIM))
    with pytest.raises(ValueError, match="prefix_frames=0"):
        create_app({"p1": tmp_path / "p1"})
