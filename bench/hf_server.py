"""Hugging Face transformers as the no-reuse baseline: a minimal OpenAI-compatible streaming server.

    .venv/bin/python bench/hf_server.py --model path/to/model.gguf --port 8104 [--dtype float32]

One request at a time (an asyncio lock), each a fresh `model.generate` with its own KV cache: no batching and
no prefix reuse, which is what a user gets from transformers without a serving engine. Streams one SSE chunk per
generated token from a BaseStreamer on the generate thread; reports usage with cached_tokens = 0. Supports the
fields the bench client sends (model, prompt | messages, tools, max_tokens, temperature, stream, stream_options,
ignore_eos); greedy when temperature is 0. torch's threads follow OMP_NUM_THREADS (bench/peers.py sets it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer


class TokenStreamer(BaseStreamer):
    """Hands (text delta, tokens) to the event loop as each token arrives; None at the end."""

    def __init__(self, tokenizer, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.tokenizer, self.loop, self.queue = tokenizer, loop, queue
        self.ids: list[int] = []
        self.sent = ""
        self.pending = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        new = value.reshape(-1).tolist()
        self.ids += new
        self.pending += len(new)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # half of a multi-byte character: wait for the rest
        self._push((text[len(self.sent) :], self.pending))
        self.sent, self.pending = text, 0

    def end(self) -> None:
        if self.pending:
            self._push(("", self.pending))
        self._push(None)

    def _push(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class StopWhen(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        return self.event.is_set()


def build_app(model, tokenizer, name: str) -> FastAPI:
    app = FastAPI()
    lock = asyncio.Lock()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "transformers"}]}

    async def serve(body: dict, chat: bool):
        if chat:
            prompt = tokenizer.apply_chat_template(
                body["messages"], tools=body.get("tools"), add_generation_prompt=True, tokenize=False
            )
        else:
            prompt = body["prompt"]
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=not chat).input_ids  # (1, T)
        gen = _generate(model, tokenizer, lock, ids, body)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.get("stream"):
            usage = (body.get("stream_options") or {}).get("include_usage", False)
            return StreamingResponse(
                _sse(gen, rid, name, chat, (ids.shape[1], body.get("max_tokens") or 16), usage),
                media_type="text/event-stream",
            )
        text, n = "", 0
        async for piece, k in gen:
            text, n = text + piece, n + k
        choice = {"index": 0, "finish_reason": "length" if n >= (body.get("max_tokens") or 16) else "stop"}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": name, "choices": [choice],
                             "usage": _usage(ids.shape[1], n)})  # fmt: skip

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(await request.json(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(await request.json(), chat=True)

    return app


async def _generate(model, tokenizer, lock: asyncio.Lock, ids: torch.Tensor, body: dict):
    """Yields (text delta, tokens) while generate runs on a thread; the lock keeps one request at a time."""
    max_tokens = body.get("max_tokens") or 16
    temperature = body.get("temperature", 1.0)
    kwargs = dict(max_new_tokens=max_tokens, do_sample=bool(temperature), pad_token_id=tokenizer.eos_token_id)
    if temperature:
        kwargs.update(temperature=temperature, top_p=body.get("top_p", 1.0))
    if body.get("ignore_eos"):
        kwargs["min_new_tokens"] = max_tokens
    async with lock:
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        streamer = TokenStreamer(tokenizer, asyncio.get_running_loop(), queue)
        crit = StoppingCriteriaList([StopWhen(stop)])
        thread = threading.Thread(
            target=_run_generate, args=(model, ids, streamer, crit, kwargs, queue, asyncio.get_running_loop())
        )
        thread.start()
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()  # the client left: stop generating before the next request takes the lock
            await asyncio.to_thread(thread.join)


def _run_generate(model, ids, streamer, crit, kwargs, queue, loop) -> None:
    try:
        with torch.inference_mode():
            model.generate(
                ids, attention_mask=torch.ones_like(ids), streamer=streamer, stopping_criteria=crit, **kwargs
            )
    except BaseException as e:  # hand the failure to the request, and end its stream
        loop.call_soon_threadsafe(queue.put_nowait, e)


async def _sse(gen, rid: str, name: str, chat: bool, sizes: tuple[int, int], include_usage: bool):
    """The SSE stream; sizes = (prompt tokens, max_tokens)."""
    head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time())}
    head["model"] = name
    n = 0
    try:
        async for piece, k in gen:
            n += k
            choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
            yield f"data: {json.dumps({**head, 'choices': [{**choice, 'finish_reason': None}]})}\n\n"
        end = {"index": 0, "delta": {}} if chat else {"index": 0, "text": ""}
        end["finish_reason"] = "length" if n >= sizes[1] else "stop"
        yield f"data: {json.dumps({**head, 'choices': [end]})}\n\n"
        if include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(sizes[0], n)})}\n\n"
    except Exception as e:
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
    yield "data: [DONE]\n\n"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a .gguf file (dequantized by transformers) or an HF folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8104)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--served-model-name", default=None)
    args = p.parse_args()
    path = Path(args.model)
    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    where = str(path.parent) if kw else str(path)
    tokenizer = AutoTokenizer.from_pretrained(where, **kw)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=getattr(torch, args.dtype), **kw).eval()
    name = args.served_model_name or path.stem
    uvicorn.run(build_app(model, tokenizer, name), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
