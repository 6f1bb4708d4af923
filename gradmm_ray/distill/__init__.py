"""The distill application: CLI, the pipeline that runs the three stages, the report and the
opt-in audit."""
