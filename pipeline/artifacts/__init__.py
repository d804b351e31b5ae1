"""Files other stages and users read: checkpoints, predictions tables, evaluation reports."""

__all__: list[str] = []
