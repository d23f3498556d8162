"""Every Python example in README.md and docs/*.md runs as printed.

A page's ```python blocks are read in order. A block runs in a fresh namespace, unless its first
line is ``# continues the example above``: then it runs after the block before it, in that block's
namespace. A block whose first line starts with ``# not run:`` is not run; such blocks are listed in
NOT_RUN below, so that none is added without this file saying so. README's examples run in a
subprocess of their own, the docs pages' in another (one import of torch and the text encoder for
all of them), in a temporary directory (an example may write files), with one thread (the
examples' tensors are small; more threads only thrash on a busy machine). A traceback names the
page and its own line number.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
CONTINUES = "# continues the example above"
NOT_RUN_MARK = "# not run:"
# (page, first line) of every block that is deliberately not run: those that need files no one has here
# (the tests run the same calls on tiny random models: tests/test_text_umt5.py, tests/test_wan_vae.py).
NOT_RUN: set[tuple[str, str]] = {
    ("README.md", "# not run: it needs a Wan pipeline folder (its tokenizer/, text_encoder/ and vae/), none ships here"),
}

FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: str) -> list[tuple[int, str]]:
    """(first line number of the code, code) of every ```python block of ``page``."""
    text = (ROOT / page).read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def chains(page: str) -> list[list[tuple[int, str]]]:
    """The blocks to run, grouped into chains that share one namespace."""
    out = []
    for line, code in python_blocks(page):
        first = code.split("\n", 1)[0].strip()
        if first.startswith(NOT_RUN_MARK):
            continue
        if first.startswith(CONTINUES):
            assert out, f"{page}:{line}: the first example cannot continue an example above"
            out[-1].append((line, code))
        else:
            out.append([(line, code)])
    return out


RUNNER = """
import json, sys
for page, chains in json.loads(sys.stdin.read()):
    for chain in chains:
        namespace = {"__name__": "__main__"}
        for line, code in chain:
            # pad so that a traceback names the page's own line numbers
            exec(compile("\\n" * (line - 1) + code, page, "exec"), namespace)
"""
GROUPS = {"README.md": ["README.md"], "docs": [p for p in PAGES if p.startswith("docs/")]}


def run_pages(pages: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    todo = [(page, chains(page)) for page in pages]
    return subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(todo), text=True,
                          capture_output=True, cwd=tmp_path, env=env, timeout=600)


def test_every_page_with_examples_is_found():
    with_code = [p for p in PAGES if python_blocks(p)]
    assert "README.md" in with_code and len(python_blocks("README.md")) >= 2
    assert {"docs/step_caching.md", "docs/distillation.md", "docs/steering.md"} <= set(with_code)


def test_not_run_blocks_are_the_listed_ones():
    marked = {(page, code.split("\n", 1)[0].strip()) for page in PAGES for _, code in python_blocks(page)
              if code.lstrip().startswith(NOT_RUN_MARK)}
    assert marked == NOT_RUN, ("an example marked '# not run:' must be listed in NOT_RUN (and a listed "
                               f"one must still exist): marked {sorted(marked)}, listed {sorted(NOT_RUN)}")


@pytest.mark.parametrize("group", GROUPS)
def test_examples_run(group, tmp_path):
    pages = GROUPS[group]
    assert any(chains(p) for p in pages)
    result = run_pages(pages, tmp_path)
    assert result.returncode == 0, f"an example in {group} fails:\n{result.stderr[-4000:]}"
    if group == "README.md":  # the streaming example prints chunk 0 (the given frame), then 4-frame chunks
        printed = result.stdout.split("\n")
        assert printed[:2] == ["torch.Size([1, 3, 1, 32, 32])", "torch.Size([1, 3, 4, 32, 32])"]
        assert printed.count("torch.Size([1, 3, 4, 32, 32])") == 6  # 1 + 6 * 4 = 25 frames


def test_a_broken_example_fails(tmp_path, monkeypatch):
    """The runner reports an example that raises, with the page's own line number."""
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nx = 1\n```\n\n```python\n# continues the example above\nassert x == 2\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    result = run_pages(["page.md"], tmp_path)
    assert result.returncode != 0 and 'File "page.md", line 9' in result.stderr
