"""PPO with the four roles on one base vs the same PPO with four model copies: peak memory and throughput.

    OMP_NUM_THREADS=1 python benchmarks/ppo_one_base.py                  # ~21M-param llama, fp32, CPU
    python benchmarks/ppo_one_base.py --hidden 1024 --layers 8 --quantization 4bit --steps 3

Builds a random llama and random SFT/RM LoRA folders (with stage manifests) in a temporary folder, then runs
each variant in its own subprocess, so each peak RSS (resource.getrusage ru_maxrss) is its own:
  one   rlhf.stages.ppo.build_roles: one base carrying policy, ref, reward and value adapters;
  four  four copies of the base, one adapter each (policy, ref, reward, value) -- the layout of trl <= 1.12's
        PPOTrainer with separate reward and value models.
Both run the same rollout + PPO update code (stages/ppo.py) for --steps timed steps after one warm-up step,
and are compared as ratios measured in one invocation. Throughput is given as process CPU time per step too: with
one thread it is what the step costs, while wall time swings when other processes share the cores
(docs/known_traps.md); the run with the least CPU time of --repeats interleaved runs is kept.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rlhf import rl  # noqa: E402
from rlhf.roles import OneBase  # noqa: E402
from rlhf.stages import ppo  # noqa: E402  (torch and the config only; the rest is imported on use)


def rss_mib() -> float:
    """Peak resident set size of this process so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_parents(root: Path, hidden: int, layers: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf.loader import load_tokenizer
    from rlhf.manifest import finish_output, prepare_output
    from rlhf.templates import apply_template
    from rlhf.tiny import make_tiny_model
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "score.weight MISSING" report of a new score head is expected here
    hf_logging.disable_progress_bar()
    base = make_tiny_model(str(root / "base"), "llama", hidden_size=hidden, num_layers=layers, num_heads=8)
    tok = load_tokenizer(base)
    apply_template(tok, "chatml")
    out = {"base": base}
    for stage in ("sft", "rm"):
        work = prepare_output(root / stage)
        torch.manual_seed(len(stage))
        if stage == "sft":
            model, task = AutoModelForCausalLM.from_pretrained(base), "CAUSAL_LM"
        else:
            model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1,
                                                                       pad_token_id=tok.pad_token_id)
            task = "SEQ_CLS"
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type=task,
                          init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(str(work))
        tok.save_pretrained(str(work))
        out[stage] = str(finish_output(work, root / stage, stage=stage,
                                       config={"template": "chatml", "finetuning_type": "lora"},
                                       base_model=base, parent=out.get("sft")))
    return out


def child(args) -> None:
    """One variant: load, one warm-up step, --steps timed steps; prints a JSON line."""
    import torch
    from accelerate import Accelerator

    torch.set_num_threads(1)
    from rlhf.config import load_config
    from rlhf.data import load_examples
    from rlhf.loader import load_tokenizer
    from rlhf.templates import apply_template, encode_prompt, stop_token_ids

    parents = json.loads(Path(args.workdir, "parents.json").read_text())
    imports_rss = rss_mib()
    cfg = load_config(ppo.PPOConfig, None, dict(
        sft_dir=parents["sft"], rm_dir=parents["rm"], model_name_or_path=parents["base"],
        quantization=args.quantization, batch_size=args.batch, mini_batch_size=args.batch // 2,
        per_device_train_batch_size=args.batch // 2, ppo_epochs=2,
        max_new_tokens=args.new_tokens, per_device_eval_batch_size=args.batch, learning_rate=1e-4))
    tok = load_tokenizer(parents["sft"])
    t0 = time.time()
    roles = ppo.build_roles(cfg, tok.pad_token_id) if args.variant == "one" else FourModels(cfg, tok.pad_token_id)
    load_s = time.time() - t0
    apply_template(tok, "chatml")
    stops = stop_token_ids(tok)
    rows = load_examples(["demo_prompts"], kind="prompt", num_samples=args.batch * (args.steps + 1))
    prompts = [encode_prompt(tok, r["messages"], 256) for r in rows]
    optimizer = torch.optim.AdamW(roles.params, lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    kl_ctl, norm = rl.KLController(cfg.kl_coef), rl.ScoreNormalizer()
    times, cpu_times, tokens = [], [], 0
    for step in range(args.steps + 1):
        torch.manual_seed(step)  # the same samples in both variants
        t, c = time.perf_counter(), time.process_time()
        batch, stats, _ = ppo.rollout(roles, prompts[step * args.batch : (step + 1) * args.batch], tok, stops, cfg,
                                      kl_ctl, norm, step)
        ppo.ppo_update(roles, batch, cfg, optimizer, scheduler, acc, roles.params)
        if step:  # step 0 warms up
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
            tokens += int(batch["mask"].sum())
    models = roles.models.values() if args.variant == "four" else [roles.model]
    n_params = len({p.data_ptr() for m in models for p in m.parameters()})
    print(json.dumps({"variant": args.variant, "peak_rss_mib": rss_mib(), "imports_rss_mib": imports_rss,
                      "s_per_step": sum(times) / len(times), "cpu_s_per_step": sum(cpu_times) / len(cpu_times),
                      "tokens_per_s": tokens / sum(times), "load_s": load_s,
                      "param_tensors": n_params}))


class FourModels(OneBase):
    """The four roles as four copies of the base with one adapter each; the interface of rlhf.roles.OneBase."""

    def __init__(self, cfg, pad_token_id: int):
        import copy

        from trl.trainer.utils import disable_dropout_in_model

        from rlhf.loader import AdapterSpec, load_model, load_score_head

        specs = {"policy": (cfg.sft_dir, True), "ref": (cfg.sft_dir, False), "reward": (cfg.rm_dir, False),
                 "value": (cfg.rm_dir, True)}
        self.models = {}
        for role, (folder, trainable) in specs.items():
            self.models[role] = load_model(cfg, head="lm", adapters=[AdapterSpec(role, folder, trainable=trainable)],
                                           for_training=True)
            disable_dropout_in_model(self.models[role])
        device = next(self.models["policy"].parameters()).device
        reward_head = load_score_head(cfg.rm_dir).float().to(device).requires_grad_(False)
        value_head = copy.deepcopy(reward_head).requires_grad_(True)
        super().__init__(self.models["policy"], reward_head, value_head, trainable=["policy", "value"],
                         temperature=cfg.temperature, pad_token_id=pad_token_id)
        self.params = [p for r in ("policy", "value") for p in self.models[r].parameters() if p.requires_grad]
        self.params += list(value_head.parameters())

    def use(self, name: str) -> None:
        self.models[name].train(self.model.training)  # train/eval mode follows, as on one model
        self.model = self.models[name]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8, help="prompts per PPO step")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed PPO steps (after one warm-up step)")
    ap.add_argument("--quantization", default="none", choices=["none", "4bit", "8bit"])
    ap.add_argument("--repeats", type=int, default=2,
                    help="runs per variant, interleaved; the one with least CPU time is kept")
    ap.add_argument("--variant", choices=["one", "four"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return child(args)

    with tempfile.TemporaryDirectory(prefix="ppo_bench_") as tmp:
        parents = make_parents(Path(tmp), args.hidden, args.layers)
        Path(tmp, "parents.json").write_text(json.dumps(parents))
        cfg_json = json.loads(Path(parents["base"], "config.json").read_text())
        res = {}
        for _ in range(args.repeats):  # interleaved, so a slow spell on shared cores hits both
            for variant in ("one", "four"):
                cmd = [sys.executable, __file__, "--variant", variant, "--workdir", tmp] + sys.argv[1:]
                out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                if out.returncode:
                    sys.exit(f"variant {variant} failed:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                if variant not in res or r["cpu_s_per_step"] < res[variant]["cpu_s_per_step"]:
                    res[variant] = r
    one, four = res["one"], res["four"]
    print(f"llama hidden {cfg_json['hidden_size']}, {cfg_json['num_hidden_layers']} layers, "
          f"vocab {cfg_json['vocab_size']}, quantization {args.quantization}; batch {args.batch}, "
          f"{args.new_tokens} new tokens, {args.steps} timed PPO steps "
          f"(2 PPO epochs x 2 minibatches each); best of {args.repeats} interleaved runs")
    print(f"{'':26}{'one base':>12}{'four copies':>14}{'one / four':>12}")
    rows = [("peak RSS (MiB)", "peak_rss_mib", ".0f"), ("  after imports (MiB)", "imports_rss_mib", ".0f"),
            ("  models + run (MiB)", None, ".0f"), ("CPU s per PPO step", "cpu_s_per_step", ".2f"),
            ("wall s per PPO step", "s_per_step", ".2f"), ("response tokens / s", "tokens_per_s", ".1f"),
            ("load (s)", "load_s", ".1f"), ("parameter tensors", "param_tensors", "d")]
    for label, key, fmt in rows:
        a = one[key] if key else one["peak_rss_mib"] - one["imports_rss_mib"]
        b = four[key] if key else four["peak_rss_mib"] - four["imports_rss_mib"]
        print(f"{label:26}{a:>12{fmt}}{b:>14{fmt}}{a / b:>12.2f}")


if __name__ == "__main__":
    main()
