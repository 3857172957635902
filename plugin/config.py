"""Quantization settings: where they live and what values are allowed.

Readers disagree on where the settings are written, so we look in the order the ecosystem grew:
AutoGPTQ's `quantize_config.json`, its older `quant_config.json`, then the `quantization_config` block of
transformers' `config.json`. Unknown keys are kept (other tools read them back); known keys are checked here
once, so later code can trust them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from .errors import ConfigError

CONFIG_FILES = ("quantize_config.json", "quant_config.json", "config.json")
ALLOWED_BITS = (2, 3, 4, 8)
ALLOWED_FORMATS = ("gptq", "gptq_v2")


class QuantizeConfig(BaseModel):
    """The GPTQ settings of one checkpoint (keys as AutoGPTQ writes them)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    bits: int
    group_size: int = -1
    desc_act: bool = False
    sym: bool = True
    static_groups: bool = False
    damp_percent: float = 0.01
    true_sequential: bool = True
    model_name_or_path: str | None = None
    model_file_base_name: str | None = None
    quant_method: str = "gptq"
    checkpoint_format: Literal["gptq", "gptq_v2"] = "gptq"
    meta: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        # GPTQModel has written the zero-point format as `format`; transformers as `checkpoint_format`.
        if isinstance(data, dict) and "checkpoint_format" not in data and "format" in data:
            data = {**data, "checkpoint_format": data["format"]}
        if isinstance(data, dict) and data.get("is_marlin_format"):
            data = {**data, "checkpoint_format": "marlin"}
        return data

    @field_validator("bits", mode="before")
    @classmethod
    def _bits(cls, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v not in ALLOWED_BITS:
            raise ValueError(f"allowed: {', '.join(map(str, ALLOWED_BITS))}")
        return v

    @field_validator("group_size", mode="before")
    @classmethod
    def _group_size(cls, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not (v == -1 or v > 0):
            raise ValueError("allowed: -1 (one group over all input rows) or a positive size such as 32, 64, 128")
        return v

    @field_validator("quant_method", mode="before")
    @classmethod
    def _quant_method(cls, v: Any) -> str:
        if not isinstance(v, str) or v.lower() != "gptq":
            raise ValueError('allowed: "gptq" (gptq-bridge reads GPTQ checkpoints only)')
        return "gptq"

    @field_validator("checkpoint_format", mode="before")
    @classmethod
    def _format(cls, v: Any) -> str:
        if v not in ALLOWED_FORMATS:
            raise ValueError(
                'allowed: "gptq" (v1 zero points) or "gptq_v2"; repacked layouts such as marlin are not read'
            )
        return v

    @field_validator("damp_percent", mode="before")
    @classmethod
    def _damp(cls, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < 1):
            raise ValueError("allowed: a fraction between 0 and 1, such as 0.01 or 0.1")
        return float(v)

    @property
    def zero_offset(self) -> int:
        """What to add to stored zero points: v1 ("gptq") stores z - 1, v2 stores z."""
        return 1 if self.checkpoint_format == "gptq" else 0

    def groups(self, in_features: int) -> int:
        """Number of scale/zero rows for a layer: ceil(in / g), the last group possibly partial."""
        if self.group_size == -1:
            return 1
        return -(-in_features // self.group_size)

    def to_json_dict(self) -> dict[str, Any]:
        """The settings as AutoGPTQ writes them, unknown keys included."""
        return self.model_dump(mode="json", exclude_none=True)


class ConfigFile(BaseModel):
    """Settings together with the file (and key) they were read from."""

    config: QuantizeConfig
    path: Path
    key: str | None = None  # "quantization_config" when read from config.json

    @property
    def label(self) -> str:
        return f"{self.path}[{self.key}]" if self.key else str(self.path)


def parse_quantize_config(data: Any, where: str) -> QuantizeConfig:
    """Validate a settings dict; errors name `where`, the key, the value and what is allowed."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object with GPTQ settings, found {type(data).__name__}")
    try:
        return QuantizeConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "?"
        if err["type"] == "missing":
            raise ConfigError(f"{where}: required key '{key}' is missing") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{where}: key '{key}' has value {err.get('input')!r}; {msg}") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None


def read_quantize_config(model_dir: str | Path) -> ConfigFile:
    """Find and validate the GPTQ settings of a checkpoint directory."""
    model_dir = Path(model_dir)
    for name in CONFIG_FILES[:2]:
        path = model_dir / name
        if path.is_file():
            return ConfigFile(config=parse_quantize_config(_read_json(path), str(path)), path=path)
    path = model_dir / "config.json"
    if path.is_file():
        data = _read_json(path)
        if isinstance(data, dict) and "quantization_config" in data:
            where = f"{path}[quantization_config]"
            return ConfigFile(
                config=parse_quantize_config(data["quantization_config"], where),
                path=path,
                key="quantization_config",
            )
    raise ConfigError(
        f"{model_dir}: no GPTQ settings found (looked for quantize_config.json, quant_config.json and "
        "config.json's 'quantization_config'); is this a GPTQ checkpoint?"
    )
