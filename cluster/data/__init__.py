"""Data: training and evaluation problems (tasks) and the models that need no hub (models)."""
