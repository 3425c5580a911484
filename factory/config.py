"""The factory's config file (factory.yaml): which pool, what a glidein asks for, how fast
to scale. Re-read when it changes; limits in it are applied once per change of the file."""
from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, model_validator

from factory.drill import EvictionSettings
from pcm_service.client import default_service_url
from pcm_service.protocol import FactoryLimits, Strict
from pcm_service.tokens import POOL, TokenError, read_token, token_file
from pcm_service.yamlmodel import FieldError, load_yaml_model

ENTRY_SCRIPT = Path(__file__).resolve().parent.parent / "worker_image" / "entry.sh"
# what a glidein with PCM_ENV=packed runs first (standard-library Python): transferred beside it
BOOTSTRAP_SCRIPT = ENTRY_SCRIPT.with_name("bootstrap.py")


class FactoryConfigError(FieldError):
    pass


class HTCondorSettings(Strict):
    """Where the schedd is and what each glidein asks of the pool (HTCondor submit names)."""
    collector: Optional[str] = None  # host[:port]; default: the COLLECTOR_HOST HTCondor is configured with
    schedd: Optional[str] = None  # schedd name; default: the local schedd
    executable: str = str(ENTRY_SCRIPT)
    transfer_executable: bool = True
    bootstrap: str = str(BOOTSTRAP_SCRIPT)  # transferred with a PCM_ENV=packed glidein
    log_dir: str = "pcm-glideins"  # glidein event log, stdout, stderr (on the submit host)
    token_file: Optional[str] = None  # pool token (required): transferred as a file, never in the job ad
    request_cpus: int = Field(default=1, gt=0)
    request_memory: str = "8GB"
    request_disk: str = "20GB"
    request_gpus: int = Field(default=0, ge=0)
    gpus_minimum_memory: Optional[int] = Field(default=None, gt=0)  # MB, as HTCondor counts it
    gpus_minimum_capability: Optional[float] = Field(default=None, gt=0)
    requirements: Optional[str] = None  # ClassAd expression, and-ed with HTCondor's own
    accounting_group: Optional[str] = None
    accounting_group_user: Optional[str] = None
    # PCM_VENV (a shared path), PCM_IMAGE (Apptainer) or PCM_ENV=packed (from the service)
    environment: dict[str, str] = Field(default_factory=dict)
    worker_args: list[str] = Field(default_factory=list)  # extra `pcm worker` flags
    submit: dict[str, str] = Field(default_factory=dict)  # any other submit commands, verbatim

    @model_validator(mode="after")
    def _no_secrets_in_ad(self) -> "HTCondorSettings":
        for key in self.environment:
            if "TOKEN" in key.upper() or "SECRET" in key.upper():
                raise ValueError(f"environment.{key}: the job environment is visible in the queue;"
                                 " give secrets as token_file")
        return self


class LocalSettings(Strict):
    work_dir: str = "pcm-glideins"
    token_file: Optional[str] = None  # pool token; default $PCM_POOL_TOKEN_FILE, else ./pcm-state/pool.token
    worker_args: list[str] = Field(default_factory=list)


class FactoryConfig(Strict):
    service: str = Field(default_factory=default_service_url)
    # the CA that signs an https:// service's certificate (else the system store); the factory
    # trusts it and every glidein gets it (transferred like the pool token)
    ca_file: Optional[str] = None
    name: str = Field(default_factory=lambda: f"{socket.gethostname()}")
    backend: Literal["htcondor", "local"] = "local"
    interval: float = Field(default=5.0, gt=0)  # seconds between cycles
    limits: Optional[FactoryLimits] = None  # applied when the file (re)appears with new limits
    max_idle: int = Field(default=4, gt=0)  # glideins waiting in the queue at most
    held_timeout: float = Field(default=300.0, ge=0)  # report a held glidein this long, then remove
    idle_grace: float = Field(default=30.0, ge=0)  # a worker idle this long may be removed
    scale_down_delay: float = Field(default=60.0, ge=0)  # demand must stay low this long first
    eviction: Optional[EvictionSettings] = None  # the eviction drill (tests, benchmarks): off by default
    htcondor: HTCondorSettings = Field(default_factory=HTCondorSettings)
    local: LocalSettings = Field(default_factory=LocalSettings)


def load_factory_config(path: str | Path) -> FactoryConfig:
    p = Path(path)
    cfg = load_yaml_model(p, FactoryConfig, FactoryConfigError)
    base = p.resolve().parent
    if cfg.ca_file and not Path(cfg.ca_file).is_absolute():
        cfg.ca_file = str(base / cfg.ca_file)
    for section, key in (("htcondor", "log_dir"), ("htcondor", "token_file"),
                         ("htcondor", "executable"), ("local", "work_dir"), ("local", "token_file")):
        sub = getattr(cfg, section)
        val = getattr(sub, key)
        if val and not Path(val).is_absolute():  # paths are relative to the config file
            setattr(sub, key, str(base / val))
    check_token_file(cfg)
    return cfg


def check_token_file(cfg: FactoryConfig) -> None:
    """The service refuses workers without its pool token: the backend in use must have one."""
    tok = cfg.htcondor.token_file if cfg.backend == "htcondor" else cfg.local.token_file
    where = f"{cfg.backend}.token_file"
    if cfg.backend == "htcondor" and not tok:
        raise FactoryConfigError(where, "required: the file holding the service's pool token (its"
                                        " STATE_DIR/pool.token), transferred to each glidein")
    if tok and not Path(tok).is_file():
        raise FactoryConfigError(where, f"{tok} does not exist")
    if cfg.ca_file and not Path(cfg.ca_file).is_file():
        raise FactoryConfigError("ca_file", f"{cfg.ca_file} does not exist")
    if cfg.ca_file and tok and Path(cfg.ca_file).name == Path(tok).name:
        raise FactoryConfigError("ca_file", f"has the same file name as {where}: both are transferred"
                                            " into the glidein's sandbox; rename one")


def resolve_pool_token_file(cfg: FactoryConfig) -> FactoryConfig:
    """Check the pool token file; for the local backend without local.token_file, find it:
    $PCM_POOL_TOKEN_FILE, else ./pcm-state/pool.token (`pcm serve`'s default state dir)."""
    check_token_file(cfg)
    if cfg.backend == "local":
        path = token_file(POOL, Path(cfg.local.token_file) if cfg.local.token_file else None)
        if path is None:
            raise FactoryConfigError("local.token_file", f"no pool token for the workers: set local.token_file"
                                     f" or {POOL.file_env} to the service's STATE_DIR/{POOL.filename}")
        try:
            read_token(path)
        except TokenError as e:
            raise FactoryConfigError("local.token_file", str(e)) from None
        cfg.local.token_file = str(path.resolve())
    return cfg


def file_digest(path: str | Path) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""
