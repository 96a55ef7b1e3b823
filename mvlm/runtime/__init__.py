"""Process-level runtime: launcher variables, process groups, the one start-up sequence
(``startup``), seeds, CPU adaptation (``cpu``), Megatron-Core version fixes (``compat``) and the
context-parallel sequence split (``cp``)."""
