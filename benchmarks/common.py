"""What the benchmark scripts share: one-thread environment, child processes that report JSON, a tiny base model,
the machine's description, and a spy on the trainer that times (and optionally measures) ``train()``.

Every comparison runs its variants as separate child processes (so peak RSS is each one's own), interleaved
(so a slow spell on shared cores hits all of them), and reports ratios measured in one invocation.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
for _k, _v in ENV.items():
    os.environ.setdefault(_k, _v)
ROOT = Path(__file__).resolve().parent.parent


def rss_mib() -> float:
    """Peak resident set size of this process so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_average() -> str:
    """The 1/5/15-minute load averages, as uptime prints them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
           "threads": os.environ.get("OMP_NUM_THREADS"), "gpu": None}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def run_child(args: list[str], timeout: int = 1800) -> dict:
    """Run ``python args...`` with the one-thread environment; return the JSON object on its last stdout line."""
    t = time.time()
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env={**os.environ, **ENV},
                         timeout=timeout, cwd=ROOT)
    if out.returncode:
        sys.exit(f"child {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    lines = [line for line in out.stdout.strip().splitlines() if line.startswith("{")]
    if not lines:
        sys.exit(f"child {' '.join(args)} printed no JSON result:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    res = json.loads(lines[-1])
    res["process_s"] = time.time() - t
    return res


def best_of(repeats: int, sides, run, key) -> dict:
    """Run every side ``repeats`` times, interleaved (so a slow spell on shared cores hits every side), and keep
    for each side the result with the smallest ``key(result)``."""
    best: dict = {}
    for _ in range(repeats):
        for side in sides:
            r = run(side)
            if side not in best or key(r) < key(best[side]):
                best[side] = r
    return best


def make_base(folder: Path, hidden: int = 256, layers: int = 4, heads: int = 4, vocab_texts: int = 400,
              vocab_size: int | None = None) -> str:
    """A random tiny llama with a trained tokenizer (512 tokens) whose chat template is chatml (saved with it);
    ``vocab_size``: the model's embedding and output rows, when a real tokenizer's width is wanted (the ids past the
    tokenizer's are never seen in the data but cost their share of the output layer)."""
    from rlhf.loader import load_tokenizer
    from rlhf.templates import apply_template
    from rlhf.tiny import make_tiny_model, sample_texts, train_tokenizer

    if (folder / "config.json").is_file():
        return str(folder)
    tok = train_tokenizer(sample_texts(vocab_texts), str(folder), vocab_size=512)
    make_tiny_model(str(folder), "llama", tokenizer=tok, hidden_size=hidden, num_layers=layers, num_heads=heads,
                    **({"vocab_size": vocab_size} if vocab_size else {}))
    tok = load_tokenizer(str(folder))
    apply_template(tok, "chatml")
    tok.save_pretrained(str(folder))
    return str(folder)


def spy_on_train(trainer_cls, track_memory: bool, into: dict) -> None:
    """Replace ``trainer_cls.train`` by a wrapper that calls it and records its metrics, wall time, process CPU time,
    and the peak bytes of live tensors while it ran (``track_memory``; CUDA: max_memory_allocated)."""
    real = trainer_cls.train

    def train(self, *a, **kw):
        from rlhf.estimate import measure_peak

        t, c = time.perf_counter(), time.process_time()
        if track_memory:
            m = measure_peak(real, self, *a, **kw)
            out, into["train_peak_bytes"], into["train_start_bytes"] = m.result, m.peak, m.start
        else:
            out = real(self, *a, **kw)
        into.update(train_wall_s=time.perf_counter() - t, train_cpu_s=time.process_time() - c,
                    metrics=dict(out.metrics))
        into["num_tokens"] = self.state.log_history[-2].get("num_tokens") if len(self.state.log_history) > 1 else None
        import torch

        if torch.cuda.is_available():
            into["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        return out

    trainer_cls.train = train


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_json(path: str | None, obj: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(obj, indent=1, default=str))
