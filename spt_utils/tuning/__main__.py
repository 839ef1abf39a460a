"""``python -m spt_utils.tuning`` and ``torchrun -m spt_utils.tuning``: see :func:`main`."""

from spt_utils.tuning.cli import main

if __name__ == "__main__":
    main()
