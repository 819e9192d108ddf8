"""Thin entry points: each job parses arguments, makes one call into cifar_core, says where
the output went. ``cifar <job> ...`` and ``python -m jobs.<job> ...`` are the same thing."""
