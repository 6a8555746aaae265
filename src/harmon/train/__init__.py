"""Training: the original's objectives (``losses``), data (``data``), the model as trained (``model``), one step
(``loop``), its reports (``metrics``), checkpoints (``checkpoints``), processes (``distributed``), and the run
(``trainer.train``)."""
