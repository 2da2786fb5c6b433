"""The command lines behind pipelines/*.py."""
