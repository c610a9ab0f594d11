"""The model server's settings: the `serve` section the deploy flow hands to every server it starts.

`conf/serve/default.yaml` is the one place their values are written; a server started by hand
reads that file, a server started by the deploy flow gets the composed section as JSON.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, field_validator

from mlops.config.common import ENV_NAME, Section, store_url

DEFAULTS_FILE = Path(__file__).resolve().parents[2] / "conf" / "serve" / "default.yaml"


class TlsConfig(Section):
    """The certificate chain and private key (PEM files) for https; each from a path or from the
    variable named by `*_env` (which holds a path, never the key itself)."""

    cert_file: str | None = None
    key_file: str | None = None
    cert_file_env: str | None = Field(default=None, pattern=ENV_NAME)
    key_file_env: str | None = Field(default=None, pattern=ENV_NAME)


class CaptureConfig(Section):
    """Which inputs the server keeps for labelling and retraining, and where (`mlops.serve.capture`).

    `url` None: nothing is captured (a server started by hand); the deploy flow's environments
    set it (conf/env/deploy/*.yaml)."""

    enabled: bool
    sample_rate: float = Field(ge=0.0, le=1.0)
    max_mb: float = Field(gt=0.0)
    max_age_days: float = Field(gt=0.0)
    max_queue_mb: float = Field(gt=0.0)
    url: str | None = Field(default=None, min_length=1)

    @field_validator("url")
    @classmethod
    def _usable(cls, url: str | None) -> str | None:
        return None if url is None else store_url(url)


class ServeConfig(Section):
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    token_env: str | None = Field(default=None, pattern=ENV_NAME)
    max_body_mb: float = Field(gt=0.0)
    max_pixels: int = Field(ge=1)
    max_batch_images: int = Field(ge=1)
    batch_max_size: int = Field(ge=1, le=1024)
    batch_max_wait_ms: float = Field(ge=0.0, le=1000.0)
    formats: tuple[str, ...] = Field(min_length=1)
    max_decode_mb: float = Field(gt=0.0)
    max_bodies_mb: float = Field(gt=0.0)
    max_feedback_kb: float = Field(gt=0.0)
    timeout_request_s: float = Field(gt=0.0)
    timeout_keep_alive_s: float = Field(gt=0.0)
    max_connections: int = Field(ge=1)
    inline_decode_kb: float = Field(default=16.0, ge=0.0)
    workers: int = Field(default=1, ge=1, le=64)
    onnx_threads: int | None = Field(default=None, ge=1)
    onnx_spinning: bool = False
    tls: TlsConfig = TlsConfig()
    capture: CaptureConfig
    cache_dir: Path | None = None

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, formats: tuple[str, ...]) -> tuple[str, ...]:
        from PIL import Image

        Image.init()
        formats = tuple(name.upper() for name in formats)
        unknown = sorted(set(formats) - set(Image.OPEN))
        if unknown:
            raise ValueError(f"unknown image format(s) {unknown}: Pillow opens {sorted(Image.OPEN)}")
        return formats

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def max_decode_bytes(self) -> int:
        return int(self.max_decode_mb * 2**20)

    @property
    def max_bodies_bytes(self) -> int:
        return int(self.max_bodies_mb * 2**20)

    @property
    def inline_decode_bytes(self) -> int:
        return int(self.inline_decode_kb * 2**10)

    @property
    def max_feedback_bytes(self) -> int:
        return int(self.max_feedback_kb * 2**10)


def default_serve_config() -> ServeConfig:
    """The settings in `conf/serve/default.yaml`, for a server started without a settings file."""
    return ServeConfig.model_validate(yaml.safe_load(DEFAULTS_FILE.read_text()))
