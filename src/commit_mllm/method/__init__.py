"""The method, CoMMIT, on torch alone: components, the balance meter, the scheduler, the strategies.

Nothing here imports anything but torch and the standard library (a test keeps it so); the
top-level ``commit_mllm`` namespace re-exports its public names. docs/architecture.md maps
the modules.
"""
