"""Keep transformers' progress bars off the terminal while lorakit loads models (the library never prints)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

from transformers.utils import logging as hf_logging


@contextlib.contextmanager
def quiet_progress(*, capture_stderr: bool = False) -> Iterator[None]:
    """Disable transformers' progress bars inside the block, then restore the previous setting.

    ``capture_stderr`` also swallows writes to ``sys.stderr``: the GGUF de-quantiser uses a bare
    ``tqdm`` that transformers' switch does not reach. Log records still get out, because logging
    handlers keep the stream they were created with.
    """
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        if capture_stderr:
            with contextlib.redirect_stderr(io.StringIO()):
                yield
        else:
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
