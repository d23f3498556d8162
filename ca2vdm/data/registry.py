"""The dataset registry: a run config's ``data`` section -> a dataset of clips.

``dataset:`` names one of ``moving-digits`` (procedural), ``video-folder``, ``frame-folder`` or
``latents`` (pre-encoded by ``ca2vdm encode``); ``autoencoder:`` encodes clips on the fly. A new
dataset is a class in this package (items ``{"video": (C, F, H, W), "caption"?, "label"?}``) and
one branch here.
"""


def build_dataset(data: dict, frames: int, split: str):
    """The dataset named by a run config's ``data`` section, with clips of ``frames`` frames."""
    data = dict(data)
    kind = data.pop("dataset", "moving-digits")
    val_clips = data.pop("val_clips", 64)
    if kind == "latents":  # pre-encoded by `ca2vdm encode`: data.path (train) and data.val_path
        from ..autoencoder import LatentDataset

        path = data.get("val_path") if split == "val" else data.get("path")
        if path is None:
            if split == "val":
                return None
            raise ValueError("data.path is required for dataset 'latents'")
        return LatentDataset(path, frames)
    spec = data.pop("autoencoder", None)
    if spec not in (None, "pixel"):  # encode every clip on the fly
        from ..autoencoder import EncodedDataset, load_autoencoder

        return EncodedDataset(build_dataset(data | {"dataset": kind, "val_clips": val_clips}, frames, split),
                              load_autoencoder(spec))
    if kind == "moving-digits":
        from .digits import MovingDigits

        num_clips = data.pop("num_clips", 20000)
        return MovingDigits(num_clips if split == "train" else val_clips, frames, split=split, **data)
    if kind in ("video-folder", "frame-folder"):
        from .folders import FrameFolder, VideoFolder

        cls = VideoFolder if kind == "video-folder" else FrameFolder
        root = data.pop("root", None)
        if root is None:
            raise ValueError(f"data.root is required for dataset {kind!r}")
        data.setdefault("clips_per_video", 100)  # many random start points per video per "epoch"
        val_root = data.pop("val_root", None)
        if split == "val":
            if val_root is None:  # no held-out folder: other random clips of the same videos
                data["seed"] = data.get("seed", 0) + 1
                data["clips_per_video"] = max(1, val_clips // 2)
            else:
                root = val_root
        return cls(root, frames, **data)
    raise ValueError(f"unknown dataset {kind!r} (available: moving-digits, video-folder, frame-folder, latents)")
