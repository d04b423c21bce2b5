"""lmms-eval task folders of this integration (pass this folder to lmms-eval's `--include_path`)."""
