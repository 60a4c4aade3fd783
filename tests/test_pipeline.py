"""`rlhf pipeline`: runs sft -> rm -> ppo, skips unchanged stages on a rerun, reruns a changed stage and
what follows it, resumes an interrupted stage; `rlhf inspect` prints the lineage."""
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from rlhf.manifest import read_manifest
from rlhf.cli.pipeline import inspect_cmd, lineage, run_pipeline


@pytest.fixture(scope="module")
def pipeline_file(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    sft_rows = [{"instruction": f"Which is larger, {a} or {a + 5}?", "output": str(a + 5)} for a in range(10, 40)]
    pref_rows = [{"instruction": f"Which is larger, {a} or {a + 5}?", "chosen": str(a + 5),
                  "rejected": str(a)} for a in range(10, 40)]
    for name, rows in (("sft", sft_rows), ("pref", pref_rows)):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = dict(max_steps=3, logging_steps=1, save_steps=100, max_length=64)
    spec = {
        "output_root": str(tmp / "runs"),
        "shared": {"model_name_or_path": tiny_model_dir("llama"), "seed": 3},
        "stages": {
            "sft": {**common, "dataset": [str(tmp / "sft.jsonl")], "task_eval_samples": 0},
            "rm": {**common, "dataset": [str(tmp / "pref.jsonl")]},
            "ppo": {"dataset": [str(tmp / "sft.jsonl")], "max_steps": 2, "batch_size": 4, "mini_batch_size": 4,
                    "per_device_train_batch_size": 4, "ppo_epochs": 1, "max_new_tokens": 4, "eval_samples": 0,
                    "save_steps": 100, "max_prompt_length": 64},
        },
    }
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_run_skip_and_rerun_from_changed_stage(pipeline_file):
    root = Path(yaml.safe_load(pipeline_file.read_text())["output_root"])
    assert run_pipeline(str(pipeline_file)) == [("sft", "ran"), ("rm", "ran"), ("ppo", "ran")]
    finished = {s: (root / s / "manifest.json").stat().st_mtime_ns for s in ("sft", "rm", "ppo")}
    # unchanged: no training at all
    assert run_pipeline(str(pipeline_file)) == [("sft", "skipped"), ("rm", "skipped"), ("ppo", "skipped")]
    assert all((root / s / "manifest.json").stat().st_mtime_ns == t for s, t in finished.items())
    # an RM key changed: rm and ppo rerun, sft does not
    spec = yaml.safe_load(pipeline_file.read_text())
    spec["stages"]["rm"]["learning_rate"] = 1e-3
    pipeline_file.write_text(yaml.safe_dump(spec))
    assert run_pipeline(str(pipeline_file)) == [("sft", "skipped"), ("rm", "ran"), ("ppo", "ran")]
    assert (root / "sft" / "manifest.json").stat().st_mtime_ns == finished["sft"]
    assert read_manifest(root / "rm")["config"]["learning_rate"] == 1e-3
    # --only reruns one stage; --from reruns that stage and the ones after it
    assert run_pipeline(str(pipeline_file), only="sft") == [("sft", "ran")]
    assert run_pipeline(str(pipeline_file)) == [("sft", "skipped"), ("rm", "ran"), ("ppo", "ran")]  # its parent changed
    assert run_pipeline(str(pipeline_file), start="ppo") == [("sft", "skipped"), ("rm", "skipped"), ("ppo", "ran")]


def test_interrupted_stage_is_resumed(pipeline_file):
    """A stage folder left as .partial by a crash is resumed by the next pipeline run, not restarted."""
    import shutil

    root = Path(yaml.safe_load(pipeline_file.read_text())["output_root"])
    run_pipeline(str(pipeline_file))
    rm = root / "rm"
    shutil.move(rm, root / "rm.partial")  # what a kill before the rename leaves (checkpoints, requested config)
    (root / "rm.partial" / "manifest.json").unlink()
    report = run_pipeline(str(pipeline_file))
    assert report[:2] == [("sft", "skipped"), ("rm", "resumed")]
    assert read_manifest(rm)["stage"] == "rm"


def test_inspect_prints_the_chain(pipeline_file):
    root = Path(yaml.safe_load(pipeline_file.read_text())["output_root"])
    run_pipeline(str(pipeline_file))
    chain = lineage(str(root / "ppo"))
    assert [m["stage"] for m in chain] == ["ppo", "rm", "sft"] or [m["stage"] for m in chain] == ["ppo", "sft"]
    out = CliRunner().invoke(inspect_cmd, [str(root / "ppo")])
    assert out.exit_code == 0, out.output
    assert "base model:" in out.output and "sft:" in out.output and "ppo:" in out.output and "metrics:" in out.output


def test_bad_pipeline_file(tmp_path):
    from rlhf.config import ConfigError

    p = tmp_path / "p.yaml"
    p.write_text("stages: {sfx: a.yaml}\n")
    with pytest.raises(ConfigError, match="unknown stage 'sfx'; did you mean 'sft'"):
        run_pipeline(str(p))
    p.write_text("stage: {sft: a.yaml}\n")
    with pytest.raises(ConfigError, match="unknown key 'stage'; did you mean 'stages'"):
        run_pipeline(str(p))


def test_bad_launch_section(tmp_path):
    from rlhf.config import ConfigError

    p = tmp_path / "p.yaml"
    for launch, msg in (("{launcher: mpirun}", "must be accelerate or torchrun"),
                        ("{num_proceses: 2}", "unknown launch key 'num_proceses'; did you mean 'num_processes'"),
                        ("{launcher: torchrun}", "torchrun needs launch.num_processes"),
                        ("{num_processes: 0}", "whole number >= 1"),
                        ("{config_file: nowhere.yaml}", "nowhere.yaml does not exist")):
        p.write_text(f"launch: {launch}\nstages: {{sft: {{dataset: [x]}}}}\n")
        with pytest.raises(ConfigError, match=msg):
            run_pipeline(str(p))


def test_launch_applies_per_stage_and_never_to_pt(tmp_path):
    from rlhf.config import ConfigError
    from rlhf.cli.pipeline import launch_command, stage_configs

    acc = tmp_path / "acc.yaml"
    acc.write_text("distributed_type: MULTI_GPU\n")
    p = tmp_path / "p.yaml"
    p.write_text("launch: {config_file: acc.yaml, num_processes: 2}\n"  # relative to the pipeline file
                 "stages: {pt: {}, sft: {dataset: [x]}, rm: {dataset: [y], launch: {launcher: torchrun, num_processes: "
                 "4}},"
                 " ppo: {dataset: [z], launch: false}}\n")
    launches = {stage: launch for stage, _, launch in stage_configs(str(p))}
    assert launches["pt"] is None and launches["ppo"] is None
    assert launches["sft"]["config_file"] == str(acc) and launches["rm"]["launcher"] == "torchrun"
    cmd = launch_command(launches["sft"], "sft", "cfg.yaml")
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and cmd[-4:] == ["-m", "rlhf", "sft", "cfg.yaml"]
    assert "--num_processes" in cmd and "--main_process_port" in cmd
    cmd = launch_command(launches["rm"], "rm", "c.yaml")
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "4"]
    p.write_text("stages: {pt: {launch: {num_processes: 2}}}\n")
    with pytest.raises(ConfigError, match="pt trains its small base in one process"):
        stage_configs(str(p))
