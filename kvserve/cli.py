"""The `kvserve` command: generate (offline), serve (OpenAI-compatible HTTP server).

Engine flags are the EngineConfig fields, spelled with dashes (--block-size, --kv-cache-memory, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing

from kvserve.config import EngineConfig, parse_memory


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field (but `model`, which each command takes its own way), derived from the
    field: --block-size from block_size, its type, default, choices and help; booleans get --no-X too."""
    g = p.add_argument_group("engine")
    hints = typing.get_type_hints(EngineConfig)
    for f in dataclasses.fields(EngineConfig):
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict = {"default": f.default, "help": f.metadata.get("help")}
        if f.metadata.get("choices"):
            kwargs["choices"] = list(f.metadata["choices"])
        if hints[f.name] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.metadata.get("memory"):
            kwargs["type"] = _memory
        else:
            kwargs["type"] = _scalar(hints[f.name])
        g.add_argument(flag, **kwargs)


def _scalar(hint: object) -> type:
    """int for `int` and `int | None`, and so on."""
    kinds = typing.get_args(hint) or (hint,)
    return next(t for t in (int, float, str) if t in kinds)


def _memory(text: str) -> int:
    """parse_memory for argparse: its own message, not argparse's "invalid parse_memory value"."""
    try:
        return parse_memory(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def engine_config(args: argparse.Namespace) -> EngineConfig:
    names = set(EngineConfig.field_names())
    return EngineConfig(**{k: v for k, v in vars(args).items() if k in names})


def _generate(args: argparse.Namespace) -> int:
    from kvserve.llm import LLM
    from kvserve.sampling_params import SamplingParams

    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            with open(args.prompts_file) as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            print(f"error: cannot read --prompts-file {args.prompts_file}: {e.strerror or e}", file=sys.stderr)
            return 2
    if not prompts:
        print("error: give a prompt or --prompts-file", file=sys.stderr)
        return 2
    config = engine_config(args)
    params = SamplingParams(  # bad values fail here, before the model loads
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed_request,
        max_tokens=args.max_tokens,
        stop=tuple(args.stop or ()),
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
    )
    llm = LLM(**{k: v for k, v in vars(config).items()})
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=len(prompts) > 1)
    else:
        outs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1)
    for prompt, out in zip(prompts, outs):
        c = out.outputs[0]
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": prompt,
                        "text": c.text,
                        "token_ids": c.token_ids,
                        "finish_reason": c.finish_reason,
                        "num_cached_tokens": out.num_cached_tokens,
                    }
                )
            )
        else:
            print(c.text if len(prompts) == 1 else f"--- {prompt!r}\n{c.text}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from kvserve.server.app import ServerOptions, run_server

    options = ServerOptions(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_waiting_requests=args.max_waiting_requests,
        max_body_bytes=args.max_body_bytes,
        served_model_name=args.served_model_name,
        log_level=args.log_level,
        threads=args.threads,
    )
    if args.replicas > 1 or args.disaggregate:  # Ray is imported only here
        from kvserve.fleet.launch import FleetOptions, run_fleet

        ray_args = dict(routing=args.routing, ray_address=args.ray_address, ray_dashboard=args.ray_dashboard)
        if args.disaggregate:
            fleet = FleetOptions.disaggregated(args.disaggregate, **ray_args)
        else:
            fleet = FleetOptions(args.replicas, **ray_args)
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        run_fleet(engine_config(args), options, fleet)
        return 0
    run_server(engine_config(args), options)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from kvserve.bench.command import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text offline")
    gen.add_argument("prompt", nargs="*", help="prompt(s)")
    gen.add_argument("--model", default=EngineConfig.model)
    gen.add_argument("--prompts-file", help="one prompt per line")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed-request", type=int, default=None, help="sampling seed of each request")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages prompt and output tokens")
    gen.add_argument("--presence-penalty", type=float, default=0.0, help="-2..2, subtracted once per output token seen")
    gen.add_argument("--frequency-penalty", type=float, default=0.0, help="-2..2, subtracted per occurrence")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_engine_args(gen)
    gen.set_defaults(func=_generate)

    srv = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    srv.add_argument("model", nargs="?", default=EngineConfig.model)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (or KVSERVE_API_KEY)"
    )
    srv.add_argument(
        "--max-waiting-requests", type=int, default=512, help="queued requests beyond which new ones get HTTP 429"
    )
    srv.add_argument(
        "--max-body-bytes", type=_memory, default=1 << 20, help="largest request body, e.g. 1MiB (else HTTP 413)"
    )
    srv.add_argument("--served-model-name", default=None, help="model name in the API (default: MODEL)")
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    srv.add_argument("--threads", type=int, default=None, help="CPU threads for the engine(s) (default: every core)")
    fleet = srv.add_argument_group("fleet (Ray Serve)")
    fleet.add_argument(
        "--replicas", type=int, default=1, help="engine replicas behind one endpoint (>= 2 starts Ray Serve)"
    )
    fleet.add_argument(
        "--routing",
        default="cache-aware",
        choices=["round-robin", "least-load", "prefix-aware", "cache-aware"],
        help="how the fleet picks a replica (docs/scale-out.md)",
    )
    fleet.add_argument(
        "--disaggregate",
        metavar="P:D",
        default=None,
        help="P prefill and D decode replicas: prefill computes the prompt's KV into the shared --kv-store "
        "(a fleet-local directory if none), decode loads it as a prefix hit",
    )
    fleet.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one locally")
    fleet.add_argument("--ray-dashboard", action="store_true", help="start Ray's dashboard (off by default)")
    add_engine_args(srv)
    srv.set_defaults(func=_serve)

    from kvserve.bench.command import add_arguments as add_bench_arguments

    bench = sub.add_parser("bench", help="benchmark an OpenAI-compatible server (TTFT, TPOT, throughput, cache hits)")
    add_bench_arguments(bench)
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
