"""Progress bars for long jobs (batch answering, evaluation, training): tqdm's when it is installed.

tqdm is an optional dependency (extras `finetune` and `eval`); without it, or when the caller turns
progress off (`--no-progress`, ranks other than 0), jobs run without a bar.
"""

from __future__ import annotations


def progress_bar(enabled: bool, total: int, unit: str, desc: str | None = None, initial: int = 0):
    """A tqdm bar over `total` units starting at `initial`, or None when not `enabled` or tqdm is missing.
    Callers update it with `bar.update(n)` and close it with `bar.close()` when it is not None."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True)
