"""Serve a registered model behind an OpenAI-compatible API on Ray Serve (continuous batching).

python -m jobs.serve --model=models:/llama-tiny-sft/latest          # http://127.0.0.1:8000/v1
python -m jobs.serve --model=models:/llama-tiny@champion --max_batch=32 --quant=int8-weight
python -m jobs.serve --model=... --autoscaling.max_replicas=4 --ray.address=auto   # on a cluster
python -m jobs.serve --model=models:/llama-tiny-rag/latest --index=.generalmodel/indexes/sotu-qa  # RAG
curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
  -d '{"model": "llama-tiny", "prompt": "Fellow citizens,", "max_tokens": 32}'

Any OpenAI client works: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused"). The app is
described in generalmodel/serve/app.py; Ctrl-C (or SIGTERM) shuts it down after the requests in
flight finish (graceful_shutdown_timeout_s).
"""

from __future__ import annotations

import signal
import time

from generalmodel.cli import run_job
from generalmodel.config import RayConfig
from generalmodel.serve.app import ServeConfig, build_app, served_name


class ServeJobConfig(ServeConfig):
    ray: RayConfig = RayConfig()


def check_model(cfg: ServeConfig) -> None:
    """Fail before deploying when the model reference does not resolve (a replica would only
    crash-loop), the quantization cannot run on the device or `--index` is not a published index."""
    from generalmodel.infer.quant import check_quant
    from generalmodel.retrieval.index import KIND as INDEX_KIND
    from generalmodel.storage import read_manifest, resolve
    from generalmodel.tracking import ModelRef, artifact_uri, tracking_uri

    check_quant(cfg.quant, cfg.device)
    if ModelRef.parse(cfg.model).in_mlflow:
        artifact_uri(cfg.model, tracking_uri(cfg))
    if cfg.index:
        read_manifest(resolve(cfg.index, cfg.storage.resolved()), INDEX_KIND)


def main(cfg: ServeJobConfig, block: bool = True) -> str:
    """Deploy the app; returns its base URL (…/v1) and, with `block`, serves until interrupted."""
    from ray import serve

    from generalmodel.cluster import ray_session

    check_model(cfg)
    with ray_session(cfg.ray):
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        app = build_app(cfg.model_dump(mode="json", exclude={"ray"}))
        url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/v1"
        if not block:  # the caller (a test, a benchmark) owns the app from here
            serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix)
            return url
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM: the same clean stop as Ctrl-C
        try:
            serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix)
            print(f"serving {cfg.model} as {cfg.name or served_name(cfg.model)!r} at {url} (Ctrl-C stops)", flush=True)
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            print("stopping: the requests in flight finish first", flush=True)
        finally:
            # Like `serve run`: the app goes with this command (a RayService keeps one running).
            serve.delete(cfg.app_name)
    return url


def cli() -> None:
    run_job(main, ServeJobConfig, __doc__)


if __name__ == "__main__":
    cli()
