"""Files shipped inside the package: the default model, the digit classifier, web pages' static files.

One lookup, ``asset_path(name)``, that works the same from a source checkout, an editable install
and an installed wheel (the files are package data, next to this module)::

    asset_path("digits")            # the shipped moving-digits model (a checkpoint directory)
    asset_path("digit_classifier")  # the classifier behind the moving-digits figures

Only what generation needs is packaged (``config.json``, ``*.safetensors``, ``MODEL_CARD.md``);
training logs and metrics CSVs beside them stay in the repository, out of the wheel. A new shipped
model goes in a folder here and is named in pyproject.toml's package-data.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = "digits"
CLASSIFIER = "digit_classifier"


def asset_path(name: str) -> Path:
    """The directory (or file) ``name`` shipped with the package; a clear error when it is missing."""
    path = ROOT / name
    if not path.exists():
        have = sorted(p.name for p in ROOT.iterdir() if not p.name.startswith(("_", ".")))
        raise FileNotFoundError(f"no shipped asset {name!r} in {ROOT} (shipped: {', '.join(have)})")
    return path
