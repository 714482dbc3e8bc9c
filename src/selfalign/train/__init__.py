"""Training: ``train(cfg)`` runs (or resumes) a run and returns its directory."""

from selfalign.train.trainer import TrainingDiverged, train

__all__ = ["train", "TrainingDiverged"]
