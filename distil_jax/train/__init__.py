"""Training: the objective and its losses (objective.py, losses.py, masking.py), the task
objective (task.py), the student's initialisation from the teacher (student_init.py),
the optimizer (optim.py), the one jitted update (step.py) and the loop (trainer.py)."""
