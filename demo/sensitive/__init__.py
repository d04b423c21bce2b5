"""The precision-sensitive model: harder tasks (tasks.py), its trainer (train.py) and, once trained, model/."""
