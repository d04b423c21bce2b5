"""`realb_synthetic` / `realb_synthetic_mc`: demo/tasks.py's held-out questions as lmms-eval tasks (offline)."""
