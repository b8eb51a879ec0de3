"""The engine on a CUDA GPU against transformers on the same GPU and weights (a device check, not a CI test).

    python bench/cuda_check.py --model PATH.gguf [--device cuda] [--out cuda_check.json]

CI machines have no GPU, so this runs where one is lent. It reports (and writes as JSON):
  * greedy tokens of the golden prompts (bench/golden_inputs.py, the CPU golden tests' own) against
    transformers' generate, float32, one request at a time and all batched together; bfloat16 agreement with
    transformers in bfloat16;
  * prefix cache on vs off over 100 prompts sharing a long document, float32 and bfloat16: how many outputs
    differ (on CPU kvserve is bitwise batch-invariant; on CUDA cuBLAS picks kernels by shape, so exactness is
    measured here, not claimed);
  * a KV pool too small for the batch (preemption) against the unconstrained run;
  * a random-weight hybrid (Bamba: attention + Mamba-2) against transformers' pure-torch path;
  * KV blocks and state slots all returned after each run.
Each section is independent: one that fails is reported and the rest still run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # kvserve, where it is not installed

import torch
from golden_inputs import DOC, PROMPTS, small_bamba_config  # bench/golden_inputs.py, a sibling

from kvserve import LLM, SamplingParams
from kvserve.model.loader import load_model

GREEDY = SamplingParams(temperature=0, max_tokens=20, logprobs=0)


def hf_generate(hf, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids], device=hf.device)
    with torch.inference_mode():
        out = hf.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=2
        )
    return out[0, len(ids) :].tolist()


def agreement(a: list[int], b: list[int]) -> int:
    """Tokens before the first difference."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def golden(ctx: dict) -> dict:
    import transformers

    path = Path(ctx["model"])
    res = {}
    for dtype in ("float32", "bfloat16"):
        hf = (
            transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32
            )
            .to(device=ctx["device"], dtype=getattr(torch, dtype))
            .eval()
        )
        llm = LLM(loaded=ctx["loaded"], device=ctx["device"], dtype=dtype, num_kv_blocks=512)
        ids = [llm.tokenizer.encode(p) for p in PROMPTS]
        refs = [hf_generate(hf, i, GREEDY.max_tokens) for i in ids]
        single = tokens(llm.generate(p, GREEDY)[0] for p in PROMPTS)
        batched = tokens(llm.generate(PROMPTS, GREEDY))
        res[dtype] = {
            "prompts": len(PROMPTS),
            "single_equal": sum(a == b for a, b in zip(single, refs)),
            "batched_equal": sum(a == b for a, b in zip(batched, refs)),
            "single_agreeing_tokens": sum(agreement(a, b) for a, b in zip(single, refs)),
            "batched_agreeing_tokens": sum(agreement(a, b) for a, b in zip(batched, refs)),
            "tokens": sum(len(r) for r in refs),
            "blocks_left": llm.engine.get_stats().num_used_blocks,
        }
        del hf, llm
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return res


def prefix_cache(ctx: dict, n: int = 100) -> dict:
    prompts = [DOC + f"\nQ: Question {i}: what happens to block {i % 7} of request {i}?\nA:" for i in range(n)]
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=0)
    res = {}
    for dtype in ("float32", "bfloat16"):
        cold = LLM(
            loaded=ctx["loaded"], device=ctx["device"], dtype=dtype, enable_prefix_caching=False, num_kv_blocks=4096
        )
        reference = [cold.generate(p, params)[0] for p in prompts]  # one at a time, no cache
        warm = LLM(
            loaded=ctx["loaded"],
            device=ctx["device"],
            dtype=dtype,
            enable_prefix_caching=True,
            num_kv_blocks=4096,
            max_num_batched_tokens=256,
        )
        outs = warm.generate(prompts, params)  # batched, chunked, prefix shared
        diff = [i for i, (a, b) in enumerate(zip(tokens(outs), tokens(reference))) if a != b]
        lp = max(
            abs(x - y) for a, b in zip(outs, reference) for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs)
        )
        res[dtype] = {
            "prompts": n,
            "outputs_differing": len(diff),
            "first_differing": diff[:5],
            "max_abs_logprob_diff_on_agreeing_prefix": lp,
            "cached_tokens_mean": sum(o.num_cached_tokens for o in outs) / n,
            "blocks_left": warm.engine.get_stats().num_used_blocks,
        }
        del cold, warm
    return res


def preemption(ctx: dict) -> dict:
    prompts = [p + " " + p for p in PROMPTS[:6]]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=0)
    ref = LLM(loaded=ctx["loaded"], device=ctx["device"], dtype="float32", num_kv_blocks=256)
    small = LLM(loaded=ctx["loaded"], device=ctx["device"], dtype="float32", num_kv_blocks=14)
    a, b = ref.generate(prompts, params), small.generate(prompts, params)
    small.engine.check_invariants()
    return {
        "preemptions": small.engine.get_stats().num_preemptions,
        "outputs_equal": sum(x == y for x, y in zip(tokens(a), tokens(b))),
        "prompts": len(prompts),
        "blocks_left": small.engine.get_stats().num_used_blocks,
    }


def hybrid(ctx: dict) -> dict:
    import transformers

    torch.manual_seed(0)
    cfg = small_bamba_config(hidden_size=128, intermediate_size=256, initializer_range=0.25)  # the tests', wider
    model = transformers.BambaForCausalLM(cfg).eval()
    path = Path(ctx["model"])
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp + "/tok")
        for f in Path(tmp, "tok").iterdir():
            if f.name != "config.json":
                Path(tmp, f.name).write_bytes(f.read_bytes())
        model = model.to(ctx["device"])
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, 512, (int(n),), generator=g).tolist() for n in (5, 17, 40, 77, 120)]
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        refs = [hf_generate(model, p, 12) for p in prompts]
        shared = [prompts[4][:60] + p[:10] for p in prompts[:4]]  # resume from checkpoints of prompts[4]
        kw = dict(model=tmp, device=ctx["device"], dtype="float32", block_size=8, num_kv_blocks=256)
        no_cache = tokens(LLM(**kw, enable_prefix_caching=False).generate(shared, params))
        res = {}
        for policy in ("none", "every-block:2", "optimal:2"):
            llm = LLM(**kw, checkpoint_policy=policy, max_num_batched_tokens=24)
            first = tokens(llm.generate(prompts, params))
            second_outs = llm.generate(shared, params)
            res[policy] = {
                "equal_to_transformers": sum(a == b for a, b in zip(first, refs)),
                "prompts": len(prompts),
                "shared_prefix_equal_to_no_cache": sum(a == b for a, b in zip(tokens(second_outs), no_cache)),
                "shared_prompts": len(shared),
                "shared_cached_tokens": [o.num_cached_tokens for o in second_outs],
                "blocks_left": llm.engine.get_stats().num_used_blocks,
            }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the bundled GGUF file")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="cuda_check.json")
    ap.add_argument("--sections", nargs="+", default=["golden", "prefix_cache", "preemption", "hybrid"])
    args = ap.parse_args()
    dev = torch.device(args.device)
    results: dict = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
    }
    ctx = {"model": args.model, "device": args.device, "loaded": load_model(args.model)}
    for name in args.sections:
        t0 = time.perf_counter()
        try:
            results[name] = globals()[name](ctx)
        except Exception:  # noqa: BLE001 - report and go on to the next section
            results[name] = {"error": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(name, json.dumps(results[name], indent=1), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
