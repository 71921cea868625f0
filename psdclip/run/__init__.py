"""Run support: command-line checks, the run log and console filtering, loggers, tables and the run summary,
checkpoint files, stopping and SLURM requeueing. What every entry point shares, none of it the method."""
