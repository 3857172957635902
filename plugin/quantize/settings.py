"""The settings a quantization run writes: presets, defaults, explicit options, validated as a `QuantizeConfig`."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ..config import QuantizeConfig
from ..errors import QuantizeError

# The branches of TheBloke/Nous-Hermes-Llama2-70B-GPTQ (all symmetric, damp 0.1, act-order).
PRESETS: dict[str, dict[str, Any]] = {
    "main": dict(bits=4, group_size=-1, desc_act=True, sym=True, damp_percent=0.1),
    "gptq-4bit-32g-actorder_True": dict(bits=4, group_size=32, desc_act=True, sym=True, damp_percent=0.1),
    "gptq-4bit-64g-actorder_True": dict(bits=4, group_size=64, desc_act=True, sym=True, damp_percent=0.1),
    "gptq-4bit-128g-actorder_True": dict(bits=4, group_size=128, desc_act=True, sym=True, damp_percent=0.1),
    "gptq-3bit--1g-actorder_True": dict(bits=3, group_size=-1, desc_act=True, sym=True, damp_percent=0.1),
    "gptq-3bit-128g-actorder_True": dict(bits=3, group_size=128, desc_act=True, sym=True, damp_percent=0.1),
}
# Without a preset (AutoGPTQ's BaseQuantizeConfig defaults, except group 128 which everyone passes).
DEFAULTS: dict[str, Any] = dict(
    bits=4,
    group_size=128,
    desc_act=False,
    sym=True,
    static_groups=False,
    damp_percent=0.01,
    true_sequential=True,
    checkpoint_format="gptq",
)


def model_file_base_name(bits: int, group_size: int) -> str:
    """AutoGPTQ's weight file stem, e.g. gptq_model-4bit-128g (gptq_model-4bit--1g without groups)."""
    return f"gptq_model-{bits}bit-{group_size}g"


def resolve_settings(preset: str | None = None, **overrides: Any) -> QuantizeConfig:
    """Preset values, then explicit (non-None) overrides, on top of the defaults; validated by `QuantizeConfig`.

    Errors name the option, the value given and what is allowed.
    """
    settings = dict(DEFAULTS)
    if preset is not None:
        if preset not in PRESETS:
            raise QuantizeError(f"preset {preset!r} is unknown; choose one of: {', '.join(PRESETS)}")
        settings.update(PRESETS[preset])
    settings.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return QuantizeConfig.model_validate(settings)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "?"
        msg = err["msg"].removeprefix("Value error, ")
        raise QuantizeError(f"{key} {err.get('input')!r} is not valid; {msg}") from None
