"""The bundled model repository, one folder per model (`model.toml`, labels, artifacts).

A wheel installs this folder as the package `edge_agent_models`, so an installed agent finds its models
without a checkout (`agent.service.config.bundled_models_dir`). `build.py` makes the artifacts; it is never
needed at run time.
"""
