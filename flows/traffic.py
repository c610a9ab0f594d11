"""Replay the served version's test split against an environment's live server (demos, tests).

    python -m flows.traffic env=test                                  # each test image once
    python -m flows.traffic env=test drift=brightness requests=200 feedback=0.5
    python -m flows.traffic env=production drift=class_mix target=3

Replay options (drift, strength, requests, feedback, concurrency, seed, target) are given as
key=value like Hydra overrides; everything else is a Hydra override of the deploy config, which
names the live server, its token variable and the DVC store. `python -m mlops.traffic --help`
is the same tool for any URL and image folder.
"""

from __future__ import annotations

import sys

from flows.config import load_config
from mlops import traffic
from mlops.config import ConfigError, secret
from mlops.data.versioning import dataset_of
from mlops.deploy import processes
from mlops.registry import Registry

OPTIONS = {"drift": str, "strength": float, "requests": int, "feedback": float, "concurrency": int, "seed": int, "target": str}


def main(argv: list[str] | None = None) -> int:
    env, overrides, options = "test", [], {}
    for item in sys.argv[1:] if argv is None else argv:
        key, _, value = item.partition("=")
        if key == "env":
            env = value
        elif key in OPTIONS:
            try:
                options[key] = OPTIONS[key](value)
            except ValueError:
                sys.exit(f"error: {key}={value}: expected {OPTIONS[key].__name__}")
        else:
            overrides.append(item)
    try:
        config = load_config("deploy", env, overrides)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    live = processes.read_live(config.paths.deploy)
    if live is None or not processes.is_running(live):
        sys.exit(f"error: no server is live in {env} (start one with python -m flows.deploy env={env})")
    prepared = dataset_of(Registry(config.mlflow).version_tags(live.version), config.dvc)
    try:
        token = secret(config.serve.token_env)
        result = traffic.replay(
            live.url, traffic.load_images(prepared.path / "test"), requests=options.get("requests"),
            drift=options.get("drift", "none"), strength=options.get("strength", 0.8),
            feedback_share=options.get("feedback", 0.0), concurrency=options.get("concurrency", 4),
            token=token, seed=options.get("seed", 0), class_mix_target=options.get("target"), verify=live.verify,
        )
    except ValueError as error:
        sys.exit(f"error: {error}")
    print(f"{live.url} (version {live.version}) drift={options.get('drift', 'none')}: {result.summary()}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
