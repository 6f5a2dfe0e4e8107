"""One typed settings object for the whole appliance.

Sources load in this order, later ones winning:
  1. the YAML file (`--config FILE`, else `$APPLIANCE_CONFIG`, else `$APPLIANCE_HOME/config.yaml` if present);
  2. environment variables `APPLIANCE_*`, nested with a double underscore (`APPLIANCE_SERVE__PORT=9000`);
  3. explicit overrides (CLI flags), passed to `load_settings(overrides=...)`.
"""

from __future__ import annotations

import contextvars
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from fedllm.core.errors import ConfigError
from fedllm.core.sections import (
    ClusterSettings,
    FederationSettings,
    ServeSettings,
    TrackingSettings,
    TrainSettings,
    UISettings,
    WorkerSettings,
)

DEFAULT_MODEL = "smollm2-135m-instruct"
_PLACEHOLDER_SECRETS = {"changeme", "change-me", "secret", "password", "admin", "token", ""}
_yaml_path: contextvars.ContextVar[Path | None] = contextvars.ContextVar("_yaml_path", default=None)


def default_home() -> Path:
    """`$APPLIANCE_HOME`, else `~/.appliance`."""
    return Path(os.environ.get("APPLIANCE_HOME", Path.home() / ".appliance")).expanduser()


class _YamlSource(PydanticBaseSettingsSource):
    """Settings from the YAML file chosen by `load_settings` (lowest priority)."""

    def get_field_value(self, field, field_name):  # pragma: no cover - unused, __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _yaml_path.get()
        if path is None:
            return {}
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"settings file {path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"settings file {path} must hold a mapping at the top, found {type(data).__name__}")
        return data


class ApplianceSettings(BaseSettings):
    """Everything the appliance can be told. See the module docstring for the order of sources."""

    model_config = SettingsConfigDict(env_prefix="APPLIANCE_", env_nested_delimiter="__", extra="forbid")

    home: Path = Field(
        default_factory=default_home, description="State folder: models, adapters, runs, federation, keys, logs."
    )
    env: Literal["dev", "prod"] = Field("dev", description="prod refuses placeholder secrets.")
    model: str = Field(DEFAULT_MODEL, description="Base model name in the model store.")
    log_level: str = Field("INFO", description="Python logging level.")
    allow_plain_http: bool = Field(
        False,
        description=(
            "Send tokens over plain http:// to hosts beyond loopback (private test networks only; refused by default)."
        ),
    )
    tls_ca_file: Path | None = Field(
        None,
        description=(
            "PEM CA bundle trusted instead of the system's when this appliance calls its services over HTTPS "
            "(private CAs)."
        ),
    )
    train: TrainSettings = Field(default_factory=TrainSettings)
    federation: FederationSettings = Field(default_factory=FederationSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    ui: UISettings = Field(default_factory=UISettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        return (init_settings, env_settings, _YamlSource(settings_cls))

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> "ApplianceSettings":
        if self.env == "dev":
            return self
        secrets: list[tuple[str, SecretStr | None]] = [
            ("serve.admin_token", self.serve.admin_token),
            ("serve.join_token", self.serve.join_token),
            ("federation.status_token", self.federation.status_token),
            ("ui.admin_password", self.ui.admin_password),
        ] + [(f"serve.api_keys[{i}]", k) for i, k in enumerate(self.serve.api_keys)]
        bad = [
            name
            for name, s in secrets
            if s is not None and s.get_secret_value().strip().lower() in _PLACEHOLDER_SECRETS
        ]
        if bad:
            raise ConfigError(f"placeholder secrets are refused when env=prod: {', '.join(bad)}; set real values")
        return self

    # -- the on-disk layout (README.md, "State on disk") --
    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def adapters_dir(self) -> Path:
        return self.home / "adapters"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def federation_dir(self) -> Path:
        return self.home / "federation"

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"


def load_settings(config_file: Path | str | None = None, overrides: dict[str, Any] | None = None) -> ApplianceSettings:
    """Build the effective settings from YAML, environment and `overrides` (nested dicts, highest priority).

    Raises:
        ConfigError: the YAML file is missing or malformed, or a value is invalid (the message names the field).
    """
    path = Path(config_file) if config_file else None
    if path is None and os.environ.get("APPLIANCE_CONFIG"):
        path = Path(os.environ["APPLIANCE_CONFIG"])
    if path is None:
        candidate = default_home() / "config.yaml"
        path = candidate if candidate.exists() else None
    if path is not None and not path.exists():
        raise ConfigError(f"settings file {path} does not exist")
    token = _yaml_path.set(path)
    try:
        return ApplianceSettings(**(overrides or {}))
    except ConfigError:
        raise
    except Exception as exc:  # pydantic.ValidationError: say which field, from which source
        raise ConfigError(f"invalid settings: {exc}") from exc
    finally:
        _yaml_path.reset(token)


def redacted_dump(settings: ApplianceSettings) -> dict[str, Any]:
    """The settings as plain JSON-able data with every secret masked (for `config show` and run folders)."""
    data = settings.model_dump(mode="json")
    return _mask(settings, data)


def _mask(obj: Any, data: Any) -> Any:
    from pydantic import BaseModel

    if isinstance(obj, SecretStr):
        return "**********" if obj.get_secret_value() else ""
    if isinstance(obj, BaseModel):
        return {k: _mask(getattr(obj, k), data[k]) for k in data}
    if isinstance(obj, list):
        return [_mask(o, d) for o, d in zip(obj, data)]
    return data
