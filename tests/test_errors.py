"""One line per user error (issue 12, items 6, 7b, 8): every error a user can cause reaches the CLI as an RlhfError
and prints one `Error:` line naming what, where and what to do, with no traceback (RLHF_DEBUG=1 shows it); the
lineage check of a parent folder; remote code only with --trust-remote-code."""
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from rlhf.cli import cli
from rlhf.config import ConfigError, load_config
from rlhf.stages.sft import SFTConfig

RLHF = str(Path(sys.executable).with_name("rlhf"))


def one_error(r, *needles: str) -> str:
    """The single `Error:` line of a failed command (CliRunner result or CompletedProcess), holding ``needles``."""
    out = r.output if hasattr(r, "output") else r.stdout + r.stderr
    code = r.exit_code if hasattr(r, "exit_code") else r.returncode
    if hasattr(r, "exception") and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"uncaught {r.exception!r}") from r.exception
    lines = [line for line in out.replace("\r", "\n").splitlines() if "Error:" in line]
    assert code != 0 and "Traceback" not in out and len(lines) == 1, out
    line = lines[0][lines[0].index("Error:"):]
    for n in needles:
        assert n in line, line
    return line


def stage_folder(path: Path, stage: str, base: str, *, adapter_base: str | None = None, **config) -> str:
    """A finished-looking stage folder recording ``base``: manifest, tokenizer, and an adapter (trained on
    ``adapter_base`` when given, else on ``base``) or, with adapter_base="", only an empty adapter config."""
    from transformers import AutoTokenizer

    from rlhf.config import ModelConfig
    from rlhf.loader import AdapterSpec, load_model
    from rlhf.manifest import model_fingerprint

    path.mkdir(parents=True)
    if adapter_base == "":
        (path / "adapter_config.json").write_text("{}")
    else:
        model = load_model(ModelConfig(model_name_or_path=adapter_base or base, lora_target=["all-linear"]),
                           adapters=[AdapterSpec("default", trainable=True)])
        model.save_pretrained(str(path))
        AutoTokenizer.from_pretrained(base).save_pretrained(str(path))
    manifest = {"stage": stage, "base_model": {"path": base, "fingerprint": model_fingerprint(base)},
                "config": {"model_name_or_path": base, "finetuning_type": "lora", "lora_target": ["all-linear"],
                           **config}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return str(path)


def rm_args(sft_dir: str, out: Path) -> list[str]:
    return ["rm", "--sft-dir", sft_dir, "--dataset", "demo_pref", "--num-samples", "8", "--max-steps", "1",
            "--output-dir", str(out), "--max-length", "64"]


# ---------------------------------------------------------------------------------------------------------------
# item 8: config and data, checked before any model loads


def test_validate_errors_are_one_line_from_the_real_entry(tmp_path):
    r = subprocess.run([RLHF, "sft"], capture_output=True, text=True)
    one_error(r, "sft: no dataset given", "dataset:")
    r = subprocess.run([RLHF, "rm", "--dataset", "demo_pref"], capture_output=True, text=True)
    one_error(r, "set sft_dir")


def test_bad_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("dataset: [demo_sft]\nlearning_rate: [1, 2\nseed: 3\n")
    line = one_error(CliRunner().invoke(cli, ["sft", str(f)]), f"{f}, line 3", "not valid YAML")
    assert "<unicode string>" not in line


def test_bad_template_and_lora_target_are_config_errors():
    with pytest.raises(ConfigError,
                       match=r"command line: key 'template' must be one of .*got 'chatmlx'; did you mean 'chatml'"):
        load_config(SFTConfig, None, {"dataset": "demo_sft", "template": "chatmlx"})
    with pytest.raises(ConfigError, match=r"key 'lora_target': 'auto' and 'all-linear' stand alone"):
        load_config(SFTConfig, None, {"dataset": "demo_sft", "lora_target": "all-linear,q_proj"})


def test_names_are_checked_before_torch_loads():
    code = ("import sys\nfrom rlhf.cli import cli\n"
            "for args in (['sft', '--dataset', 'demo_sfx', '--model-name-or-path', 'no/such/model'],\n"
            "             ['sft', '--dataset', 'demo_sft', '--template', 'chatmlx']):\n"
            "    try:\n        cli(args, standalone_mode=False)\n"
            "    except Exception as e:\n        print(type(e).__name__, e)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "unknown dataset 'demo_sfx'" in out and "did you mean 'demo_sft'" in out and "'template'" in out, out
    assert out.strip().endswith("False"), out


def test_bad_lora_target_name_is_one_line(tiny_model_dir, tmp_path, monkeypatch):
    import transformers

    def no_weights(*a, **kw):
        raise AssertionError("the weights loaded before lora_target was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)  # checked on a meta skeleton
    r = CliRunner().invoke(cli, ["sft", "--model-name-or-path", tiny_model_dir("llama"), "--dataset", "demo_sft",
                                 "--num-samples", "8", "--max-steps", "1", "--output-dir", str(tmp_path / "o"),
                                 "--lora-target", "qproj", "--task-eval-samples", "0"])
    one_error(r, "lora_target 'qproj' matches no linear layer", "q_proj")
    assert not (tmp_path / "o.partial").exists()


def test_bad_json_row_to_score_is_one_line(tmp_path):
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c", "response": \n')
    r = CliRunner().invoke(cli, ["score", str(tmp_path / "no_rm"), "--input", str(bad), "--output",
                                 str(tmp_path / "o.jsonl")])
    one_error(r, "in.jsonl", "2")


def test_pipeline_and_inspect_errors_are_one_line(tmp_path):
    f = tmp_path / "pipeline.yaml"
    f.write_text("output_root: runs/x\nstages:\n  sft: {learning_rate: 1.0e-3}\n")
    one_error(CliRunner().invoke(cli, ["pipeline", str(f)]), "sft: no dataset given")
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "manifest.json").write_text("{")
    one_error(CliRunner().invoke(cli, ["inspect", str(tmp_path / "stage")]), "manifest.json: damaged")


def test_debug_switch_shows_the_traceback():
    r = CliRunner().invoke(cli, ["sft"], env={"RLHF_DEBUG": "1"})
    assert isinstance(r.exception, ConfigError)


def test_bitsandbytes_kernels_notice_is_silenced(caplog):
    from rlhf.logging_utils import setup_logging

    setup_logging()
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
                    "`pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        log.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]


# ---------------------------------------------------------------------------------------------------------------
# item 8: the output disk


def test_disk_errors_name_the_folder(tmp_path, monkeypatch):
    from rlhf.errors import disk_error

    e = disk_error(OSError(errno.EROFS, "Read-only file system", str(tmp_path / "o.lock")))
    assert "o.lock: the file system is read-only; make it writable" in str(e)
    e = disk_error(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "o")))
    assert f"{tmp_path / 'o'}: permission denied; check its permissions" in str(e)
    assert disk_error(RuntimeError("a bug"), tmp_path) is None  # space left: not the disk's fault

    def full(*a, **k):  # a full disk surfaces as torch's "unexpected pos", not as "No space left"
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 84160 vs 84052")

    monkeypatch.setattr("rlhf.stages.sft.run", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 0))
    r = CliRunner().invoke(cli, ["sft", "--dataset", "demo_sft", "--output-dir", str(tmp_path / "out")])
    one_error(r, f"cannot write {tmp_path / 'out'}: no space left on the device", "unexpected pos", "free space")


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk("ro")``: a 300 KiB tmpfs (root only), for real full and read-only file systems."""
    mounts = []

    def mount(opts: str = "rw") -> Path:
        mnt = tmp_path / f"mnt{len(mounts)}"
        mnt.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=300k,{opts}", "tmpfs",
                                                str(mnt)]).returncode:
            pytest.skip("needs root to mount a small tmpfs")
        mounts.append(mnt)
        return mnt

    yield mount
    for mnt in mounts:
        subprocess.run(["umount", "-l", str(mnt)])


def test_full_and_read_only_output_disk(small_disk, tiny_model_dir):
    def sft(out: Path):
        return CliRunner().invoke(cli, ["sft", "--model-name-or-path", tiny_model_dir("llama"), "--dataset", "demo_sft",
                                        "--num-samples", "16", "--max-steps", "3", "--save-steps", "1",
                                        "--max-length", "64", "--task-eval-samples", "0", "--output-dir", str(out)])

    full = small_disk()
    one_error(sft(full / "sft"), f"cannot write {full / 'sft'}: no space left on the device", "free space")
    from rlhf.manifest import unlock_output

    unlock_output(full / "sft")  # the failed run's lock is released at exit; the disk goes before that
    read_only = small_disk("ro")
    one_error(sft(read_only / "sft"), f"cannot write {read_only}", "the file system is read-only")


# ---------------------------------------------------------------------------------------------------------------
# item 6: lineage and damaged parent files


def test_remade_base_is_refused(tiny_tokenizer_dir, tmp_path):
    from rlhf.tiny import make_tiny_model

    base = make_tiny_model(str(tmp_path / "base"), "llama", tokenizer=tiny_tokenizer_dir, seed=1)
    sft = stage_folder(tmp_path / "sft", "sft", base, adapter_base="")
    make_tiny_model(base, "llama", tokenizer=tiny_tokenizer_dir, seed=2)  # same shape, other weights
    r = CliRunner().invoke(cli, rm_args(sft, tmp_path / "rm"))
    one_error(r, f"{sft} was trained on base model {base}", "another one", "rerun rlhf sft")


def test_damaged_parent_files_are_one_line(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama")
    bad_manifest = stage_folder(tmp_path / "m", "sft", base, adapter_base="")
    (Path(bad_manifest) / "manifest.json").write_text('{"stage": "sft", "base_')
    one_error(CliRunner().invoke(cli, rm_args(bad_manifest, tmp_path / "o1")), "manifest.json: damaged", "rerun")

    torn = stage_folder(tmp_path / "torn", "sft", base)
    weights = Path(torn) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    one_error(CliRunner().invoke(cli, rm_args(torn, tmp_path / "o2")), f"{weights}: damaged adapter weights")
    for name in ("adapter_config.json", "tokenizer.json"):
        torn = stage_folder(tmp_path / f"torn_{name}", "sft", base)
        (Path(torn) / name).write_text('{"version": "1.0", "peft_ty')
        one_error(CliRunner().invoke(cli, rm_args(torn, tmp_path / f"o_{name}")), torn, "rerun the stage")


def test_adapter_of_another_shape_is_one_line(tiny_model_dir, tiny_tokenizer_dir, tmp_path):
    from rlhf.tiny import make_tiny_model

    base = tiny_model_dir("llama")
    wide = make_tiny_model(str(tmp_path / "wide"), "llama", tokenizer=tiny_tokenizer_dir, hidden_size=96)
    other_shape = stage_folder(tmp_path / "s1", "sft", base, adapter_base=wide)
    one_error(CliRunner().invoke(cli, rm_args(other_shape, tmp_path / "o1")),
              f"{other_shape}/adapter_model.safetensors: the adapter does not fit this base model", "has shape")
    other_arch = stage_folder(tmp_path / "s2", "sft", base, adapter_base=tiny_model_dir("gpt2"))
    one_error(CliRunner().invoke(cli, rm_args(other_arch, tmp_path / "o2")),
              f"{other_arch}/adapter_config.json: the adapter targets", "another base")


# ---------------------------------------------------------------------------------------------------------------
# item 7b: a stage folder never turns remote code on


@pytest.fixture
def remote_code_base(tiny_model_dir, tmp_path):
    """A model folder whose config.json maps to its own modelling .py, which writes ``marker`` when imported."""
    base = tmp_path / "remote"
    shutil.copytree(tiny_model_dir("llama"), base)
    marker = tmp_path / "PAYLOAD_RAN"
    (base / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil_llama'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(model_type="evil_llama",
               auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel",
                                                  "AutoModelForSequenceClassification": "evil.EvilModel"})
    (base / "config.json").write_text(json.dumps(cfg))
    return str(base), marker


@pytest.mark.parametrize("command", ["generate", "chat", "eval", "export", "score"])
def test_manifest_cannot_enable_remote_code(remote_code_base, tmp_path, command):
    base, marker = remote_code_base
    folder = stage_folder(tmp_path / "stage", "rm" if command == "score" else "sft", base, adapter_base="",
                          trust_remote_code=True)
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"instruction": "Which is larger, 3 or 9?", "response": "9"}) + "\n")
    args = {"generate": ["--input", str(prompts), "--output", str(tmp_path / "out.jsonl")],
            "chat": [], "eval": ["--dataset", "demo_sft_eval", "--num-samples", "2"],
            "export": ["--out", str(tmp_path / "export")],
            "score": ["--input", str(prompts), "--output", str(tmp_path / "out.jsonl")]}[command]
    r = CliRunner().invoke(cli, [command, folder, *args], input="")
    assert not marker.exists(), "the manifest's trust_remote_code ran the model's code"
    one_error(r, f"{base} needs its own Python code", "--trust-remote-code")
    if command == "generate":  # the payload is live: the user's own option runs it
        from transformers import AutoConfig

        AutoConfig.from_pretrained(base, trust_remote_code=True)
        assert marker.exists()
