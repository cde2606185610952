"""Latency of `perfusion lsp`: how long after an edit of a 500-line spec its diagnostics
arrive, through a real server process, beside the compiler alone on the same text.

    .venv/bin/python bench/lsp_latency.py [--lines 500] [--repeat 20]

The spec: a `let` list, one `learn` on a real image, and generate statements (with a slot,
a count and options) up to `--lines` lines. Each edit changes the value of the option on
line 3, to a number of 1 to 4 digits (so the rest of the file moves), and saves (`didSave`
checks at once; typing waits DEBOUNCE_SECONDS more, printed beside). Printed, the median
and the 90th percentile of:

- `compile_paths` of the document as an editor's buffer, in this process (parsed
  statement by statement), beside the same text read from disk as `perfusion check`
  reads it (parsed whole);
- the server: from sending the edit to receiving its `publishDiagnostics`;
- the server again, for edits that leave a syntax error on that line (half-typed text:
  the error is found by a whole-file parse, the rest re-parsed by statement).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image

from perfusion_dsl.compiler import compile_paths
from perfusion_dsl.lsp import DEBOUNCE_SECONDS


def spec(lines: int, steps: int | str) -> str:
    head = ["let places = [left, right, top, bottom]",
            "learn images/*.png as moon* <crescent> {", f"  steps: {steps}", "}"]
    body = []
    while len(head) + len(body) < lines:
        i = len(body) // 4
        body += [f'generate "a moon* at the {{places}} number {i}" x 2 {{', "  seed: 3",
                 "  strength: [0.4, 0.6]", "}"]
    return "\n".join(head + body)[: 10**7] + "\n"


class Client:
    """A bare JSON-RPC client on the server's pipes."""

    def __init__(self, root: Path) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "perfusion_dsl", "lsp"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.request("initialize", {"capabilities": {}, "rootUri": root.as_uri()}, 1)
        self.notify("initialized", {})

    def send(self, message: dict[str, Any]) -> None:
        body = json.dumps({"jsonrpc": "2.0", **message}).encode()
        assert self.process.stdin is not None
        self.process.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.process.stdin.flush()

    def notify(self, method: str, params: dict[str, Any]) -> None:
        self.send({"method": method, "params": params})

    def request(self, method: str, params: dict[str, Any], ident: int) -> Any:
        self.send({"id": ident, "method": method, "params": params})
        while True:
            message = self.read()
            if message.get("id") == ident:
                return message.get("result")

    def read(self) -> dict[str, Any]:
        stream = self.process.stdout
        assert stream is not None
        length = 0
        while (line := stream.readline().strip()):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        return json.loads(stream.read(length))  # type: ignore[no-any-return]

    def diagnostics_for(self, uri: str) -> list[Any]:
        while True:
            message = self.read()
            if message.get("method") == "textDocument/publishDiagnostics" and \
                    message["params"]["uri"] == uri:
                return message["params"]["diagnostics"]  # type: ignore[no-any-return]

    def close(self) -> None:
        self.request("shutdown", {}, 2)
        self.notify("exit", {})
        self.process.wait(timeout=10)


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return f"median {statistics.median(ordered) * 1000:6.1f} ms, p90 {p90 * 1000:6.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "images").mkdir()
        Image.new("RGB", (64, 64), (200, 120, 30)).save(root / "images" / "1.png")
        path = root / "big.concept"
        path.write_text(spec(args.lines, 100), encoding="utf-8")
        uri = path.as_uri()
        texts = [spec(args.lines, 10 ** (i % 4) + i) for i in range(args.repeat)]
        broken = [spec(args.lines, f"{i}{{") for i in range(args.repeat)]
        compile_paths([path], overlay={path: texts[-1]})  # builds the parser
        alone: dict[str, list[float]] = {"buffer": [], "disk": []}
        for text in texts:
            start = time.perf_counter()
            comp = compile_paths([path], overlay={path: text})
            alone["buffer"].append(time.perf_counter() - start)
            assert not comp.diagnostics, comp.diagnostics[:1]
            path.write_text(text, encoding="utf-8")
            start = time.perf_counter()
            compile_paths([path])  # as `perfusion check` reads it: parsed whole
            alone["disk"].append(time.perf_counter() - start)
        client = Client(root)
        client.notify("textDocument/didOpen", {"textDocument": {
            "uri": uri, "languageId": "perfusion", "version": 1,
            "text": path.read_text("utf-8")}})
        client.diagnostics_for(uri)  # the first check also builds the parser
        version = 1
        served: dict[str, list[float]] = {"valid": [], "broken": []}
        for i in range(args.repeat):
            for kind, text in (("valid", texts[i]), ("broken", broken[i])):
                version += 1
                start = time.perf_counter()
                client.notify("textDocument/didChange", {
                    "textDocument": {"uri": uri, "version": version},
                    "contentChanges": [{"text": text}]})
                client.notify("textDocument/didSave", {"textDocument": {"uri": uri}})
                found = client.diagnostics_for(uri)
                served[kind].append(time.perf_counter() - start)
                assert (found == []) == (kind == "valid"), found[:1]
        client.close()
    lines = spec(args.lines, 100).count("\n")
    print(f"a {lines}-line spec, {args.repeat} edits of each kind on line 3")
    print(f"  compile_paths of the buffer here:   {percentiles(alone['buffer'])}")
    print(f"  the same from disk (parsed whole):  {percentiles(alone['disk'])}")
    print(f"  server, edit + save to diagnostics:  {percentiles(served['valid'])}")
    print(f"  the same, edits with a syntax error: {percentiles(served['broken'])}")
    print(f"  (while typing, the server waits {DEBOUNCE_SECONDS * 1000:.0f} ms after the last "
          "keystroke first)")


if __name__ == "__main__":
    main()
