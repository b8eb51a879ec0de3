"""`kvserve serve --replicas N`: the fleet as one Ray Serve application.

  HTTP (Serve's proxy) ─► FleetIngress (1 replica: the single server's FastAPI app over a FleetClient)
                            │ DeploymentHandle, streaming; replica chosen by KVServeRequestRouter
                            ▼
                          EngineReplica x N (one engine each; --threads split between them)
                          [PrefillReplica x P with --disaggregate P:D: the prompt's KV, through the KV store]
                            │ KV events, stats, /metrics every 50 ms
                            ▼
                          FleetState (a named Ray actor: read by the router and the ingress)

Ray runs locally, bound to 127.0.0.1 with its dashboard off (--ray-dashboard turns it on), unless
--ray-address joins a cluster. Serve's HTTP proxy listens on --host/--port.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from kvserve.config import EngineConfig
from kvserve.fleet.ingress import FleetClient
from kvserve.fleet.ray_router import KVServeRequestRouter
from kvserve.fleet.replica import EngineReplica
from kvserve.fleet.router_metrics import ROUTER_METRICS
from kvserve.fleet.state import FleetState
from kvserve.model.loader import load_tokenizer
from kvserve.router.policies import POLICIES
from kvserve.server.app import ServerOptions, make_app

log = logging.getLogger(__name__)

APP_NAME = "kvserve"
ENGINE_DEPLOYMENT = "EngineReplica"
PREFILL_DEPLOYMENT = "PrefillReplica"
NAMESPACE = "kvserve"
STATE_ACTOR = "kvserve-fleet-state"


@dataclass(frozen=True)
class FleetOptions:
    replicas: int = 2  # engine replicas (decode replicas when disaggregated)
    routing: str = "cache-aware"
    ray_address: str | None = None
    ray_dashboard: bool = False
    prefill_replicas: int = 0  # --disaggregate P:D -> P here, D in replicas

    @classmethod
    def disaggregated(cls, spec: str, **kw: Any) -> FleetOptions:
        """From --disaggregate P:D."""
        try:
            p, d = (int(x) for x in spec.split(":"))
        except ValueError:
            raise ValueError(f"--disaggregate takes P:D (prefill and decode replicas), got {spec!r}") from None
        if p < 1 or d < 1:
            raise ValueError(f"--disaggregate needs at least one prefill and one decode replica, got {spec!r}")
        return cls(replicas=d, prefill_replicas=p, **kw)

    def __post_init__(self) -> None:
        if self.replicas < (1 if self.prefill_replicas else 2):
            raise ValueError(f"a fleet needs --replicas >= 2, got {self.replicas}")
        if self.routing not in POLICIES:
            raise ValueError(f"--routing must be one of {', '.join(POLICIES)}, got {self.routing!r}")


@serve.ingress()
class FleetIngress:
    async def __init__(self, engine: Any, engine_config: dict[str, Any], server: dict[str, Any], prefill: Any = None):
        import ray

        config = EngineConfig(**engine_config)
        info = await engine.info.remote()
        state = ray.get_actor(STATE_ACTOR, namespace=NAMESPACE)
        tokenizer = load_tokenizer(config.model)
        client = FleetClient(
            engine, info, tokenizer, state, APP_NAME, ENGINE_DEPLOYMENT, ROUTER_METRICS.registry, prefill
        )
        self._app = make_app(
            client,
            server.get("served_model_name") or config.model,
            api_key=server.get("api_key"),
            max_body_bytes=server["max_body_bytes"],
            metrics=client.metrics,
        )

    def __serve_build_asgi_app__(self) -> Any:
        return self._app


def threads_per_replica(total: int | None, replicas: int) -> int:
    """--threads (default: every core) split evenly; at least one each."""
    return max(1, (total or os.cpu_count() or 1) // replicas)


def build_fleet(engine_config: EngineConfig, server: ServerOptions, fleet: FleetOptions) -> Any:
    """The Serve application (to serve.run); the FleetState actor must exist (start_fleet_state)."""
    threads = threads_per_replica(server.threads, fleet.replicas + fleet.prefill_replicas)
    if fleet.prefill_replicas and engine_config.kv_store is None:  # prefill hands KV to decode through a store
        store = Path(tempfile.gettempdir()) / f"kvserve-fleet-{os.getpid()}"
        engine_config = dataclasses.replace(engine_config, kv_store=f"disk:{store}")
        log.info("disaggregated fleet: prefill and decode replicas share the KV store %s", store)
    config = dataclasses.asdict(engine_config)
    state = (STATE_ACTOR, NAMESPACE)

    def engines(name: str, replicas: int) -> Any:
        deployment = serve.deployment(EngineReplica, name=name).options(
            num_replicas=replicas,
            max_ongoing_requests=server.max_waiting_requests + engine_config.max_num_seqs,  # the engine queues
            ray_actor_options={"num_cpus": 0},  # threads are ours to place; Ray's CPU count would only block starts
            request_router_config=RequestRouterConfig(
                request_router_class=f"{KVServeRequestRouter.__module__}.{KVServeRequestRouter.__qualname__}",
                request_router_kwargs={
                    "policy": fleet.routing,
                    "block_size": engine_config.block_size,
                    "state_name": STATE_ACTOR,
                    "state_namespace": NAMESPACE,
                },
            ),
            health_check_period_s=2,
            graceful_shutdown_timeout_s=5,
        )
        return deployment.bind(config, server.max_waiting_requests, threads, state)

    prefill = engines(PREFILL_DEPLOYMENT, fleet.prefill_replicas) if fleet.prefill_replicas else None
    ingress = serve.deployment(FleetIngress, name="FleetIngress").options(
        num_replicas=1, max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0}
    )
    return ingress.bind(engines(ENGINE_DEPLOYMENT, fleet.replicas), config, dataclasses.asdict(server), prefill)


def start_ray(fleet: FleetOptions, server: ServerOptions) -> None:
    import ray

    if fleet.ray_address:
        ray.init(address=fleet.ray_address, namespace=NAMESPACE)
    else:
        ray.init(
            include_dashboard=fleet.ray_dashboard,
            _node_ip_address="127.0.0.1",
            namespace=NAMESPACE,
            num_cpus=os.cpu_count(),
        )
    serve.start(http_options={"host": server.host, "port": server.port})


def start_fleet_state() -> Any:
    import ray

    actor = ray.remote(FleetState).options(name=STATE_ACTOR, namespace=NAMESPACE, get_if_exists=True, num_cpus=0)
    return actor.remote()


def deploy(engine_config: EngineConfig, server: ServerOptions, fleet: FleetOptions) -> Any:
    """Ray must be running (start_ray): start the state actor and the application. Returns the state actor's
    handle: keep it, the actor lives as long as its creator holds it."""
    state = start_fleet_state()
    serve.run(build_fleet(engine_config, server, fleet), name=APP_NAME, route_prefix="/")
    return state


def run_fleet(engine_config: EngineConfig, server: ServerOptions, fleet: FleetOptions) -> None:
    """`kvserve serve --replicas N`: until SIGINT/SIGTERM."""
    import ray

    start_ray(fleet, server)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        state = deploy(engine_config, server, fleet)  # noqa: F841 - held until the fleet stops
        log.info("kvserve fleet of %d replicas serving on http://%s:%d", fleet.replicas, server.host, server.port)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
