"""The README's Python example runs as printed (with a shorter video)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no Python example"
    code = blocks[0]
    assert "num_frames=1000" in code
    exec(compile(code.replace("num_frames=1000", "num_frames=9"), "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0] == "torch.Size([1, 3, 1, 32, 32])" and printed[1] == "torch.Size([1, 3, 4, 32, 32])"
