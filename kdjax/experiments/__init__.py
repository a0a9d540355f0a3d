"""Experiments: functions `run(config, workdir) -> results` that the entry point calls."""
