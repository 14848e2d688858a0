"""An organisation's own settings (`org.yaml` in its directory): the only source of everything that decides
where its data goes and what code it runs.

Its worker (flows/client.py) builds each round's config from these and from the server's round request
(fedse/request.py), which can set hyperparameters and nothing else:

    client: maze                      # the client this organisation is
    params: ../params.yaml            # its own params file (profiles, model preset, defaults)
    accept: null                      # globs of the request terms it accepts; null = all of request.TERMS
    store:                            # its object store: endpoint, bucket, prefix, region, its own S3 keys
      endpoint: https://store.example:8333
      bucket: fedse
      credentials: s3-credentials.json
    keys: keys                        # its keyring: its private key, the server's public key (fedse keys)
    seed_dir: data/seed               # its expert seeds
    runs: runs                        # its buffers, egress logs, run folders
    cache_dir: .cache/fedse           # model cache
    models_dir: null                  # committed tiny bases; null = the checkout's models/
    dvc_repo: null                    # where its buffer versions are cached; null = this directory if it has .dvc/
    ca_bundle: null                   # the store's CA certificate (TLS); null = the system's
    poll: 1.0                         # seconds between looks at its inbox

Relative paths are relative to the file's folder.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedse.config import Config, ConfigError, load_config
from fedse.request import RoundRequest, apply
from fedse.transport import S3Spec

ROOT = Path(__file__).resolve().parents[1]
FILE = "org.yaml"


class OrgSettings(BaseModel):
    """`org.yaml`, validated: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    client: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,56}$")
    params: Path = Path("params.yaml")
    accept: list[str] | None = None
    store: S3Spec | None = Field(None, description="null: a local exchange folder (exchange_dir)")
    exchange_dir: Path | None = Field(None, description="local backend only: the folder shared with the server")
    keys: Path = Path("keys")
    seed_dir: Path = Path("data/seed")
    runs: Path = Path("runs")
    cache_dir: Path = Path(".cache/fedse")
    models_dir: Path | None = None
    dvc_repo: Path | None = None
    ca_bundle: Path | None = None
    poll: float = Field(1.0, gt=0, le=60)
    home: Path = Field(Path("."), exclude=True)

    @field_validator("accept")
    @classmethod
    def _globs(cls, value: list[str] | None) -> list[str] | None:
        bad = [g for g in value or [] if not re.match(r"^[a-z_.*]{1,80}$", g)]
        if bad:
            raise ValueError(f"accept: {bad[0]!r} is not a dotted key glob")
        return value

    def path(self, value: Path) -> Path:
        """A setting's path, relative to the organisation's folder."""
        return value if value.is_absolute() else (self.home / value).resolve()

    def config(self, request: RoundRequest) -> Config:
        """This round's config: the organisation's params file under the requested profile and terms, then its
        own places, which no request can change."""
        params = self.path(self.params)
        cfg = load_config(params, profile=request.profile, overrides=apply(request, self.accept))
        transport = cfg.transport.model_copy(update={
            "backend": "s3" if self.store is not None else "local",
            "s3": self.store.model_copy(update={"credentials": self.path(self.store.credentials)
                                                if self.store.credentials else None}) if self.store else S3Spec(),
            "dir": self.path(self.exchange_dir) if self.exchange_dir else None,
            "keyring": self.path(self.keys), "audit_dir": None, "experiment": request.experiment})
        models = self.path(self.models_dir) if self.models_dir else ROOT / "models"
        model = cfg.model.model_copy(update={"cache_dir": self.path(self.cache_dir), "models_dir": models})
        return cfg.model_copy(update={
            "transport": transport, "model": model,
            "seed_data": cfg.seed_data.model_copy(update={"dir": self.path(self.seed_dir)}),
            "federation": cfg.federation.model_copy(update={"out": self.path(self.runs)})})


def load(path: Path) -> OrgSettings:
    """`org.yaml` (or the folder holding it), refused in one line when unreadable or invalid."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the organisation's settings ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping")
    try:
        return OrgSettings.model_validate(data | {"home": path.parent.resolve()})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path}: {where}: {first['msg']}") from None
