"""The placement protocol: intake (pure), plan (pure), auto-choice and its profiler, the saved copy,
and the reconciler that applies a plan through the tenant table (docs/protocol.md, "Placement")."""
