"""Small helpers the test modules share (pytest puts tests/ on sys.path: `from helpers import write_jsonl`)."""
import json
from pathlib import Path


def write_jsonl(path, rows) -> str:
    """Write ``rows`` (dicts) as JSON lines to ``path``; returns the path as a string."""
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
