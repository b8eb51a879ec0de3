"""LLMEngine: the engine's one API. add_request / step / abort, the stats snapshot, the limits and names a
server checks, and the tokenizer; everything else (scheduler, KV cache, model runner, tiers, recurrent
state) is private to it.

step():  sched = scheduler.schedule()
         batch = build_batch(sched)                (a ModelBatch: the runner never sees a Request)
         out = runner.execute(batch)               (a failing batch is retried one request at a time,
         scheduler.update_after_step(sched)          so one bad request fails alone)
         append tokens, detokenize, check stops, free finished requests -> delta RequestOutputs
With speculative decoding (kvserve/spec/) running requests get draft tokens before schedule(); the step
verifies them and appends every confirmed token.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kvserve.batch import ScheduledRequest, SchedulerOutput
from kvserve.builder import build_parts, build_tiers
from kvserve.config import EngineConfig
from kvserve.errors import InvalidRequestError
from kvserve.kv.events import KVEventBatch, KVEventLog
from kvserve.model.backends import Backends
from kvserve.model.batch import ModelOutput
from kvserve.model.config import ModelConfig
from kvserve.model.loader import LoadedModel, load_model
from kvserve.model.tokenizer import Tokenizer
from kvserve.model_inputs import build_batch, record_prompt_logprobs
from kvserve.output_processor import TrackedOutput, append_token, make_output
from kvserve.outputs import RequestOutput
from kvserve.request import Request, RequestStatus
from kvserve.request_checks import check_request
from kvserve.sampling_params import SamplingParams
from kvserve.spec.drafter import SpeculativeConfig
from kvserve.spec.speculator import Speculator, confirmed
from kvserve.stats import EngineStats
from kvserve.stats_capture import capture_stats
from kvserve.structured import Constraints, GrammarCompiler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineLimits:
    """What bounds a request, for callers that check or default before they submit."""

    max_model_len: int  # context length: prompt + generated tokens
    kv_capacity_tokens: int  # tokens the whole KV pool holds
    vocab_size: int  # token ids are in [0, vocab_size)
    max_logprobs: int
    # sliding-window models: the most tokens' worth of blocks a request holds at once (blocks below every
    # window are given back while it runs); None: a request holds all its tokens' blocks
    kv_window_tokens: int | None = None


@dataclass(frozen=True)
class NewRequest:
    """One request for add_requests()."""

    prompt: str | list[int]
    params: SamplingParams
    request_id: str | None = None
    cache_salt: str | None = None


@dataclass
class _Counters:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_steps: int = 0
    num_failed_requests: int = 0
    num_failed_batches: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self._config = config
        self._loaded = loaded if loaded is not None else load_model(config.model)
        self._parts = parts = build_parts(config, self._loaded)
        self._scheduler, self._runner, self._recurrent = parts.scheduler, parts.runner, parts.recurrent
        self._tiers = build_tiers(config, self._loaded, parts)
        self._tokenizer = self._loaded.tokenizer
        self.eos_token_ids = tuple(self._loaded.config.eos_token_ids) or tuple(self._tokenizer.eos_token_ids)
        self._counters = _Counters()
        self._requests: dict[str, tuple[Request, TrackedOutput]] = {}
        self._ids = itertools.count()
        self._seeds = random.Random(config.seed)  # sampling seeds of requests that bring none
        self._spec = None
        if config.speculative is not None:
            if self._recurrent is not None:
                raise ValueError(
                    "speculative decoding needs an attention-only model: recurrent state cannot be rolled back"
                )
            self._spec = Speculator(SpeculativeConfig.parse(config.speculative))
        vocab = self._loaded.config.vocab_size
        self._structured = Constraints(GrammarCompiler(self._tokenizer, vocab, self.eos_token_ids))

    # ------------------------------------------------------------------------------------------ facts
    @property
    def config(self) -> EngineConfig:
        return self._config

    @property
    def model_config(self) -> ModelConfig:
        return self._loaded.config

    @property
    def backends(self) -> Backends:
        """The attention and linear arithmetic this engine runs (resolved once at start)."""
        return self._parts.backends

    @property
    def max_model_len(self) -> int:
        return self._parts.max_model_len

    @property
    def model_names(self) -> tuple[str, ...]:
        """Names the engine's model answers to: the name it was asked to load, and the model's own."""
        return (self._config.model, self._loaded.name)

    def limits(self) -> EngineLimits:
        return EngineLimits(
            self.max_model_len,
            self._parts.num_blocks * self._config.block_size,
            min(self.model_config.vocab_size, self._tokenizer.vocab_size),
            self._config.max_logprobs,
            self._window_tokens(),
        )

    def _window_tokens(self) -> int | None:
        window = self._parts.kv.window
        if window is None:
            return None
        c = self._config  # one step computes at most a chunk, which may begin in a partly filled block
        return window + (c.long_prefill_token_threshold or c.max_num_batched_tokens) + 2 * c.block_size

    def get_tokenizer(self) -> Tokenizer:
        """The model's tokenizer, with its chat template (thread-safe: callers may tokenize off the engine's
        thread)."""
        return self._tokenizer

    def get_stats(self) -> EngineStats:
        """A snapshot of every counter and gauge (call on the engine's thread; read it anywhere)."""
        return capture_stats(self._parts, self._tiers, self._counters, self._spec)

    def num_waiting_requests(self) -> int:
        return len(self._scheduler.waiting)

    def has_unfinished_requests(self) -> bool:
        return self._scheduler.num_unfinished > 0

    def check_invariants(self) -> None:
        """Assert the KV pool's and cache manager's invariants (no leaked, double-freed or shared-mutable
        block; ref counts equal block-table references). For tests and debugging."""
        self._parts.kv.check_invariants()

    @property
    def block_size(self) -> int:
        """Tokens per KV block: the unit of the prefix cache's hash chain (kvserve/kv/hashing.py)."""
        return self._config.block_size

    def drain_kv_events(self) -> KVEventBatch | None:
        """Blocks the prefix cache stored and removed since the last call (kvserve/kv/events.py), or None when
        nothing changed. The first call turns recording on (its batch says `reset`: start from nothing)."""
        pool = self._parts.pool
        if pool.events is None:
            pool.events = KVEventLog()
        return pool.events.drain()

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no request holds (benchmarks measuring cold prefill)."""
        self._parts.pool.reset_prefix_cache()

    def flush_kv_store(self, timeout: float = 30.0) -> bool:
        """Wait for pending writes to the persistent KV store; False if they did not finish in time."""
        return self._tiers.flush(timeout) if self._tiers is not None else True

    def shutdown(self) -> None:
        """Finish pending writes to the persistent KV store. The engine stays usable."""
        self.flush_kv_store()

    # ------------------------------------------------------------------------------------------ requests
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        cache_salt: str | None = None,
    ) -> str:
        """Validate and queue one request (params.n is handled by the APIs above); returns its id. Raises
        InvalidRequestError (a ValueError) and queues nothing when the request cannot be served."""
        return self.add_requests([NewRequest(prompt, params or SamplingParams(), request_id, cache_salt)])[0]

    def add_requests(self, requests: Sequence[NewRequest]) -> list[str]:
        """Queue all of them or none: each is validated (once) before any is queued."""
        ids: list[str] = []
        checked: list[tuple[NewRequest, list[int], str]] = []
        encoded: dict[str, list[int]] = {}  # a string prompt shared by several requests (n > 1) is encoded once
        for new in requests:
            rid = new.request_id if new.request_id is not None else f"req-{next(self._ids)}"
            if rid in self._requests or rid in ids:
                raise InvalidRequestError(f"request id {rid!r} is already in use", param="request_id")
            prompt = new.prompt
            if isinstance(prompt, str):
                prompt = encoded[prompt] if prompt in encoded else encoded.setdefault(prompt, self._encode(prompt))
            spec = new.params.structured_outputs
            grammar = None if spec is None else self._structured.compiler.compile(spec)
            checked.append((new, self._check(prompt, new.params), rid, grammar))
            ids.append(rid)
        for new, token_ids, rid, grammar in checked:
            request = Request(
                rid,
                token_ids,
                new.params,
                eos_token_ids=self.eos_token_ids,
                max_model_len=self.max_model_len,
                cache_salt=new.cache_salt,
                sampling_seed=new.params.seed if new.params.seed is not None else self._seeds.getrandbits(63),
            )
            if self._spec is not None:
                self._spec.add(request)
            if grammar is not None:
                self._structured.add(rid, grammar)
            prompt_text = new.prompt if isinstance(new.prompt, str) else None
            self._requests[rid] = (request, TrackedOutput.for_request(request, prompt_text))
            self._scheduler.add_request(request)
            self._counters.prompt_tokens += len(token_ids)
        return ids

    def _encode(self, prompt: str) -> list[int]:
        return self._tokenizer.encode(prompt)

    def _check(self, prompt: list[int], params: SamplingParams) -> list[int]:
        return check_request(prompt, params, self.limits(), self._parts.num_blocks)

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks at once. Returns False if it is unknown or finished."""
        entry = self._requests.pop(request_id, None)
        if entry is None:
            return False
        self._scheduler.finish_request(entry[0], RequestStatus.FINISHED_ABORTED)
        self._release(request_id)
        return True

    # ---------------------------------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; returns the delta outputs of requests that produced a token or finished."""
        if self._spec is not None:
            self._spec.propose(self._scheduler.running)
        sched = self._scheduler.schedule()
        if sched.is_empty:
            return []
        self._counters.num_steps += 1
        t0 = time.perf_counter()
        masks, dead = {}, {}
        if self._structured:  # constrained requests are running: their masks for the rows that sample
            masks, dead = self._structured.masks([s.request.request_id for s in sched.scheduled if s.samples])
        sampled, failed = self._execute(sched, masks)
        failed += [(self._requests[rid][0], f"structured output: {why}") for rid, why in dead.items()]
        if self._spec is not None:
            self._spec.observe_step(sched.num_batched_tokens, time.perf_counter() - t0)
        # A failed request's KV may be garbage: finish it before its blocks could be published.
        outputs = [self._fail(r, err) for r, err in failed]
        sched.scheduled = [s for s in sched.scheduled if not s.request.is_finished]
        self._scheduler.update_after_step(sched)
        for s in sched.scheduled:
            results = sampled.get(s.request.request_id)
            if results is not None and not s.request.is_finished:
                outputs.append(self._append(s, results))
        return outputs

    def _run(self, scheduled: list[ScheduledRequest], masks: dict) -> ModelOutput:
        """One forward over these requests; on success their prompt logprobs and recurrent states are kept."""
        batch = build_batch(scheduled, self._recurrent, masks)
        out = self._runner.execute(batch)
        record_prompt_logprobs(batch, out, {s.request.request_id: s.request for s in scheduled})
        if self._recurrent is not None:
            by_id = {s.request.request_id: s for s in scheduled}
            ordered = [by_id[rid] for rid in out.state_order]
            self._recurrent.commit([s.request for s in ordered], [s.end for s in ordered], out.conv, out.ssm)
        return out

    def _execute(self, sched: SchedulerOutput, masks: dict) -> tuple[dict, list[tuple[Request, str]]]:
        """Each request's samples (one, or one per draft more), and the requests that failed."""
        try:
            return _samples(self._run(sched.scheduled, masks)), []
        except Exception:  # noqa: BLE001 - retried one by one below to find the culprit
            self._counters.num_failed_batches += 1
            log.exception("batch of %d requests failed; retrying them one at a time", len(sched.scheduled))
        sampled: dict = {}
        failed: list[tuple[Request, str]] = []
        for s in sched.scheduled:
            try:
                sampled.update(_samples(self._run([s], masks)))
            except Exception as e:  # noqa: BLE001 - this request fails alone
                log.exception("request %s failed", s.request.request_id)
                failed.append((s.request, f"{type(e).__name__}: {e}"))
        return sampled, failed

    def _fail(self, request: Request, error: str) -> RequestOutput:
        request.error = error
        self._counters.num_failed_requests += 1
        request.status = RequestStatus.FINISHED_ERROR
        return self._finish(request, "")

    def _append(self, s: ScheduledRequest, results: list) -> RequestOutput:
        """Append the step's sampled token (with drafts: every confirmed one, until a stop)."""
        request = s.request
        tracked = self._requests[request.request_id][1]
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        texts, appended = [], []
        for result in confirmed(request.draft_token_ids[: s.num_drafts], results) if s.num_drafts else results:
            texts.append(append_token(self._tokenizer, request, tracked, result))
            appended.append(result.token_id)
            if request.is_finished:
                break
        self._counters.generation_tokens += len(appended)
        self._structured.accept(request.request_id, appended)
        if self._spec is not None:
            accepted = self._spec.record(request, s.num_drafts, appended)
            if not request.is_finished:
                self._scheduler.accept_drafts(request, accepted)
        if request.is_finished:
            return self._finish(request, "".join(texts))
        return make_output(request, tracked, "".join(texts))

    def _finish(self, request: Request, text: str) -> RequestOutput:
        status = request.status
        self._scheduler.finish_request(request, status)
        tracked = self._requests.pop(request.request_id)[1]
        self._release(request.request_id)
        return make_output(request, tracked, text)

    def _release(self, request_id: str) -> None:
        self._runner.release(request_id)
        self._structured.release(request_id)
        if self._spec is not None:
            self._spec.finish(request_id)


def _samples(out: ModelOutput) -> dict[str, list]:
    return {rid: [sample, *out.draft_samples.get(rid, ())] for rid, sample in out.samples.items()}
