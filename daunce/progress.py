"""Progress bars for long work: on by default, off when the caller says so or ``TQDM_DISABLE=1`` is set.

tqdm reads ``TQDM_DISABLE`` only when ``disable`` is not passed, so ``progress_bar`` passes ``disable=True``
when the caller turns progress off and leaves it unset otherwise: interactive runs show bars, a
headless run (``make reproduce`` sets ``TQDM_DISABLE=1``) writes none into the executed notebooks.
"""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(iterable=None, *, progress: bool = True, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, silenced when ``progress`` is false."""
    if not progress:
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)


__all__ = ["progress_bar"]
