"""model_eval: decide, with evidence, which LLM each task should use."""

import os

# litellm otherwise downloads its price map at import time; there is no internet
# on the machines this runs on, and a reproducible price map is what we want anyway.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
