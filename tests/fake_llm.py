"""A stdlib fake OpenAI-compatible model server for tests and benchmarks (loopback only, no real model).

- `GET /v1/models` lists the models the fixture bundles pin (plus `fake-model`);
- `POST /v1/chat/completions` answers plain or `stream=true` (SSE chunks);
- when tools are offered, the user's message names one of them and no tool result is in the
  conversation yet, it answers with a call of that tool (so a test chooses which agents call tools);
- `delay_s` makes every completion take that long (settable at run time: `POST /_control {"delay_s": 1}`);
- `fail_status` makes every completion answer that HTTP error status; `fail_next` makes the next that
  many fail at once (with `fail_status`, else 400, which the provider client does not retry itself);
- `answer_bytes` pads every plain answer to that many characters (`POST /_control {"answer_bytes": N}`);
- `GET /_stats` says how many completions were asked for, how many ran at once at most, how much
  time they spent inside the server (`served_s`) and when each began (`began`, epoch seconds);
  `POST /_control {"reset_max_in_flight": true}` restarts the high-water mark.

Run it alone with `python tests/fake_llm.py [port] [delay_s]`.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional

MODELS = ("gpt-5-mini", "qwen/qwen3-next-80b", "qwen/qwen3.6-35b-a3b", "fake-model")
ANSWER = "Hello from the fake model."


class _FakeLLMHandler(BaseHTTPRequestHandler):
    """One request to the fake server; `fake` (set per server by FakeLLM) holds the counters."""

    fake: "FakeLLM"
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms stalls

    def log_message(self, *args: Any) -> None:
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on a slow answer (a timeout under test): nothing to report

    def do_GET(self) -> None:  # noqa: N802
        fake = self.fake
        path = self.path.split("?", 1)[0].rstrip("/")
        if path.endswith("/models"):
            self._json({"object": "list", "data": [{"id": m, "object": "model", "owned_by": "fake"}
                                                    for m in MODELS]})
        elif path == "/_stats":
            with fake._lock:
                self._json({"calls": fake.calls, "in_flight": fake.in_flight,
                            "max_in_flight": fake.max_in_flight, "slept_s": fake.slept_s,
                            "served_s": sum(fake.durations), "began": fake.began})
        else:
            self._json({"error": {"message": "not found"}}, 404)

    def do_POST(self) -> None:  # noqa: N802
        fake = self.fake
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/_control":
            with fake._lock:
                fake.delay_s = float(body.get("delay_s", fake.delay_s))
                fake.answer_bytes = int(body.get("answer_bytes", fake.answer_bytes))
                if body.get("reset_max_in_flight"):
                    fake.max_in_flight = fake.in_flight
            self._json({"delay_s": fake.delay_s})
        elif path.endswith("/chat/completions"):
            self._complete(body)
        else:
            self._json({"error": {"message": "not found"}}, 404)

    def _json(self, data: Any, status: int = 200) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _complete(self, body: Dict[str, Any]) -> None:
        fake = self.fake
        began = time.perf_counter()
        with fake._lock:
            fake.began.append(time.time())
        try:
            self._answer(body)
        finally:
            with fake._lock:
                fake.durations.append(time.perf_counter() - began)

    def _answer(self, body: Dict[str, Any]) -> None:
        fake = self.fake
        with fake._lock:
            fake.calls += 1
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
            fake.requests.append(body)
            fake.started.notify_all()
            failing = fake.fail_next > 0
            fake.fail_next -= failing
        if failing:  # at once, whatever the delay
            with fake._lock:
                fake.in_flight -= 1
            self._json({"error": {"message": "the fake model is failing on purpose", "type": "server_error"}},
                       fake.fail_status or 400)
            return
        delay = fake.delay_s
        try:
            if delay:
                time.sleep(delay)
        finally:
            with fake._lock:
                fake.in_flight -= 1
                fake.slept_s += delay
        if fake.fail_status:
            self._json({"error": {"message": "the fake model is failing on purpose", "type": "server_error"}},
                       fake.fail_status)
            return
        message = reply_to(body)
        if fake.answer_bytes and not message.get("tool_calls"):
            message["content"] = message["content"].ljust(fake.answer_bytes, ".")
        model = str(body.get("model") or "fake-model")
        cid = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        finish = "tool_calls" if message.get("tool_calls") else "stop"
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        if not body.get("stream"):
            self._json({"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
                        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                        "usage": usage})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        delta: Dict[str, Any] = {"role": "assistant", "content": message.get("content") or ""}
        if message.get("tool_calls"):
            delta["tool_calls"] = [dict(tc, index=i) for i, tc in enumerate(message["tool_calls"])]
        for chunk in ({"delta": delta, "finish_reason": None}, {"delta": {}, "finish_reason": finish}):
            event = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                     "choices": [dict(chunk, index=0)]}
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True


class FakeLLM:
    """The server and its counters; `base_url` is what OPENAI_BASE_URL and friends point at."""

    def __init__(self, port: int = 0, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.fail_status = 0  # when set, completions answer this HTTP error status
        self.fail_next = 0  # the next this many completions fail (with `fail_status`, else 400)
        self.answer_bytes = 0  # when set, plain answers are padded to this many characters
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.slept_s = 0.0
        self.durations: List[float] = []  # seconds each completion took inside the server (delay included)
        self.began: List[float] = []  # time.time() when each completion began
        self.requests: List[Dict[str, Any]] = []
        self._lock = threading.Lock()
        self.started = threading.Condition(self._lock)  # notified when a completion begins

        handler = type("Handler", (_FakeLLMHandler,), {"fake": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.server.daemon_threads = True
        self.server.request_queue_size = 512
        self.port = self.server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "FakeLLM":
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def wait_for_call(self, count: int, timeout: float = 30.0) -> None:
        """Block until at least `count` completions have begun."""
        with self._lock:
            if not self.started.wait_for(lambda: self.calls >= count, timeout):
                raise AssertionError(f"the fake model got {self.calls} calls, expected {count}")

    def provider_env(self) -> Dict[str, str]:
        """Environment pointing every provider the fixtures use at this server."""
        return {"OPENAI_BASE_URL": self.base_url, "OPENAI_API_KEY": "sk-fake-not-a-key",
                "LMSTUDIO_BASE_URL": self.base_url,
                "OLLAMA_BASE_URL": f"http://127.0.0.1:{self.port}"}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def reply_to(body: Dict[str, Any]) -> Dict[str, Any]:
    """The assistant message: a call of an offered tool the user's message names (e.g. "use
    execute_command") while no tool result is in the conversation yet (or only one, when it says
    "TWICE": two tool steps); otherwise a plain answer."""
    messages = body.get("messages") or []
    last = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), {})
    content = last.get("content")
    text = content if isinstance(content, str) else json.dumps(content)
    tools = [str(t.get("function", t).get("name")) for t in body.get("tools") or [] if isinstance(t, dict)]
    answered = sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "tool")
    wanted = [name for name in tools if name in text]
    if wanted and answered < (2 if "TWICE" in text else 1):
        arguments = {"command": f"echo hello{answered or ''}"} if wanted[0] == "execute_command" else {}
        return {"role": "assistant", "content": "",
                "tool_calls": [{"id": f"call_{answered + 1}", "type": "function",
                                "function": {"name": wanted[0], "arguments": json.dumps(arguments)}}]}
    return {"role": "assistant", "content": f"{ANSWER} You said: {text[-200:]}"}


if __name__ == "__main__":
    server = FakeLLM(int(sys.argv[1]) if len(sys.argv) > 1 else 0,
                     float(sys.argv[2]) if len(sys.argv) > 2 else 0.0).start()
    print(server.base_url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.close()
