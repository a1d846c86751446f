"""Every curl command in README.md and docs/server.md works as written against `radixrt serve`.

Each bash block runs under `set -e` with $B pointing at a default-model server started without an
API key (as the docs start it), and curl made to fail on an HTTP error. A `# -> text` comment in a
block is the documented output: it must appear in what the block printed.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from server_process import running_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CURL = 'curl() { command curl -sS --fail-with-body --max-time 120 "$@"; echo; }\n'


def curl_blocks() -> list[tuple[str, str]]:
    """(id, script) for each bash block that calls the server; README's starts the server itself."""
    blocks = []
    for doc in ("README.md", "docs/server.md"):
        text = (ROOT / doc).read_text()
        for n, block in enumerate(re.findall(r"```bash\n(.*?)```", text, re.S)):
            if "curl " not in block:
                continue
            lines = [line for line in block.splitlines() if not line.startswith("radixrt serve")]
            script = "\n".join(lines).replace("127.0.0.1:30000", "$B_HOSTPORT")
            blocks.append((f"{doc}#{n}", script))
    return blocks


BLOCKS = curl_blocks()


@pytest.fixture(scope="module")
def server():
    with running_server("--kv-memory-gb", "0.25", api_key=None) as s:
        yield s


def test_docs_have_curl_examples():
    assert len(BLOCKS) >= 8, [name for name, _ in BLOCKS]


@pytest.mark.parametrize("name,script", BLOCKS, ids=[name for name, _ in BLOCKS])
def test_curl_block_runs_as_documented(server, name, script):
    env = {"B": server.url, "B_HOSTPORT": server.url.removeprefix("http://"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        ["bash", "-c", "set -e\n" + CURL + script], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    replies = [line for line in done.stdout.splitlines() if line.strip()]
    assert replies, done.stderr
    for reply in replies:
        if reply.startswith("{"):
            body = json.loads(reply)
            assert "error" not in body, body
    printed = squeeze(done.stdout)
    for fragment in documented_output(script):
        assert squeeze(fragment) in printed, (fragment, done.stdout[-3000:])


def squeeze(text: str) -> str:
    """Compare JSON text without caring about spaces or escaping."""
    return re.sub(r"[\s\\]", "", text)


def documented_output(script: str) -> list[str]:
    """The `# -> ...` comment (with its `#    ...` continuation lines) split at each `…`: each piece is exact."""
    shown, inside = [], False
    for line in script.splitlines():
        if line.startswith("# -> "):
            shown.append(line[5:])
            inside = True
        elif inside and line.startswith("#  "):
            shown[-1] += " " + line[1:].strip()
        else:
            inside = False
    return [piece for text in shown for piece in text.split("…") if piece.strip()]
