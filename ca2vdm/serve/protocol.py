"""The WebSocket protocol of ``ca2vdm serve``: what a client may send, checked before anything runs.

One socket per viewer (``/ws``). Client -> server:

* text messages, JSON objects of at most ``MAX_JSON_BYTES`` with a ``type``:

  ``{"type": "start", "prompt": str, "model"?: name, "steps"?: int, "guidance"?: float, "seed"?: int, "strength"?: float}``
      start this socket's stream. ``steps`` / ``guidance`` default to the model's recommendation
      (``GET /api/models``); ``strength`` in (0, 1] makes it video-to-video from the last uploaded clip.
  ``{"type": "set_prompt", "prompt": str, "guidance"?: float}``
      switch the prompt of the playing stream (applied between two chunks).
  ``{"type": "stop"}``
      stop the stream and free its session at once.

* binary messages: one video file (any format PyAV reads, at most ``MAX_UPLOAD_BYTES``), the source
  clip of the next ``start`` with a ``strength``; answered ``{"type": "uploaded", "frames": F}``.

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
      12      u16   prompt revision the chunk was generated under (0 = the start prompt, +1 per set_prompt)
      14      u16   milliseconds the server spent computing the chunk (its batched forward), capped at 65535
      16      F*H*W*3 bytes: uint8 RGB, frame by frame, row by row (F, H, W, 3)
"""

import json
import math
import struct

import numpy as np

MAX_PROMPT_CHARS = 200
MAX_JSON_BYTES = 4 * 1024
MAX_UPLOAD_BYTES = 8 * 1024 * 1024
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
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        raise ProtocolError(f"{key} must be {'an integer' if integer else 'a number'}, got {v!r}")
    if not math.isfinite(v) or v > hi or v < lo or (open_low and v == lo):
        span = f"({lo:g}, {hi:g}]" if open_low else f"[{lo:g}, {hi:g}]"
        raise ProtocolError(f"{key} must be in {span}, got {v!r}")
    return int(v) if integer else float(v)


def parse_message(text: str, models) -> dict:
    """A client's text message -> a validated dict with ``type`` and typed fields; else ProtocolError.

    models: the served model names (``start`` may name one; the first is the default)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_JSON_BYTES:
        raise ProtocolError(f"message is larger than {MAX_JSON_BYTES} bytes")
    try:
        msg = json.loads(text)
    except ValueError:
        raise ProtocolError("message is not valid JSON") from None
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
