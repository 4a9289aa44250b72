"""A local OpenAI-compatible chat-completions server standing in for an LLM judge.

It reads the JSON input ragas puts at the end of each prompt and answers in the
shape that prompt asks for: every statement of an answer is one claim, every
claim is supported by the context, and the generated question for
answer_relevancy is the answer's first sentence turned into a question.
Modes: "ok", "malformed" (answers that are not JSON), "slow" (sleeps past the
client's timeout), "delayed" (sleeps `delay` seconds, then answers as "ok": a
judge that takes its time, for tests that act while scoring is under way).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LocalHTTPServer(ThreadingHTTPServer):
    """A threaded HTTP server for the stand-in judges, with a listen backlog for ragas' concurrency.

    socketserver's default backlog is 5: ragas opens up to 16 connections at once (its executor's
    max_workers), and on a fast machine the ones past the backlog failed to connect
    ("OpenAIConnectionError"), scored as "judge unreachable".
    """

    request_queue_size = 128
    daemon_threads = True


def _last_input(prompt: str) -> dict:
    marker = prompt.rfind("input: ")
    if marker < 0:
        return {}
    try:
        value, _ = json.JSONDecoder().raw_decode(prompt[marker + len("input: "):])
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def judge_answer(prompt: str) -> dict:
    data = _last_input(prompt)
    if "statements" in data and "context" in data:
        return {"statements": [{"statement": s, "reason": "stated in the context", "verdict": 1} for s in data["statements"]]}
    if "answer" in data and "question" in data:
        sentences = [s.strip() + "." for s in data["answer"].split(".") if s.strip()]
        return {"statements": sentences or [data["answer"]]}
    if "response" in data:
        first = data["response"].split(".")[0].strip()
        return {"question": f"What about {first}?", "noncommittal": 0}
    return {"text": "unsupported prompt"}


class JudgeServer:
    def __init__(self, mode: str = "ok", delay: float = 5.0) -> None:
        self.mode = mode
        self.delay = delay
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                server.requests += 1
                if server.mode in ("slow", "delayed"):
                    time.sleep(server.delay)
                prompt = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
                content = "this is not json {" if server.mode == "malformed" else json.dumps(judge_answer(prompt))
                n = int(body.get("n") or 1)
                reply = {
                    "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()), "model": body.get("model", "judge"),
                    "choices": [{"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"} for i in range(n)],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
                }
                payload = json.dumps(reply).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = LocalHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> JudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
