"""One safetensors file written atomically: readers see the old file or the new one, never half of one."""

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (made contiguous, moved to the CPU) and string ``metadata`` to ``path``
    through a temporary file in the same folder and ``os.replace``; parent folders are created.
    Tensors that share memory (e.g. a prompt's mask and the conditioning built from it) are each
    written as a copy of their own: safetensors refuses shared memory."""
    path = Path(path)
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(out, tmp, metadata=metadata)
        umask = os.umask(0)  # mkstemp makes a private file: give it the usual permissions
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
