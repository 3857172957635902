import json

import pytest

from gptq_bridge.config import QuantizeConfig, read_quantize_config
from gptq_bridge.errors import ConfigError

CARD_MAIN = {  # the main branch of Nous-Hermes-Llama2-70B-GPTQ, as AutoGPTQ wrote it
    "bits": 4,
    "group_size": -1,
    "damp_percent": 0.1,
    "desc_act": True,
    "sym": True,
    "true_sequential": True,
    "model_name_or_path": None,
    "model_file_base_name": "model",
}


def write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_reads_quantize_config_first(tmp_path):
    write(tmp_path / "quantize_config.json", CARD_MAIN)
    write(tmp_path / "quant_config.json", {"bits": 3})
    write(tmp_path / "config.json", {"quantization_config": {"bits": 8, "quant_method": "gptq"}})
    found = read_quantize_config(tmp_path)
    assert found.path.name == "quantize_config.json" and found.key is None
    assert found.config.bits == 4 and found.config.group_size == -1 and found.config.desc_act
    assert found.config.damp_percent == 0.1 and found.config.model_file_base_name == "model"


def test_then_quant_config_then_config_json(tmp_path):
    write(
        tmp_path / "config.json",
        {
            "model_type": "llama",
            "quantization_config": {
                "bits": 8,
                "group_size": 64,
                "quant_method": "gptq",
                "checkpoint_format": "gptq_v2",
                "use_exllama": True,
            },
        },
    )
    found = read_quantize_config(tmp_path)
    assert (found.key, found.config.bits, found.config.group_size) == ("quantization_config", 8, 64)
    assert found.config.zero_offset == 0
    assert found.label.endswith("config.json[quantization_config]")
    write(tmp_path / "quant_config.json", {"bits": 3, "group_size": 128})
    assert read_quantize_config(tmp_path).path.name == "quant_config.json"


def test_unknown_keys_are_kept_and_written_back():
    cfg = QuantizeConfig.model_validate(
        {**CARD_MAIN, "meta": {"quantizer": ["gptqmodel:7.6.0"]}, "pack_dtype": "int32"}
    )
    out = cfg.to_json_dict()
    assert out["pack_dtype"] == "int32" and out["meta"] == {"quantizer": ["gptqmodel:7.6.0"]}


def test_gptqmodel_format_key_is_an_alias():
    assert QuantizeConfig.model_validate({"bits": 4, "format": "gptq_v2"}).checkpoint_format == "gptq_v2"
    assert QuantizeConfig.model_validate({"bits": 4}).zero_offset == 1


@pytest.mark.parametrize(
    "key,value,allowed",
    [
        ("bits", 5, "allowed: 2, 3, 4, 8"),
        ("bits", "4", "allowed: 2, 3, 4, 8"),
        ("group_size", 0, "allowed: -1"),
        ("group_size", -2, "allowed: -1"),
        ("quant_method", "awq", 'allowed: "gptq"'),
        ("checkpoint_format", "marlin", "repacked layouts such as marlin are not read"),
        ("damp_percent", 1.5, "between 0 and 1"),
        ("desc_act", "maybe", "valid boolean"),
    ],
)
def test_invalid_values_name_file_key_value_and_what_is_allowed(tmp_path, key, value, allowed):
    path = write(tmp_path / "quantize_config.json", {**CARD_MAIN, key: value})
    with pytest.raises(ConfigError) as err:
        read_quantize_config(tmp_path)
    msg = str(err.value)
    assert str(path) in msg and f"'{key}'" in msg and repr(value) in msg and allowed in msg


def test_missing_bits_and_broken_json_and_no_settings(tmp_path):
    write(tmp_path / "quantize_config.json", {"group_size": 128})
    with pytest.raises(ConfigError, match="required key 'bits' is missing"):
        read_quantize_config(tmp_path)
    (tmp_path / "quantize_config.json").write_text("{bits: 4")
    with pytest.raises(ConfigError, match="quantize_config.json: not valid JSON"):
        read_quantize_config(tmp_path)
    (tmp_path / "quantize_config.json").unlink()
    write(tmp_path / "config.json", {"model_type": "llama"})
    with pytest.raises(ConfigError, match="no GPTQ settings found"):
        read_quantize_config(tmp_path)


def test_groups_counts_partial_last_group():
    assert QuantizeConfig(bits=4, group_size=128).groups(576) == 5  # 4 x 128 + 64
    assert QuantizeConfig(bits=4, group_size=-1).groups(576) == 1
