"""An uploaded clip, read within bounds: the source of a video-to-video stream.

An upload is a file from anyone who can reach the socket, so nothing in it is decoded at the size
it claims before that size is checked:

    frames = read_upload(data, [(32, 32)])   # {(32, 32): (F, 32, 32, 3) uint8}, F <= MAX_UPLOAD_FRAMES

1. the bytes: at most ``MAX_UPLOAD_BYTES`` (the WebSocket layer refuses larger messages first);
2. the header: an image's width and height (PIL reads only the header), a video's width, height
   and duration (PyAV's stream parameters); more than ``MAX_UPLOAD_PIXELS`` per frame or
   ``MAX_UPLOAD_SECONDS`` is refused. The decoder itself is opened with ``max_pixels``, so a file
   whose header lies cannot make it allocate more;
3. the frames: a decoded frame larger than the model's is shrunk by swscale (uint8, area averaging)
   as it is converted to RGB, straight to the size that covers the model's frame, then
   center-cropped (``ca2vdm.video.resize_crop``'s geometry); a smaller one is upscaled as
   ``read_video`` does. Decoding stops after ``MAX_UPLOAD_FRAMES`` frames or ``MAX_UPLOAD_SECONDS``.

What is kept is uint8 at the model's frame size (256 frames of 32x32: 0.75 MiB), never the file's
size in float32.
"""

import io
import warnings

import numpy as np
import torch

from ..video import av, resize_crop
from .protocol import (MAX_UPLOAD_FRAMES, MAX_UPLOAD_PIXELS, MAX_UPLOAD_SECONDS, ProtocolError, check_upload,
                       one_line)


def _too_large(w: int, h: int) -> ProtocolError:
    return ProtocolError(f"upload is {w}x{h} pixels per frame; at most {MAX_UPLOAD_PIXELS} "
                         f"(e.g. 1280x720)")


def check_image_header(data: bytes) -> None:
    """Refuse an image whose header says it is too large (PIL reads the header only; formats PIL
    does not know are left to PyAV's checks)."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
        except Image.DecompressionBombError:  # PIL's own limit (178 Mpx), far above ours
            raise ProtocolError(f"upload is larger than {MAX_UPLOAD_PIXELS} pixels per frame") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return
    if w * h > MAX_UPLOAD_PIXELS:
        raise _too_large(w, h)


def cover(w: int, h: int, size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) that covers ``size`` = (h, w) keeping the aspect ratio (``resize_crop``'s)."""
    th, tw = size
    s = max(th / h, tw / w)
    return max(tw, round(w * s)), max(th, round(h * s))


def _to_size(frame, size: tuple[int, int]) -> np.ndarray:
    """One av.VideoFrame -> (h, w, 3) uint8: covered, then center-cropped. A frame larger than the
    cover is shrunk by swscale (area averaging) as it is converted to RGB, so no full-size RGB or
    float copy is made; a smaller one is converted and upscaled as ``read_video`` does."""
    h, w = size
    cw, ch = cover(frame.width, frame.height, size)
    if cw < frame.width:
        x = frame.reformat(width=cw, height=ch, format="rgb24", interpolation="AREA").to_ndarray()
    else:
        x = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)[None].float().div(127.5).sub(1)
        x = resize_crop(x, size)[0].clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    top, left = (x.shape[0] - h) // 2, (x.shape[1] - w) // 2
    return np.ascontiguousarray(x[top:top + h, left:left + w])


def read_upload(data: bytes, sizes) -> dict:
    """An uploaded video or image file -> {(H, W): (F, H, W, 3) uint8} for each (H, W) in ``sizes``;
    ProtocolError (one line) when it is too large, too long, or PyAV cannot read it."""
    check_upload(data)
    check_image_header(data)
    limit = {"max_pixels": str(MAX_UPLOAD_PIXELS)}  # the probe's decoder too (find_stream_info)
    try:
        container = av.open(io.BytesIO(data), options=limit)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise ProtocolError(f"cannot read the upload as a video: {one_line(e)}") from None
    try:
        if not container.streams.video:
            raise ProtocolError("cannot read the upload as a video: it has no video stream")
        stream = container.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        if not w or not h:  # the probe's decoder refused it (max_pixels) or found no size
            raise ProtocolError(f"cannot read the upload as a video: no frame size below {MAX_UPLOAD_PIXELS} "
                                f"pixels in its header")
        if w * h > MAX_UPLOAD_PIXELS:
            raise _too_large(w, h)
        seconds = _duration(container, stream)
        if seconds is not None and seconds > MAX_UPLOAD_SECONDS:
            raise ProtocolError(f"upload is {seconds:.0f} s long; at most {MAX_UPLOAD_SECONDS:g} s")
        stream.codec_context.options = limit
        stream.codec_context.thread_count = 1
        out, n = {size: [] for size in sizes}, 0
        for frame in container.decode(stream):
            if n == MAX_UPLOAD_FRAMES or (frame.time is not None and frame.time > MAX_UPLOAD_SECONDS):
                break
            for size, frames in out.items():
                frames.append(_to_size(frame, size))
            n += 1
    except ProtocolError:
        raise
    except Exception as e:  # FFmpeg errors while demuxing or decoding
        raise ProtocolError(f"cannot read the upload as a video: {one_line(e)}") from None
    finally:
        container.close()
    if n == 0:
        raise ProtocolError("cannot read the upload as a video: no frames decoded")
    return {size: np.stack(frames) for size, frames in out.items()}


def _duration(container, stream) -> float | None:
    """Seconds, from the stream's header or the container's; None when neither says."""
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None

