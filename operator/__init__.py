"""stagerun.operator: the kopf operator that runs TrainingRuns on Kubernetes (see docs/operator.md).

Imported only as ``stagerun.operator``; the folder name never shadows the standard library's ``operator``.
The operator reuses ``stagerun.core.spec`` and ``stagerun.core.plan`` (pure Python, no torch).
"""
