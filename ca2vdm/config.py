"""Model configuration: every field that defines a ``CausalVideoDiT``, saved as config.json.

``coerce_fields`` turns YAML-read strings into the fields' scalar types (shared with the training
config); ``ModelConfig.validate`` rejects a config that contradicts itself with a message naming
the field. ``ModelConfig.layout`` is the chunk structure / attention set (``layout.ChunkLayout``).
"""

from dataclasses import asdict, dataclass, fields

from .layout import ChunkLayout


def coerce_fields(cls, d: dict) -> dict:
    """Convert config values to their fields' scalar types (YAML reads '2e-4' as a string), or fail
    with a message naming the field."""
    types = {f.name: f.type for f in fields(cls)}
    out = {}
    for k, v in d.items():
        t = types.get(k)
        t = t if isinstance(t, str) else getattr(t, "__name__", str(t))
        try:
            if t.startswith("float") and isinstance(v, (str, int)) and not isinstance(v, bool):
                v = float(v)
            elif t.startswith("int") and isinstance(v, str):
                v = int(v)
            elif t == "str" and isinstance(v, bool):  # YAML 1.1 reads an unquoted off / on (no / yes) as a bool
                v = "on" if v else "off"
            elif t.startswith("bool") and isinstance(v, str):
                if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(v)
                v = v.lower() in ("true", "1", "yes")
        except ValueError:
            raise ValueError(f"{cls.__name__}.{k}={v!r}: expected {t}") from None
        if t.startswith("int") and not t.startswith("int |") and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{cls.__name__}.{k}={v!r}: expected an integer")
        out[k] = v
    return out


@dataclass
class ModelConfig:
    """Everything that defines a CausalVideoDiT; saved as config.json beside the weights."""

    in_channels: int = 3            # latent (or pixel) channels C
    frame_size: tuple = (32, 32)    # latent frame (H, W)
    patch: int = 4                  # p: spatial patch size
    hidden: int = 128               # D
    depth: int = 4                  # number of blocks
    heads: int = 4
    mlp_ratio: float = 4.0
    chunk_frames: int = 4           # l: frames per generated chunk
    prefix_frames: int = 1          # given first frames (chunk 0); 0 = a prompt alone starts the video
    max_context_frames: int = 9     # P_max: cached frames a chunk attends to (sink frames included)
    sink_frames: int = 0            # s: first frames every later chunk attends to (LongLive's sink), 0: none
    temporal: str = "causal"        # "causal": the chunked causal attention set (cached generation);
                                    # "bidirectional": every frame of a clip sees every other (a teacher; no cache)
    clip_length: int | None = None  # "bidirectional": frames per clip, default cyclic_length
    positions: str = "cyclic"       # "cyclic" (TPE table of cyclic_length rows) or "rope"
    cyclic_length: int | None = None  # L, default P_max + l
    rope_base: float = 10000.0
    conditioning: str = "none"      # "none", "class" or "text"
    num_classes: int = 0            # for "class"
    text_dim: int = 384             # width of text token states, for "text"
    pooled_text: bool = False       # "text": also add an MLP of the mean token state to the adaLN input
    prefix_enhance: bool = False    # extra spatial attention to the last R clean frames
    prefix_enhance_frames: int = 3  # R
    objective: str = "flow"         # "flow" (velocity, Euler) or "eps" (DDPM, DDIM)
    prediction: str = "native"      # "native": the network outputs the objective's target (velocity / noise);
                                    # "sample" (flow only): it outputs the clean frames x0, turned into a velocity
    sample_sigma_min: float = 0.05  # "sample": velocity = (x_sigma - x0_hat) / max(sigma, this)
    flow_shift: float = 1.0
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    ddim_spacing: str = "trailing"

    def __post_init__(self):
        if isinstance(self.frame_size, int):
            self.frame_size = (self.frame_size, self.frame_size)
        self.frame_size = tuple(int(s) for s in self.frame_size)
        if self.cyclic_length is None:
            self.cyclic_length = self.max_context_frames + self.chunk_frames
        if self.clip_length is None and self.temporal == "bidirectional":
            self.clip_length = self.cyclic_length
        self.validate()

    def validate(self):
        def bad(name, why):
            raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("in_channels", "patch", "hidden", "depth", "heads", "chunk_frames", "max_context_frames"):
            if getattr(self, name) < 1:
                bad(name, "must be at least 1")
        if len(self.frame_size) != 2 or min(self.frame_size) < 1:
            bad("frame_size", "must be (height, width) with positive sizes")
        if any(s % self.patch for s in self.frame_size):
            bad("frame_size", f"is not divisible by patch={self.patch}")
        if self.hidden % self.heads:
            bad("heads", f"does not divide hidden={self.hidden}")
        if self.hidden % 4:
            bad("hidden", "must be divisible by 4 (2-D sin-cos position embedding)")
        if self.mlp_ratio <= 0:
            bad("mlp_ratio", "must be positive")
        if self.prefix_frames < 0:
            bad("prefix_frames", "must be 0 or more")
        if self.max_context_frames < self.prefix_frames:
            bad("max_context_frames", f"is smaller than the {self.prefix_frames} given prefix frames")
        if self.sink_frames < 0 or (self.sink_frames and self.sink_frames >= self.max_context_frames):
            bad("sink_frames", f"must be 0, or fewer than max_context_frames={self.max_context_frames}")
        if self.sink_frames and self.prefix_enhance:
            bad("sink_frames", "cannot be combined with prefix_enhance (use one or the other)")
        if self.temporal not in ("causal", "bidirectional"):
            bad("temporal", "must be 'causal' or 'bidirectional'")
        if self.temporal == "bidirectional":
            if self.prefix_frames:
                bad("prefix_frames", "must be 0 for a bidirectional model (its clips start from the condition alone)")
            if self.sink_frames:
                bad("sink_frames", "must be 0 for a bidirectional model (a clip has no earlier frames to keep)")
            if self.prefix_enhance:
                bad("prefix_enhance", "attends to earlier chunks' frames, which a bidirectional clip does not have")
            if self.clip_length < 1:
                bad("clip_length", "must be at least 1")
            if self.positions == "cyclic" and self.cyclic_length < self.clip_length:
                bad("cyclic_length", f"is shorter than clip_length={self.clip_length}: frames of one clip would "
                    "share a row")
        elif self.clip_length is not None:
            bad("clip_length", "is for temporal='bidirectional' (a causal model streams chunks of any number)")
        if self.positions not in ("cyclic", "rope"):
            bad("positions", "must be 'cyclic' or 'rope'")
        if self.positions == "cyclic" and self.cyclic_length < self.max_context_frames + self.chunk_frames:
            bad("cyclic_length", f"is shorter than max_context_frames + chunk_frames = "
                f"{self.max_context_frames + self.chunk_frames}: frames in one window would share a row")
        if self.positions == "rope" and (self.hidden // self.heads) % 2:
            bad("heads", "gives an odd head dimension, which RoPE cannot rotate")
        if self.conditioning not in ("none", "class", "text"):
            bad("conditioning", "must be 'none', 'class' or 'text'")
        if self.conditioning == "class" and self.num_classes < 1:
            bad("num_classes", "must be at least 1 for class conditioning")
        if self.conditioning == "text" and self.text_dim < 1:
            bad("text_dim", "must be at least 1 for text conditioning")
        if self.pooled_text and self.conditioning != "text":
            bad("pooled_text", f"needs conditioning 'text', got {self.conditioning!r}")
        if self.prefix_enhance and self.prefix_enhance_frames < 1:
            bad("prefix_enhance_frames", "must be at least 1 when prefix_enhance is on")
        if self.objective not in ("flow", "eps"):
            bad("objective", "must be 'flow' or 'eps'")
        if self.prediction not in ("native", "sample"):
            bad("prediction", "must be 'native' or 'sample'")
        if self.prediction == "sample" and self.objective != "flow":
            bad("prediction", "'sample' (x0 prediction) is defined for objective='flow' only")
        if not 0 < self.sample_sigma_min <= 1:
            bad("sample_sigma_min", "must be in (0, 1]")
        if self.ddim_spacing not in ("leading", "trailing"):
            bad("ddim_spacing", "must be 'leading' or 'trailing'")

    @property
    def tokens(self) -> int:
        """S, tokens per frame."""
        return (self.frame_size[0] // self.patch) * (self.frame_size[1] // self.patch)

    @property
    def layout(self) -> ChunkLayout:
        return ChunkLayout(self.prefix_frames, self.chunk_frames, self.max_context_frames, self.sink_frames)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["frame_size"] = list(self.frame_size)
        if not d["sink_frames"]:  # configs (and saved streams) from before sinks existed stay equal
            del d["sink_frames"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        return cls(**coerce_fields(cls, d))
