"""Evaluation: gender bias (WinoBias, WinoGender), WinoGrande accuracy, reward-model accuracy,
instruction following, and the Table-1 report. Entry point: ``hetray.eval.run.run_eval``."""
