"""The WebSocket protocol of ``ca2vdm serve``: what a client may send, checked before anything runs.

One socket per viewer (``/ws``). Client -> server:

* the handshake: a browser's ``Origin`` must be the page's own (the ``Host`` it asked) or one the
  server allows (``--allow-origin``); clients that send no ``Origin`` (not browsers) are let in. A
  server started with a token wants it as ``/ws?token=...``. Refused handshakes get HTTP 403.
* at most ``MESSAGES_PER_SECOND`` messages a second after a burst of ``MESSAGE_BURST`` (``RateLimit``):
  a message beyond that is answered with an error and dropped; a socket that goes on sending
  ``MESSAGE_BURST`` more while refused is closed (code 1008). A message larger than
  ``MAX_UPLOAD_BYTES`` is refused by the WebSocket layer before it is read (close code 1009).
* text messages, JSON objects of at most ``MAX_JSON_BYTES`` with a ``type``:

  ``{"type": "start", "prompt": str, "model"?: name, "steps"?: int, "guidance"?: float, "seed"?: int, "strength"?: float}``
      start this socket's stream. ``steps`` / ``guidance`` default to the model's recommendation
      (``GET /api/models``); ``strength`` in (0, 1] makes it video-to-video from the last uploaded clip.
  ``{"type": "set_prompt", "prompt": str, "guidance"?: float}``
      switch the prompt of the playing stream (applied between two chunks).
  ``{"type": "stop"}``
      stop the stream and free its session at once.

* binary messages: one video or image file (any format PyAV reads, at most ``MAX_UPLOAD_BYTES``), the
  source clip of the next ``start`` with a ``strength``; answered ``{"type": "uploaded", "frames": F}``.
  Frames larger than ``MAX_UPLOAD_PIXELS`` (read from the file's header, before decoding) and files
  longer than ``MAX_UPLOAD_SECONDS`` are refused; at most ``MAX_UPLOAD_FRAMES`` frames are kept (it loops).

Server -> client:

* text: ``{"type": "started", ...}`` (model, steps, levels, guidance, frame_size, chunk_frames, fps),
  ``{"type": "prompt", "revision": r}`` (a set_prompt was accepted), ``{"type": "stopped"}``,
  ``{"type": "uploaded", "frames": F}``, ``{"type": "error", "message": str}`` (a bad message, a busy
  server, a failed stream; the socket stays open and nobody else is affected).
* binary: one message per generated chunk, ``HEADER`` (16 bytes, little-endian) then the pixels::

      offset  type  field
       0      u32   F, frames in this chunk
       4      u16   H, frame height
       6      u16   W, frame width
       8      u32   chunk index of this stream (1, 2, ...)
      12      u16   prompt revision the chunk was generated under (0 = the start prompt, +1 per set_prompt;
                    switches sent faster than chunks are made are skipped: only the latest is applied)
      14      u16   milliseconds the server spent computing the chunk (its batched forward), capped at 65535
      16      F*H*W*3 bytes: uint8 RGB, frame by frame, row by row (F, H, W, 3)
"""

import hmac
import ipaddress
import json
import math
import struct
import time
from urllib.parse import urlsplit

import numpy as np

MAX_PROMPT_CHARS = 200
MAX_JSON_BYTES = 4 * 1024
MAX_UPLOAD_BYTES = 8 * 1024 * 1024   # also the WebSocket layer's message limit
MAX_UPLOAD_PIXELS = 1280 * 720       # per frame, checked from the header before decoding
MAX_UPLOAD_FRAMES = 256              # frames kept of an upload (decoding stops there)
MAX_UPLOAD_SECONDS = 60.0            # a longer file is refused (its header's duration)
MESSAGES_PER_SECOND = 20.0           # per socket, after a burst of MESSAGE_BURST
MESSAGE_BURST = 40
STEPS = (1, 50)        # inclusive
GUIDANCE = (1.0, 20.0)  # inclusive
STRENGTH = (0.0, 1.0)   # (low, high]
TYPES = ("start", "set_prompt", "stop")

HEADER = struct.Struct("<IHHIHH")  # F, H, W, chunk, revision, compute ms: 16 bytes


class ProtocolError(ValueError):
    """A client message that breaks the protocol; its text is sent back as {"type": "error"}."""


def error(message: str) -> dict:
    """The one error message shape."""
    return {"type": "error", "message": str(message)}


def one_line(exc: Exception) -> str:
    """An exception as one line (PyAV and torch messages can span several)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _prompt(msg: dict) -> str:
    p = msg.get("prompt")
    if not isinstance(p, str) or not p.strip():
        raise ProtocolError("prompt must be a non-empty string")
    if len(p) > MAX_PROMPT_CHARS:
        raise ProtocolError(f"prompt is {len(p)} characters; at most {MAX_PROMPT_CHARS}")
    return p.strip()


def _number(msg: dict, key: str, lo: float, hi: float, integer: bool = False, open_low: bool = False):
    """msg[key] as a number in [lo, hi] ((lo, hi] with open_low); None when absent or null."""
    v = msg.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and isinstance(v, float)
                                                                 and not v.is_integer()):
        raise ProtocolError(f"{key} must be {'an integer' if integer else 'a number'}, got {_short(v)}")
    # compared as given: a JSON integer can be far beyond a float's range (10**400)
    if (isinstance(v, float) and not math.isfinite(v)) or v > hi or v < lo or (open_low and v == lo):
        lo_, hi_ = (f"{lo}", f"{hi}") if integer else (f"{lo:g}", f"{hi:g}")
        span = f"({lo_}, {hi_}]" if open_low else f"[{lo_}, {hi_}]"
        raise ProtocolError(f"{key} must be in {span}, got {_short(v)}")
    return int(v) if integer else float(v)


def _short(v) -> str:
    """repr(v) for an error message: a huge integer by its number of digits, anything else cut to 40
    characters."""
    if isinstance(v, int) and abs(v) >= 10 ** 30:
        return f"an integer of {math.floor(math.log10(abs(v))) + 1} digits"
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_message(text: str, models) -> dict:
    """A client's text message -> a validated dict with ``type`` and typed fields; else ProtocolError.

    models: the served model names (``start`` may name one; the first is the default)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_JSON_BYTES:
        raise ProtocolError(f"message is larger than {MAX_JSON_BYTES} bytes")
    try:
        msg = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        raise ProtocolError("message is not valid JSON (or nested too deep)") from None
    if not isinstance(msg, dict):
        raise ProtocolError("message must be a JSON object with a \"type\"")
    kind = msg.get("type")
    if kind not in TYPES:
        raise ProtocolError(f"unknown message type {kind!r}; expected one of {', '.join(TYPES)}")
    if kind == "stop":
        return {"type": "stop"}
    out = {"type": kind, "prompt": _prompt(msg), "guidance": _number(msg, "guidance", *GUIDANCE)}
    if kind == "set_prompt":
        return out
    names = list(models)
    model = msg.get("model", names[0])
    if model not in names:
        raise ProtocolError(f"unknown model {model!r}; served: {', '.join(names)}")
    seed = _number(msg, "seed", 0, 2 ** 31 - 1, integer=True)
    out.update(model=model, steps=_number(msg, "steps", *STEPS, integer=True), seed=0 if seed is None else seed,
               strength=_number(msg, "strength", *STRENGTH, open_low=True))
    return out


class RateLimit:
    """A token bucket for one socket's messages: ``burst`` at once, then ``rate`` a second.

    ``allow()`` says whether the next message may be handled; ``abusive`` turns true once
    ``burst`` messages in a row were refused (the client goes on sending after being told)."""

    def __init__(self, rate: float = MESSAGES_PER_SECOND, burst: int = MESSAGE_BURST, clock=time.monotonic):
        self.rate, self.burst, self.clock = float(rate), int(burst), clock
        self.tokens, self.last, self.refused_in_a_row = float(burst), clock(), 0

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            self.refused_in_a_row = 0
            return True
        self.refused_in_a_row += 1
        return False

    @property
    def abusive(self) -> bool:
        return self.refused_in_a_row >= self.burst

    def message(self) -> str:
        return (f"too many messages: at most {self.rate:g} a second after a burst of {self.burst}; "
                f"this one was dropped")


def is_loopback(host: str) -> bool:
    """Whether a bind address or a Host name is this machine only (127.0.0.0/8, ::1, localhost)."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_handshake(origin: str | None, host: str | None, token: str | None, expected_token: str | None,
                     allow_origins=()) -> str | None:
    """Why a WebSocket handshake is refused, or None to accept it.

    origin: the ``Origin`` header (browsers always send it; other clients may not, and are let in);
    host: the ``Host`` header; token: the ``token`` query parameter; expected_token: the server's
    (None: no token needed); allow_origins: origins accepted besides the page's own.

    A browser page may open a WebSocket to any address, so without these checks every site the user
    visits could drive the server. Same origin means the Origin's host:port is the Host the request
    was sent to. Without a token, the Host must also be an address or ``localhost``: a DNS name can
    be rebound to 127.0.0.1 by the site that owns it, which would then be "same origin"."""
    if expected_token is not None and not hmac.compare_digest((token or "").encode(), expected_token.encode()):
        return "missing or wrong token"
    if origin is None:
        return None
    allowed = {o.rstrip("/").lower() for o in allow_origins}
    if origin.rstrip("/").lower() in allowed:
        return None
    parts, host = urlsplit(origin), (host or "").lower()
    if parts.scheme not in ("http", "https") or parts.netloc.lower() != host:
        return f"origin {origin!r} is not this page's ({host}); start the server with --allow-origin to allow it"
    if expected_token is None:
        name = parts.hostname or ""
        try:
            ipaddress.ip_address(name)
        except ValueError:
            if name != "localhost":
                return f"host {host!r} is a DNS name; without a token only addresses and localhost are served"
    return None


def check_upload(data: bytes) -> None:
    """An uploaded clip's size; its content is checked by decoding it."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise ProtocolError(f"upload is {len(data) / 2 ** 20:.1f} MiB; at most {MAX_UPLOAD_BYTES // 2 ** 20} MiB")
    if not data:
        raise ProtocolError("upload is empty")


def encode_chunk(frames: np.ndarray, chunk: int, revision: int, compute_ms: float) -> bytes:
    """(F, H, W, 3) uint8 -> one binary message (``HEADER`` + pixels)."""
    F, H, W, _ = frames.shape
    head = HEADER.pack(F, H, W, chunk, revision & 0xFFFF, min(65535, max(0, round(compute_ms))))
    return head + np.ascontiguousarray(frames, dtype=np.uint8).tobytes()


def decode_chunk(data: bytes) -> dict:
    """One binary message -> {"frames": (F, H, W, 3) uint8, "chunk", "revision", "compute_ms"} (clients, tests)."""
    F, H, W, chunk, revision, ms = HEADER.unpack_from(data)
    frames = np.frombuffer(data, dtype=np.uint8, offset=HEADER.size)
    if frames.size != F * H * W * 3:
        raise ValueError(f"chunk message holds {frames.size} pixel bytes, the header says {F}x{H}x{W}x3")
    return {"frames": frames.reshape(F, H, W, 3), "chunk": chunk, "revision": revision, "compute_ms": ms}
