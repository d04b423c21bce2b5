"""lmms-eval's (deprecated but working) plugin hook: `LMMS_EVAL_PLUGINS=integrations.lmms_eval` makes lmms-eval import
`integrations.lmms_eval.models.<name>.<class>` for each entry below. Kept free of imports: lmms-eval reads it while
its own model registry is being built."""

AVAILABLE_MODELS = {"realb": "Realb"}
