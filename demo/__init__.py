"""The realb_hf demo: Gradio app (app.py), task generator (tasks.py), training script (train.py), bundled model
(model/). In a source checkout it is the package `demo`; installed from a wheel it is `realb_hf.demo`."""
