"""Video I/O: write mp4/gif of a moving square, read it back, resample, errors, a real clip."""

from pathlib import Path

import av
import pytest
import torch

from ca2vdm.video import VideoWriter, read_image, read_video

BEACH = Path(__file__).resolve().parents[2] / "shared/data/beach"


def moving_square(frames=12, size=32) -> torch.Tensor:
    """(3, F, H, W) in [-1, 1]: an orange square moving diagonally over a dark background."""
    v = torch.full((3, frames, size, size), -0.8)
    colour = torch.tensor([0.9, 0.3, -0.5])[:, None, None]
    for f in range(frames):
        v[:, f, 4 + f:12 + f, 2 * f:2 * f + 8] = colour
    return v


@pytest.mark.parametrize("ext", ["mp4", "gif"])
def test_write_read_roundtrip(tmp_path, ext):
    video = moving_square()
    path = tmp_path / f"square.{ext}"
    with VideoWriter(path, fps=8) as w:
        w.write(video)
    back = read_video(path)
    assert back.shape == video.shape and back.dtype == torch.float32
    assert back.min() >= -1 and back.max() <= 1
    assert (back - video).abs().mean() < 0.1  # lossy (h264 / 256-colour palettes), but close


@pytest.mark.parametrize("ext", ["mp4", "gif"])
def test_chunked_writes_and_scale(tmp_path, ext):
    video = moving_square(frames=10)
    path = tmp_path / f"chunks.{ext}"
    with VideoWriter(path, fps=8, scale=4) as w:
        for chunk in video.split(3, dim=1):  # 3 + 3 + 3 + 1 frames
            w.write(chunk)
        assert w.frames_written == 10
    back = read_video(path)
    assert back.shape == (3, 10, 128, 128)
    # downscaled back to 32x32 it matches the original
    assert (read_video(path, size=(32, 32)) - video).abs().mean() < 0.1


def test_gif_grows_while_writing(tmp_path):
    path = tmp_path / "live.gif"
    with VideoWriter(path, fps=8) as w:
        w.write(moving_square(frames=2))
        first = path.stat().st_size
        w.write(moving_square(frames=4))
        assert path.stat().st_size > first > 0


def test_grey_and_odd_sizes(tmp_path):
    grey = torch.rand(1, 3, 17, 9) * 2 - 1
    path = tmp_path / "grey.mp4"
    with VideoWriter(path) as w:
        w.write(grey)
    back = read_video(path)
    assert back.shape == (3, 3, 18, 10)  # padded to even sizes for yuv420p
    assert torch.allclose(back[0], back[1], atol=0.05)  # grey stays grey


def test_resample_fps(tmp_path):
    path = tmp_path / "fps.mp4"
    with VideoWriter(path, fps=8) as w:
        w.write(moving_square(frames=16))  # 2 seconds
    assert read_video(path, fps=4).shape[1] == 8
    assert read_video(path, fps=16).shape[1] == 32
    assert read_video(path, fps=4, max_frames=5).shape[1] == 5
    every_other = read_video(path, fps=4)
    assert torch.allclose(every_other, read_video(path)[:, ::2])


def test_errors(tmp_path):
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
                    .to(torch.uint8).numpy().tobytes())
    with pytest.raises(ValueError, match="cannot read video .*corrupt.mp4"):
        read_video(bad)
    with pytest.raises(ValueError, match="cannot read video .*missing.mp4"):
        read_video(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="unsupported video extension"):
        VideoWriter(tmp_path / "x.avi")
    with VideoWriter(tmp_path / "x.mp4") as w:
        for wrong in (torch.zeros(3, 32, 32), torch.zeros(4, 2, 8, 8), torch.zeros(1, 3, 2, 8, 8)):
            with pytest.raises(ValueError, match=r"\(C, F, H, W\)"):
                w.write(wrong)
        w.write(torch.zeros(3, 2, 8, 8))
        with pytest.raises(ValueError, match="frame size changed"):
            w.write(torch.zeros(3, 2, 16, 16))


def test_read_image(tmp_path):
    path = tmp_path / "frame.png"
    image = moving_square(frames=1)  # (3, 1, 32, 32)
    pixels = ((image[:, 0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()  # (H, W, 3)
    with av.open(str(path), "w", format="image2") as c:  # write a png with PyAV
        s = c.add_stream("png", rate=1)
        s.width, s.height, s.pix_fmt = 32, 32, "rgb24"
        for packet in [*s.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")), *s.encode()]:
            c.mux(packet)
    assert read_image(path, size=(16, 16)).shape == (3, 1, 16, 16)
    assert (read_image(path) - image).abs().max() < 0.01  # png is lossless


def test_real_clip():
    clip = BEACH / "beach1.mp4"
    if not clip.is_file():
        pytest.skip(f"real clip not found at {clip}")
    video = read_video(clip, size=(32, 32), max_frames=16, fps=8)
    assert video.shape == (3, 16, 32, 32) and video.dtype == torch.float32
    assert -1 <= video.min() < video.max() <= 1
    assert (video[:, 1:] - video[:, :-1]).abs().mean() > 0  # it moves
