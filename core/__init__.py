"""stagerun.core: the pure Python both sides share (the spec model, schedule arithmetic, the parallel layout's
degree arithmetic, the trainer<->operator protocol). It imports neither torch nor kopf, nor stagerun.trainer or
stagerun.operator; import-linter contracts (pyproject.toml) keep it so."""
