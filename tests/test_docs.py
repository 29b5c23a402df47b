"""The documentation runs: every ```python block of README.md and docs/*.md is executed, so the docs cannot drift
from the code, and every relative link in those files points at a file that exists.

How a file's blocks run: in order, in one namespace per file (a block may use what an earlier block of the same
file defined), in a temporary working directory, with the file's path and line numbers in any traceback. Shell
blocks (```bash, ```) are not run.

One mechanism marks what a block needs: an HTML comment right before it (invisible on the rendered page), one of

- ``<!-- docs-test: setup: CODE -->``: CODE (Python, one line or several up to ``-->``) runs first, in the file's
  namespace: it binds the placeholders a reader replaces with their own (``my_model``, a diffusers ``pipe``, ...)
  to small stand-ins, so that the example runs in seconds on 2 CPU cores;
- ``<!-- docs-test: server -->``: the test starts ``python -m fastdiff serve --port 0`` (the embedded digits
  network, as the page's shell block does) on 127.0.0.1 once for the file, and ``http://127.0.0.1:8000`` in the
  block stands for that server's address;
- ``<!-- docs-test: skip: REASON -->``: the block is not run; the test prints REASON and counts it. Keep these to
  what cannot run on a CPU-only machine (``SKIPS_ALLOWED`` below is the number there are).

A directive that is not right before a ```python block, or an unknown one, fails the test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field

import pytest
from repo_paths import REPO

DOC_FILES = ["README.md"] + sorted(
    os.path.join("docs", name) for name in os.listdir(os.path.join(REPO, "docs")) if name.endswith(".md")
)
SKIPS_ALLOWED = 1  # docs/serving.md: Ray Serve replicas with a GPU each
SERVER_ADDRESS = "http://127.0.0.1:8000"
PYTHON_LANGS = {"python", "py", "python3"}

_FENCE = re.compile(r"^```(\S*)\s*$")
_DIRECTIVE = re.compile(r"<!--\s*docs-test:\s*(\w+)\s*(?::(.*?))?-->", re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@dataclass
class Block:
    line: int  # 1-based line of the block's first code line
    code: str
    setup: list[str] = field(default_factory=list)
    server: bool = False
    skip: str | None = None


def parse(path: str) -> list[Block]:
    """The ```python blocks of the markdown file ``path`` with the directives before each."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    blocks: list[Block] = []
    pending: list[tuple[str, str, int]] = []  # (kind, argument, line) of directives not yet attached
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("<!--") and "docs-test" in line:
            start = i
            chunk = line
            while "-->" not in chunk:
                i += 1
                assert i < len(lines), f"{path}:{start + 1}: docs-test comment never closed"
                chunk += "\n" + lines[i]
            match = _DIRECTIVE.search(chunk)
            assert match, f"{path}:{start + 1}: malformed docs-test comment {chunk!r}"
            pending.append((match.group(1), match.group(2) or "", start + 1))
            i += 1
            continue
        fence = _FENCE.match(line)
        if fence:
            lang = fence.group(1).lower()
            first = i + 1
            i += 1
            while i < len(lines) and lines[i].rstrip() != "```":
                i += 1
            assert i < len(lines), f"{path}:{first}: code block never closed"
            if lang in PYTHON_LANGS:
                block = Block(line=first + 1, code="\n".join(lines[first:i]))
                for kind, arg, where in pending:
                    if kind == "setup":
                        block.setup.append(textwrap.dedent(arg).strip("\n"))
                    elif kind == "server":
                        block.server = True
                    elif kind == "skip":
                        assert arg.strip(), f"{path}:{where}: a skipped block needs its reason"
                        block.skip = arg.strip()
                    else:
                        raise AssertionError(f"{path}:{where}: unknown docs-test directive {kind!r}")
                blocks.append(block)
            else:
                assert not pending, f"{path}:{pending[0][2]}: docs-test directive before a non-Python block"
            pending = []
        elif line.strip() and pending:
            raise AssertionError(f"{path}:{pending[0][2]}: docs-test directive not right before a ```python block")
        i += 1
    assert not pending, f"{path}:{pending[0][2]}: docs-test directive at the end of the file"
    return blocks


def _start_server() -> tuple[subprocess.Popen, str]:
    """``python -m fastdiff serve`` on a free port of 127.0.0.1 (the digits network, one torch thread)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastdiff", "serve", "--port", "0", "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if "fastdiff serving on " not in line:
        proc.kill()
        raise AssertionError(f"fastdiff serve did not start: {line!r} {proc.stderr.read()}")
    return proc, line.split()[3]


def _run(source: str, path: str, line: int, namespace: dict) -> None:
    # Padded so that a traceback names the markdown file's own line numbers.
    exec(compile("\n" * (line - 1) + source, path, "exec"), namespace)


@pytest.mark.parametrize("doc", DOC_FILES)
def test_python_blocks_run(doc, tmp_path, monkeypatch, capsys):
    path = os.path.join(REPO, doc)
    blocks = parse(path)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_test_" + re.sub(r"\W", "_", doc)}
    server = None
    ran, skipped = 0, []
    start = time.perf_counter()
    try:
        for block in blocks:
            where = f"{doc}:{block.line}"
            if block.skip is not None:
                skipped.append(f"{where}: {block.skip}")
                continue
            for code in block.setup:
                _run(code, f"{path} (docs-test setup before line {block.line})", 1, namespace)
            code = block.code
            if block.server:
                if server is None:
                    server = _start_server()
                code = code.replace(SERVER_ADDRESS, server[1])
            _run(code, path, block.line, namespace)
            ran += 1
    finally:
        if server is not None:
            server[0].terminate()
            server[0].wait(60)
    with capsys.disabled():
        print(f"\n{doc}: {ran} python blocks ran, {len(skipped)} not run, {time.perf_counter() - start:.1f} s")
        for reason in skipped:
            print(f"  not run: {reason}")


def test_skipped_blocks_are_few():
    blocks = sum((parse(os.path.join(REPO, doc)) for doc in DOC_FILES), [])
    reasons = [block.skip for block in blocks if block.skip is not None]
    assert len(reasons) == SKIPS_ALLOWED, f"blocks not run: {reasons} (SKIPS_ALLOWED is {SKIPS_ALLOWED})"


@pytest.mark.parametrize("doc", DOC_FILES)
def test_relative_links_point_at_files(doc):
    path = os.path.join(REPO, doc)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # no links inside code blocks
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s)://, mailto: and anchors within the page
        file = target.split("#", 1)[0]
        if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(path), file))):
            broken.append(target)
    assert not broken, f"{doc} links to files that do not exist: {broken}"


def test_the_docs_have_examples():
    """The parser finds what it should (a regression guard for the test itself)."""
    assert len(parse(os.path.join(REPO, "README.md"))) >= 2
