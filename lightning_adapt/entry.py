"""The ``lightning-adapt`` console script: ``fit``, ``validate``, ``test``, ``predict``, ``export`` and ``chat``
go to the Lightning CLI (:mod:`lightning_adapt.cli`); ``estimate``, ``inspect`` and ``compare`` start without
importing Lightning, so that planning a run (``estimate``) takes a fraction of a second instead of the seconds
Lightning and its imports need.

Example::

    lightning-adapt estimate --model llama-2-7b --method qlora
    lightning-adapt fit --config recipes/sentiment/qlora.yaml
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Run the subcommand named first in ``argv`` (default: ``sys.argv[1:]``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args else None
    if command == "estimate":
        from lightning_adapt.memory.cli import main as estimate_main

        estimate_main(args[1:])
    elif command == "inspect":
        from lightning_adapt.compare.inspect import main as inspect_main

        inspect_main(args[1:])
    elif command == "compare":
        from lightning_adapt.compare.command import main as compare_main

        compare_main(args[1:])
    else:
        from lightning_adapt.cli import main as cli_main

        cli_main(argv)


if __name__ == "__main__":
    main()
