"""Training: the shared loop and the jobs that run on it (teacher, student, pediatric).

Modules, in import order (lower ones never import higher ones):

- ``outputs``     CSV tables, plain-Python card values, the card's data summary
- ``prepare``     a run's splits: labelled rows, cached images, skipped files
- ``model``       architecture, pretrained weights, head initialisation
- ``inference``   logits (one process or sharded), the predictions table, ``predict_manifest``
- ``hooks``       the typed interfaces: ``Evaluation`` (the loop's) and ``TaskHooks`` (a task's)
- ``selection``   classification metrics, selection scores (incl. ``tune_shifted``), the evaluations
- ``checkpoint``  save/resume, RNG state, seeding
- ``loop``        ``fit``: epochs, optimiser + LR schedule, AMP, DDP, early stopping, the best artifact
- ``jobs``        ``train_task`` (any task's hooks on the loop), the classifier hooks, ``train_model``
- ``distill``     the student (teacher soft targets) as classifier hooks
- ``pediatric``   the pediatric task's hooks and ``train_pediatric``
- ``registry``    task name -> hooks and entry point
"""
