"""One safetensors file written atomically: readers see the old file or the new one, never half of one."""

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (made contiguous, moved to the CPU) and string ``metadata`` to ``path``
    through a temporary file in the same folder and ``os.replace``; parent folders are created.
    Entries that share memory (a mask that is also another's mask, views of one buffer) are written
    as copies: safetensors refuses aliased tensors, and a file has no notion of sharing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(_unshared(tensors), tmp, metadata=metadata)
        umask = os.umask(0)  # mkstemp makes a private file: give it the usual permissions
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each with storage of its own: the second and later entries whose
    storage an earlier one uses are cloned."""
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel():
            v = v.clone()
        seen.add(ptr)
        out[k] = v
    return out
