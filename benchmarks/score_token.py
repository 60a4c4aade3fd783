"""Where PPO reads the reward vs where the reward model was trained to score (docs/score_token.md).

Trains the demo chain (pt -> sft -> rm, the demo recipes) with a template whose end of turn is eos, so that
pad = eos = the stop token (``--template alpaca``, the default here), then scores the held-out preference pairs
three ways:
  as trained         the RM folder's forward (AutoModelForSequenceClassification: rightmost non-pad token);
  as PPO reads it    PPO's one-base reward (rlhf/roles.py OneBase.scores, rlhf.scoring.score_positions);
  at the stop token  the position PPO read before the score token was defined once (the response's last token).

    .venv/bin/python benchmarks/score_token.py [--template alpaca] [--workdir runs/score_token]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def stage(mod, cls: str, yaml: str, out: Path, **over) -> str:
    from rlhf.config import load_config

    if (out / "manifest.json").is_file():
        return str(out)
    return mod.run(load_config(getattr(mod, cls), yaml, dict(over, output_dir=str(out), overwrite_output_dir=True)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--template", default="alpaca")
    p.add_argument("--workdir", default="runs/score_token")
    p.add_argument("--max-length", type=int, default=160, help="alpaca's preamble needs more than the demo's 64 tokens")
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from rlhf.config import load_config
    from rlhf.data import load_examples
    from rlhf.evaluate import pairwise
    from rlhf.generation import left_pad
    from rlhf.loader import load_tokenizer
    from rlhf.logging_utils import setup_logging
    from rlhf.scoring import score_pairs, score_positions
    from rlhf.stage_folder import load_reward_model
    from rlhf.stages import ppo, pt, rm, sft
    from rlhf.templates import encode_pair

    setup_logging()
    w = Path(args.workdir)
    base = stage(pt, "PTConfig", "configs/demo/pt.yaml", w / "pt")
    sft_dir = stage(sft, "SFTConfig", "configs/demo/sft.yaml", w / f"sft_{args.template}", model_name_or_path=base,
                    template=args.template, max_length=args.max_length)
    rm_dir = stage(rm, "RMConfig", "configs/demo/rm.yaml", w / f"rm_{args.template}", sft_dir=sft_dir,
                   max_length=args.max_length)

    tok = load_tokenizer(rm_dir)
    pairs = load_examples(["demo_pref_eval"], kind="preference")
    cfg = load_config(ppo.PPOConfig, None, dict(sft_dir=sft_dir, rm_dir=rm_dir, model_name_or_path=base))
    cfg.quantization = "none"
    roles = ppo.build_roles(cfg, tok.pad_token_id)
    model, _ = load_reward_model(rm_dir)
    print(f"template {args.template}: pad {tok.pad_token!r}, eos {tok.eos_token!r}, {len(pairs)} held-out pairs")
    result = {}
    for side in ("chosen", "rejected"):
        rows = [encode_pair(tok, e["messages"], e[side], args.max_length)[0] for e in pairs]
        trained = score_pairs(model, tok, pairs, [e[side] for e in pairs], args.max_length)
        ids, attn = left_pad(rows, tok.pad_token_id)
        with torch.no_grad():
            s = roles.head_forward(ids, attn, "reward", roles.reward_head)
        result[side] = {"as trained": trained,
                        "as PPO reads it": s[torch.arange(len(ids)), score_positions(ids, tok.pad_token_id)].tolist(),
                        "at the stop token": s[:, -1].tolist()}
    for how in result["chosen"]:
        acc = pairwise(result["chosen"][how], result["rejected"][how])["accuracy"]
        print(f"  held-out pairwise accuracy {how:<18} {acc:.3f}")


if __name__ == "__main__":
    main()
