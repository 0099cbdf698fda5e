"""No network during downstream evaluation unless the user asks for it.

lm-eval loads task data through Hugging Face `datasets` and the hub client, which would try to
download whatever is not cached. Before either is used, `stay_offline` sets HF_DATASETS_OFFLINE
and HF_HUB_OFFLINE to 1, so a task whose data is not on disk fails at once with the library's
own message instead of hanging on a network that may not be there. Opting in: `eval --online`,
MIXTRAL_JAX_EVAL_ONLINE=1, or either variable set to 0 by the user (an explicit value is kept).
"""

from __future__ import annotations

import os
import sys

OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
ONLINE_ENV = "MIXTRAL_JAX_EVAL_ONLINE"
_TRUE = {"1", "ON", "YES", "TRUE"}


def stay_offline(online: bool = False) -> bool:
    """Keep `datasets` and the hub client offline unless `online` or the environment opts in;
    returns whether they are offline. Modules imported earlier read their setting once at
    import, so theirs is set too."""
    if online or os.environ.get(ONLINE_ENV, "").upper() in _TRUE:
        return False
    for var in OFFLINE_VARS:
        os.environ.setdefault(var, "1")
    offline = os.environ["HF_HUB_OFFLINE"].upper() in _TRUE
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = offline
    if "datasets.config" in sys.modules:
        config = sys.modules["datasets.config"]
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = os.environ["HF_DATASETS_OFFLINE"].upper() in _TRUE
    return offline
