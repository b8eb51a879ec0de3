"""LLMEngine: add_request / step / abort, connecting Scheduler -> ModelRunner -> sampling -> requests.

step():  out = scheduler.schedule()
         sampled = runner.execute(out)          (a failing batch is retried one request at a time,
         scheduler.update_after_step(out)        so one bad request fails alone)
         append tokens, detokenize, check stops, free finished requests
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

from kvserve.batch import SchedulerOutput
from kvserve.config import EngineConfig
from kvserve.detokenizer import DetokenizerState, add_token, find_stop
from kvserve.kv.block_pool import BlockPool
from kvserve.kv.cache_manager import KVCacheManager
from kvserve.kv.eviction import make_policy, recompute_cost
from kvserve.kv.tiers import TieredCache, model_fingerprint, open_store
from kvserve.model import native
from kvserve.model.device import keep_freed_memory_mapped, resolve_device, resolve_dtype
from kvserve.model.hybrid import HybridModel
from kvserve.model.hybrid_runner import make_hybrid_runner
from kvserve.model.llama import LlamaModel
from kvserve.model.loader import LoadedModel, load_model
from kvserve.model.runner import ModelRunner, kv_bytes_per_block
from kvserve.model.sampler import SampleResult
from kvserve.outputs import CompletionOutput, RequestOutput
from kvserve.recurrent.state_pool import state_bytes_per_slot
from kvserve.request import Request, RequestStatus
from kvserve.sampling_params import SamplingParams
from kvserve.scheduler import Scheduler, SchedulerLimits

log = logging.getLogger(__name__)

# A purely recurrent model's blocks hold no KV, only prefix-cache addresses (for state checkpoints).
_RECURRENT_ONLY_BLOCKS = 16384


@dataclass
class EngineStats:
    """Counters since start, read by the metrics layer."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_steps: int = 0
    num_failed_requests: int = 0
    num_failed_batches: int = 0  # steps whose batch raised and was retried one request at a time


@dataclass
class _Tracked:
    request: Request
    prompt: str | None
    detok: DetokenizerState


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self.config = config
        self.loaded = loaded if loaded is not None else load_model(config.model)
        self.model_config = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            keep_freed_memory_mapped()
        self.dtype = resolve_dtype(config.dtype, self.device)
        model_max = self.model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > model_max:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's context length {model_max}")
        self.max_model_len = config.max_model_len or model_max
        per_block = kv_bytes_per_block(self.model_config, config.block_size, self.dtype)
        slot_bytes = self._state_slot_bytes()  # the recurrent state slots share the KV budget
        budget = config.kv_cache_bytes - slot_bytes
        if budget < 0 and config.num_kv_blocks is None:
            raise ValueError(
                f"kv_cache_memory {config.kv_cache_bytes} B cannot hold the recurrent state of max_num_seqs="
                f"{config.max_num_seqs} sequences ({slot_bytes} B); raise kv_cache_memory or lower max_num_seqs"
            )
        self.num_blocks = config.num_kv_blocks or (budget // per_block if per_block else _RECURRENT_ONLY_BLOCKS)
        if self.num_blocks < 1:
            after = f" after the recurrent state slots ({slot_bytes} B)" if slot_bytes else ""
            raise ValueError(f"kv_cache_memory {config.kv_cache_bytes} B holds no KV block of {per_block} B{after}")
        if per_block and self.num_blocks * config.block_size < self.max_model_len:
            log.warning(
                "the KV pool holds %d tokens (%d blocks), less than max_model_len %d: a request that could need "
                "more (prompt + max_tokens) is refused with a clear error; vLLM refuses such a configuration",
                self.num_blocks * config.block_size,
                self.num_blocks,
                self.max_model_len,
            )
        model_cls = HybridModel if self.model_config.is_hybrid else LlamaModel
        self.model = model_cls(self.model_config, self.loaded.weights, self.dtype, self.device, self.max_model_len)
        cost_args = {"cost": self._recompute_cost(), "block_bytes": max(per_block, 1)}  # 0 B: recurrent-only
        policy = make_policy(config.eviction_policy, **(cost_args if config.eviction_policy == "cost-aware" else {}))
        self.pool = BlockPool(self.num_blocks, enable_caching=config.enable_prefix_caching, policy=policy)
        self.kv = KVCacheManager(self.pool, config.block_size, enable_caching=config.enable_prefix_caching)
        limits = SchedulerLimits(
            config.max_num_batched_tokens, config.max_num_seqs, config.long_prefill_token_threshold
        )
        self.scheduler = Scheduler(limits, self.kv)
        if self.model_config.is_hybrid:  # recurrent state slots, checkpoints, scheduler hooks
            # The checkpoint store's default: a quarter of --kv-cache-memory (or of its default), also when
            # --num-kv-blocks sizes the pool: snapshots are far larger than KV blocks, and a small test pool
            # should not starve them.
            checkpoint_bytes = config.checkpoint_memory
            if checkpoint_bytes is None:
                checkpoint_bytes = config.kv_cache_bytes // 4
            self.runner = make_hybrid_runner(config, self.model, self.num_blocks, checkpoint_bytes)
            self.scheduler.recurrent = self.runner.recurrent
        else:
            if config.checkpoint_policy.strip().lower() != "none" or config.checkpoint_memory is not None:
                log.warning("checkpoint_policy / checkpoint_memory apply to hybrid and recurrent models; ignored here")
            self.runner = ModelRunner(self.model, self.num_blocks, config.block_size, seed=config.seed)
        self.tiers = self._make_tiers()
        self.eos_token_ids = tuple(self.model_config.eos_token_ids) or tuple(self.tokenizer.eos_token_ids)
        self.stats = EngineStats()
        self._requests: dict[str, _Tracked] = {}
        self._ids = itertools.count()

    def _state_slot_bytes(self) -> int:
        """Bytes of the recurrent state pool (one slot per running sequence); 0 for attention-only models."""
        c = self.model_config
        if not c.is_hybrid or c.mamba is None:
            return 0
        return self.config.max_num_seqs * state_bytes_per_slot(len(c.recurrent_layers), c.mamba, self.dtype)

    def _recompute_cost(self):
        """Cost of recomputing a block at a depth, for the cost-aware policy: linear layers + attention."""
        c = self.model_config
        h, d, layers = c.hidden_size, c.head_dim, c.num_hidden_layers
        per_layer = h * d * (2 * c.num_attention_heads + 2 * c.num_key_value_heads) + 3 * h * c.intermediate_size
        linear = 2 * (layers * per_layer + h * c.vocab_size)  # FLOPs per token
        attention = 4 * layers * c.num_attention_heads * d  # FLOPs per token per context token
        return recompute_cost(attention / linear, self.config.block_size)

    def _make_tiers(self) -> TieredCache | None:
        """Host-RAM and persistent tiers under the pool (--cpu-offload-gb, --kv-store), or None."""
        cfg = self.config
        if not cfg.enable_prefix_caching or (cfg.cpu_offload_gb <= 0 and not cfg.kv_store):
            return None
        store = open_store(cfg.kv_store, cfg.kv_store_max_bytes) if cfg.kv_store else None
        fingerprint = getattr(self.loaded, "_kv_fingerprint", None)  # hashing every weight: once per model
        if fingerprint is None:
            fingerprint = model_fingerprint(self.model_config, self.loaded.weights)
            self.loaded._kv_fingerprint = fingerprint
        dtype = str(self.dtype).removeprefix("torch.")
        namespace = f"{fingerprint}-b{cfg.block_size}-{dtype}-{native.arithmetic_tag(self.device, self.dtype)}"
        tiers = TieredCache(self.runner.kv_cache, namespace, int(cfg.cpu_offload_gb * (1 << 30)), store)
        self.pool.on_evict = tiers.on_evict
        self.kv.tiers = tiers
        log.info("KV tiers under the pool: %s (namespace %s)", ", ".join(tiers.tiers), namespace)
        return tiers

    def shutdown(self) -> None:
        """Finish pending writes to the persistent KV store and close it. The engine stays usable."""
        if self.tiers is not None:
            self.tiers.flush()

    # ------------------------------------------------------------------------------------------ requests
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        cache_salt: str | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
    ) -> Request:
        """Validate and queue one request (params.n is handled by the APIs above). Raises ValueError.
        `prompt_token_ids`: the string prompt's ids from validate(), so it is not tokenized again."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if prompt_token_ids is None:
            token_ids = self.validate(prompt, params)
        else:
            token_ids = [int(t) for t in prompt_token_ids]
            self._validate(token_ids, params)
        request = Request(
            request_id,
            token_ids,
            params,
            eos_token_ids=self.eos_token_ids,
            max_model_len=self.max_model_len,
            cache_salt=cache_salt,
        )
        self._requests[request_id] = _Tracked(
            request,
            prompt if isinstance(prompt, str) else None,
            DetokenizerState.after_prompt(token_ids, skip_special_tokens=params.skip_special_tokens),
        )
        self.scheduler.add_request(request)
        self.stats.prompt_tokens += len(token_ids)
        return request

    def validate(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """The prompt's token ids, once it passed add_request's checks (ValueError otherwise); queues nothing, so
        a request of several prompts can be refused whole before any of them counts as accepted."""
        token_ids = self.tokenize(prompt)
        self._validate(token_ids, params)
        return token_ids

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        n = len(token_ids)
        if n == 0:
            raise ValueError("the prompt is empty; it must contain at least one token")
        if n >= self.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens, but the model's context length (max_model_len) is "
                f"{self.max_model_len}: at most {self.max_model_len - 1} prompt tokens leave room "
                "for one generated token"
            )
        bad = [t for t in token_ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.model_config.vocab_size})")
        vocab = self.model_config.vocab_size
        for what, ids in (("stop token id", params.stop_token_ids), ("logit_bias token id", params.logit_bias or ())):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"{what} {bad[0]} is outside the vocabulary [0, {vocab})")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > self.config.max_logprobs:
                raise ValueError(f"{name} {k} exceeds max_logprobs {self.config.max_logprobs}")
        total = min(n + (params.max_tokens or self.max_model_len), self.max_model_len)
        capacity = self.num_blocks * self.config.block_size
        if total > capacity:
            raise ValueError(
                f"the request needs up to {total} tokens of KV (prompt {n} + max_tokens), but the "
                f"KV cache holds {capacity} tokens ({self.num_blocks} blocks); lower max_tokens "
                "or raise kv_cache_memory"
            )

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks at once. Returns False if it is unknown or finished."""
        tracked = self._requests.pop(request_id, None)
        if tracked is None:
            return False
        self.scheduler.finish_request(tracked.request, RequestStatus.FINISHED_ABORTED)
        self.runner.release(request_id)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ---------------------------------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; returns the outputs of requests that produced a token or finished."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        self.stats.num_steps += 1
        sampled, failed = self._execute(sched)
        # A failed request's KV may be garbage: finish it before its blocks could be published.
        outputs = [self._fail(r, err) for r, err in failed]
        sched.scheduled = [s for s in sched.scheduled if not s.request.is_finished]
        self.scheduler.update_after_step(sched)
        for s in sched.scheduled:
            result = sampled.get(s.request.request_id)
            if result is not None and not s.request.is_finished:
                outputs.append(self._append(s.request, result))
        return outputs

    def _execute(self, sched: SchedulerOutput) -> tuple[dict[str, SampleResult], list[tuple[Request, str]]]:
        try:
            return self.runner.execute(sched), []
        except Exception:  # noqa: BLE001 - retried one by one below to find the culprit
            self.stats.num_failed_batches += 1
            log.exception("batch of %d requests failed; retrying them one at a time", len(sched.scheduled))
        sampled: dict[str, SampleResult] = {}
        failed: list[tuple[Request, str]] = []
        for s in sched.scheduled:
            try:
                sampled.update(self.runner.execute(SchedulerOutput([s])))
            except Exception as e:  # noqa: BLE001 - this request fails alone
                log.exception("request %s failed", s.request.request_id)
                failed.append((s.request, f"{type(e).__name__}: {e}"))
        return sampled, failed

    def _fail(self, request: Request, error: str) -> RequestOutput:
        request.error = error
        self.stats.num_failed_requests += 1
        return self._finish(request, RequestStatus.FINISHED_ERROR)

    def _append(self, request: Request, result: SampleResult) -> RequestOutput:
        tracked = self._requests[request.request_id]
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        request.append_output_token(result.token_id, result.logprob)
        if result.top_logprobs is not None:
            request.output_top_logprobs.append(result.top_logprobs)
        self.stats.generation_tokens += 1
        status = request.check_stop()
        params = request.sampling_params
        if status == RequestStatus.FINISHED_STOPPED and not params.include_stop_str_in_output:
            new_text = ""  # an EOS or stop token id ended it: its text is not part of the output (as in vLLM)
        else:
            new_text = add_token(self.tokenizer, tracked.detok, result.token_id)
        stops = request.sampling_params.stop
        if stops and new_text:
            hit = find_stop(tracked.detok.text, len(new_text), stops)
            if hit is not None:
                stop, start = hit
                keep = start + len(stop) if request.sampling_params.include_stop_str_in_output else start
                tracked.detok.text = tracked.detok.text[:keep]
                request.stop_reason = stop
                status = RequestStatus.FINISHED_STOPPED
        if status is not None:
            return self._finish(request, status)
        return self._output(request)

    def _finish(self, request: Request, status: RequestStatus) -> RequestOutput:
        self.scheduler.finish_request(request, status)
        out = self._output(request)
        self._requests.pop(request.request_id, None)
        self.runner.release(request.request_id)
        return out

    def _output(self, request: Request) -> RequestOutput:
        tracked = self._requests[request.request_id]
        params = request.sampling_params
        logprobs = list(request.output_logprobs) if params.logprobs is not None else None
        completion = CompletionOutput(
            index=0,
            text=tracked.detok.text,
            token_ids=list(request.output_token_ids),
            cumulative_logprob=sum(logprobs) if logprobs is not None else None,
            logprobs=logprobs,
            top_logprobs=list(request.output_top_logprobs) if params.logprobs else None,
            finish_reason=request.status.value if request.is_finished else None,
            stop_reason=request.stop_reason,
        )
        return RequestOutput(
            request_id=request.request_id,
            prompt=tracked.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=[completion],
            finished=request.is_finished,
            num_cached_tokens=request.num_cached_tokens or 0,
            num_prompt_tokens_computed=request.num_prompt_tokens_computed,
            error=request.error,
            **_prompt_logprobs(request),
        )


def _prompt_logprobs(request: Request) -> dict:
    """RequestOutput's prompt logprob fields, once all are computed (None when not asked for)."""
    k = request.sampling_params.prompt_logprobs
    if k is None or request.needs_prompt_logprobs:
        return {}
    return {  # the request's own lists, not copies: complete, so never appended to again (O(1) per step)
        "prompt_logprobs": request.prompt_logprobs,
        "prompt_top_logprobs": request.prompt_top_logprobs if k > 0 else None,
    }
