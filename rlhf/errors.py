"""The one home of user errors: every error a user can cause (bad config, data, folder, model path,
template) is an ``RlhfError``. The CLI catches this base once and prints one ``Error:`` line; set
``RLHF_DEBUG=1`` to see the traceback instead."""
from __future__ import annotations


class RlhfError(Exception):
    """An error the user can fix; the message says what was wrong, where, and what to do."""
