"""README.md's code blocks, run as a user would run them.

Every fenced block is ``python``, ``bash`` or ``text`` (a text block is a listing, not code; any other
info string fails ``test_every_block_is_classified``).  An HTML comment on the line right before a
block marks it:

* ``<!-- readme-test: skip REASON -->``: the block cannot run here (the network, an upstream checkout,
  the suite itself).  Each such block is its own test item, reported as skipped with its reason.
* ``<!-- readme-test: slow REASON -->``: the block runs under ``-m slow`` only.

The other blocks run in README order in one test, because later blocks use what earlier ones made
(the convert-on-first-use cache, ``converted/cv3``).  They run in a sandbox directory laid out like a
user's checkout:

* ``tests/data/<case>`` link to the committed cases; ``tests/data/tiny-release`` is a directory of links
  to the committed tiny release, so the conversion cache (``.cosyjax/``) lands in the sandbox, not in the
  repository.  The first block that loads the release converts it (once); the others reuse that cache.
* ``tools/`` and ``examples/`` link to the checkout's;
* ``pretrained_models/Fun-CosyVoice3-0.5B`` is that same directory (the real release is a download);
* ``my_voice.wav`` is the synthetic voice of ``conftest.py``;
* ``cosyjax`` on ``PATH`` is ``python -m cosyjax.cli`` of this interpreter (an installed console script
  may belong to another checkout).

Two substitutions are made in a block's text before it runs: the Hub id
``FunAudioLLM/Fun-CosyVoice3-0.5B-2512`` becomes ``tests/data/tiny-release`` (CI cannot reach the Hub,
and the real model is 2 GB), and ``/tmp/`` becomes the sandbox's ``tmp/`` (a second run would find the
first run's outputs there).  Python blocks run in this process with the sandbox as working directory,
so they share compiled functions with the rest of the suite; bash blocks run with ``bash -e``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest

from conftest import DATA, voice_wav_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
HUB_ID = "FunAudioLLM/Fun-CosyVoice3-0.5B-2512"
LANGUAGES = ("python", "bash", "text")
_FENCE = re.compile(r"^```(\S*)\s*$")
_MARK = re.compile(r"^<!--\s*readme-test:\s*(skip|slow)\s+(\S.*?)\s*-->$")


@dataclasses.dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    mark: str  # "", "skip" or "slow"
    reason: str

    @property
    def name(self) -> str:
        return f"README.md:{self.line} ({self.language})"


def readme_blocks(path: str = README) -> list[Block]:
    """The fenced blocks of ``path`` with their marks; a malformed mark or an unclosed fence fails."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].startswith("<!--") and "readme-test" in lines[i]:
            assert _MARK.match(lines[i]), f"README.md:{i + 1}: malformed mark {lines[i]!r}"
            assert i + 1 < len(lines) and _FENCE.match(lines[i + 1]), \
                f"README.md:{i + 1}: a readme-test mark must be the line right before a code block"
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"README.md:{i + 1}: unclosed code block"
        mark = _MARK.match(lines[i - 1]) if i > 0 else None
        blocks.append(Block(i + 1, fence.group(1), "\n".join(lines[i + 1:end]) + "\n",
                            mark.group(1) if mark else "", mark.group(2) if mark else ""))
        i = end + 1
    return blocks


BLOCKS = readme_blocks()
CODE = [b for b in BLOCKS if b.language != "text"]


def test_every_block_is_classified():
    assert [b.name for b in BLOCKS if b.language not in LANGUAGES] == []
    runnable = [b for b in CODE if not b.mark]
    assert {b.language for b in runnable} == {"python", "bash"}, "the README test would check nothing"
    assert any("from cosyjax import CosyVoice3" in b.code for b in runnable)
    assert any("from cosyjax import AutoModel" in b.code for b in runnable)


@pytest.mark.parametrize("block", [b for b in CODE if b.mark == "skip"], ids=lambda b: b.name)
def test_skipped_block(block):
    pytest.skip(f"{block.name} is not run: it {block.reason}")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    data = root / "tests" / "data"
    data.mkdir(parents=True)
    for name in sorted(os.listdir(DATA)):
        if name == "tiny-release":
            release = data / name
            release.mkdir()
            for item in sorted(os.listdir(os.path.join(DATA, name))):
                (release / item).symlink_to(os.path.join(DATA, name, item))
        else:
            (data / name).symlink_to(os.path.join(DATA, name))
    for name in ("tools", "examples"):  # the checkout's scripts and example configs
        (root / name).symlink_to(os.path.join(REPO, name))
    (root / "pretrained_models").mkdir()
    (root / "pretrained_models" / "Fun-CosyVoice3-0.5B").symlink_to(data / "tiny-release")
    (root / "my_voice.wav").write_bytes(voice_wav_bytes())
    (root / "tmp").mkdir()
    bin_dir = root / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "cosyjax"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m cosyjax.cli "$@"\n')
    shim.chmod(0o755)
    return root


def _prepared(block: Block, root) -> str:
    return block.code.replace(HUB_ID, "tests/data/tiny-release").replace("/tmp/", f"{root}/tmp/")


def _run(block: Block, root, monkeypatch) -> None:
    code = _prepared(block, root)
    if block.language == "python":
        monkeypatch.chdir(root)
        exec(compile(code, block.name, "exec"), {"__name__": "__readme__"})  # noqa: S102
        return
    env = {**os.environ, "PATH": f"{root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(["bash", "-e", "-c", code], cwd=root, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, (f"{block.name} exited {result.returncode}\n--- block\n{code}--- stdout\n"
                                    f"{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}")


def test_readme_blocks_run(sandbox, monkeypatch):
    """Every unmarked python and bash block, in README order (see the module docstring)."""
    for block in (b for b in CODE if not b.mark):
        _run(block, sandbox, monkeypatch)
    assert (sandbox / "converted" / "cv3" / "config.json").is_file()
    assert (sandbox / "tests" / "data" / "tiny-release" / ".cosyjax" / "float32").is_dir()  # the first-use cache


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in CODE if b.mark == "slow"], ids=lambda b: b.name)
def test_slow_block(block, sandbox, monkeypatch):
    _run(block, sandbox, monkeypatch)
