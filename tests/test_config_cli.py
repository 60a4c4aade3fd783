"""Config loading and the CLI: overrides, typed errors that name key/file/nearest key, fast --help."""
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from rlhf.cli import cli
from rlhf.config import ConfigError, load_config, parse_overrides
from rlhf.stages.sft import SFTConfig


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("dataset: [demo_sft]\nlearning_rate: 1e-3\nlora_target: q_proj,v_proj\n")
    cfg = load_config(SFTConfig, str(f),
                      parse_overrides(["--learning-rate", "5e-5", "--bf16=true", "lora_r=16", "--packing"]))
    assert cfg.learning_rate == 5e-5 and cfg.bf16 is True and cfg.lora_r == 16 and cfg.packing is True
    assert cfg.lora_target == ["q_proj", "v_proj"] and cfg.dataset == ["demo_sft"]


def test_unknown_key_names_file_and_nearest(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("dataset: [x]\nlearning_rat: 1e-3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key 'learning_rat'; did you mean 'learning_rate'"):
        load_config(SFTConfig, str(f))
    with pytest.raises(ConfigError, match=r"command line: unknown key 'lora_rnk'; did you mean 'lora_rank'"):
        load_config(SFTConfig, None, {"dataset": "x", "lora_rnk": "8"})  # lora_rank: an alias (rlhf/aliases.py)


def test_wrong_type_and_choice(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("dataset: [x]\nlora_r: eight\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: key 'lora_r' expects int, got 'eight'"):
        load_config(SFTConfig, str(f))
    with pytest.raises(ConfigError, match="quantization' must be one of"):
        load_config(SFTConfig, None, {"dataset": "x", "quantization": "3bit"})
    with pytest.raises(ConfigError, match="bf16' expects bool"):
        load_config(SFTConfig, None, {"dataset": "x", "bf16": "maybe"})


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SFTConfig, "nope.yaml")


def test_cli_errors_are_one_line():
    r = CliRunner().invoke(cli, ["sft", "--datset", "demo_sft"])
    assert r.exit_code == 2 and "did you mean 'dataset'" in r.output
    r = CliRunner().invoke(cli, ["sft", "--help"])
    assert r.exit_code == 0 and "--lora-alpha" in r.output and "LoRA alpha" in r.output


def test_help_is_fast():
    t = time.time()
    out = subprocess.run([sys.executable, "-m", "rlhf", "--help"], capture_output=True, text=True, check=True)
    assert "sft" in out.stdout and "ppo" in out.stdout
    assert time.time() - t < 1.5
