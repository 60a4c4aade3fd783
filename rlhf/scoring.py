"""The score token: the one position at which a sequence is scored (docs/score_token.md).

A reward model scores a sequence at its rightmost token that is not the pad token, which is what
``AutoModelForSequenceClassification`` reads (with ``config.pad_token_id`` = the tokenizer's pad) and
so what trl's RewardTrainer trains, what the RM folder gives when loaded with plain transformers +
peft, and what ``rlhf score``/``rlhf eval``/PPO read. When pad = eos = the stop token, that is the
token *before* the final stop token; a response cut at max_new_tokens is scored at its last token.
Left and right padding give the same position.
"""
from __future__ import annotations

import torch


def score_positions(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Index of each row's score token: its rightmost non-pad token (0 for a row of pads only)."""
    non_pad = (input_ids != pad_token_id).int()
    return (torch.arange(input_ids.shape[1], device=input_ids.device) * non_pad).argmax(-1)


def score_pairs(model, tokenizer, examples: list[dict], responses: list[str], max_length: int = 1024,
                batch_size: int = 16) -> list[float]:
    """Scores of (prompt messages, response) pairs under a reward model (its head reads the score token)."""
    from rlhf.generation import pad
    from rlhf.templates import encode_pair

    ids = [encode_pair(tokenizer, e["messages"], r, max_length)[0] for e, r in zip(examples, responses)]
    device = next(model.parameters()).device
    scores = []
    with torch.no_grad():
        for i in range(0, len(ids), batch_size):
            x, mask = pad(ids[i : i + batch_size], tokenizer.pad_token_id, "right")  # the head reads the score token
            scores += model(input_ids=x.to(device), attention_mask=mask.to(device)).logits[:, 0].float().tolist()
    return scores
