"""The leaf every module may import: the error of bad input or settings, and the project's logger.

Building blocks raise StageError and log through `log` without climbing to the stage contract
(`tasks.core.stage`), which imports the store, the settings and the fault explainer.
"""

from __future__ import annotations

import logging

log = logging.getLogger("slmflow")
log.setLevel(logging.INFO)  # progress lines; Prefect forwards this logger (PREFECT_LOGGING_EXTRA_LOGGERS)


class StageError(ValueError):
    """Bad input or settings: one line naming the file, row or setting. Nothing is written."""
