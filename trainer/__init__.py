"""stagerun.trainer: spec, plan, model, data, checkpoints and the training loop."""
