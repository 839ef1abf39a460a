# PYTHONSTARTUP of the kernels `spt lab` (`make lab`) starts: work in the repository root, so
# the notebooks' relative paths (runs/, figures/) resolve as under `spt run`. One expression,
# so nothing is added to the notebook's namespace.
__import__("os").chdir(__import__("os").environ.get("SPT_REPO", "."))
